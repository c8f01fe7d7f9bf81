"""A read whose connection the DCU resets (a restarted DCU, one coming up) is tried again on a new
connection; a command never is (it may have reached the DCU)."""
from __future__ import annotations

import json
import socket
import struct
import threading

import pytest

from tango_dectris_live.simplon.client import DetectorClient
from tango_dectris_live.simplon.errors import DcuConnectionError


class ResettingServer:
    """Resets the first ``resets`` connections after reading their request, answers the others."""

    def __init__(self, resets: int) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.resets = resets
        self.requests: list[str] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            with connection:
                request = connection.recv(65536).decode("latin-1")
                self.requests.append(request.split("\r\n", 1)[0])
                if len(self.requests) <= self.resets:
                    connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    continue  # closing with linger 0: a reset
                body = json.dumps({"value": 7, "value_type": "uint"}).encode()
                connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
                                   b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def server(request):
    served = ResettingServer(getattr(request, "param", 1))
    yield served
    served.close()


@pytest.mark.parametrize("server", [1, 2], indirect=True)
def test_a_reset_read_is_tried_again(server):
    with DetectorClient("127.0.0.1", server.port, api_version="1.8.0") as client:
        assert client.get_value("detector", "config", "nimages") == 7
    assert len(server.requests) == server.resets + 1


def test_a_reset_command_is_not_sent_twice(server):
    with DetectorClient("127.0.0.1", server.port, api_version="1.8.0") as client:
        with pytest.raises(DcuConnectionError, match="reset"):
            client.command("detector", "arm")
    assert server.requests == ["PUT /detector/api/1.8.0/command/arm HTTP/1.1"]
