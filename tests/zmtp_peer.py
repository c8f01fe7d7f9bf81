"""A hand-driven ZMTP 3 PUSH peer on a free loopback port, for testing the receiver's zmtp transport
where libzmq would not misbehave on purpose: commands between messages, damaged frames, odd greetings."""
from __future__ import annotations

import socket
import struct
from typing import Sequence

_GREETING_START = b"\xff" + bytes(8) + b"\x7f"


def greeting(major: int = 3, minor: int = 1, mechanism: bytes = b"NULL") -> bytes:
    return _GREETING_START + bytes([major, minor]) + mechanism.ljust(20, b"\0") + b"\0" + bytes(31)


def frame(body: bytes, *, more: bool = False, command: bool = False) -> bytes:
    flags = (0x01 if more else 0) | (0x04 if command else 0)
    if len(body) > 255:
        return bytes([flags | 0x02]) + struct.pack(">Q", len(body)) + body
    return bytes([flags, len(body)]) + body


def ready(socket_type: bytes = b"PUSH") -> bytes:
    body = b"\x05READY" + b"\x0bSocket-Type" + struct.pack(">I", len(socket_type)) + socket_type
    return frame(body, command=True)


def message(parts: Sequence[bytes]) -> bytes:
    return b"".join(frame(part, more=i < len(parts) - 1) for i, part in enumerate(parts))


class FakePushPeer:
    """Listens on 127.0.0.1:<free port>; :meth:`accept` takes the receiver's connection."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.endpoint = f"tcp://127.0.0.1:{self.port}"
        self.connection: socket.socket | None = None

    def accept(self, timeout: float = 10.0, *, handshake: bool = True, peer_greeting: bytes | None = None,
               socket_type: bytes = b"PUSH", instead: bytes = b"") -> bytes:
        """Accept one connection; with ``handshake`` answer it as a PUSH socket, else send
        ``instead``. Returns what the receiver sent during the handshake (greeting and READY)."""
        self.listener.settimeout(timeout)
        self.connection, _ = self.listener.accept()
        self.connection.settimeout(timeout)
        if not handshake:
            self.connection.sendall(instead)
            return b""
        peer_greeting = peer_greeting or greeting()
        self.connection.sendall(peer_greeting)
        received = self.recv_exactly(64)
        if peer_greeting[12:16] != b"NULL":  # the receiver gives up here
            return received
        self.connection.sendall(ready(socket_type))
        flags, size = self.recv_exactly(2)
        return received + bytes([flags, size]) + self.recv_exactly(size)

    def recv_exactly(self, count: int) -> bytes:
        data = b""
        while len(data) < count:
            chunk = self.connection.recv(count - len(data))
            if not chunk:
                raise ConnectionError("the receiver closed the connection")
            data += chunk
        return data

    def send(self, data: bytes) -> None:
        self.connection.sendall(data)

    def send_messages(self, messages: Sequence[Sequence[bytes]]) -> None:
        self.send(b"".join(message(parts) for parts in messages))

    def drop(self) -> None:
        if self.connection is not None:
            self.connection.close()
            self.connection = None

    def close(self) -> None:
        self.drop()
        self.listener.close()

    def __enter__(self) -> FakePushPeer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
