"""The ``zmtp`` transport: connect a PULL peer to a DECTRIS stream over TCP without libzmq's I/O thread.

A DECTRIS detector (or the simulator) binds a ZeroMQ PUSH socket; the receiver connects to it.
With libzmq (the ``libzmq`` transport) every ZeroMQ part is read by libzmq's I/O thread in 8 KiB
batches, queued, and handed to the receiver thread one part at a time: at 96x96 (2.4 KB frames,
four parts per v1 frame) that per-part work costs more CPU than decoding the frame
(docs/performance.md). ZeroMQ's wire protocol, ZMTP 3 (https://rfc.zeromq.org/spec/23/), is
simple for one PULL peer with the NULL mechanism, so with this transport the receiver thread
reads the TCP socket itself, megabytes at a time, and the compiled loop (``StreamLoop.attach``,
``_receiver.pyx``) takes the frames straight from its read buffer.

This module does what happens once per connection, in Python: the TCP connection, the greeting
and the READY handshake (:func:`connect`). The libzmq transport stays for what ZMTP over TCP with
the NULL mechanism does not cover (``ipc://`` endpoints, CURVE security, pre-3.0 peers); the
receiver's ``auto`` transport picks this one for ``tcp://`` endpoints and falls back to libzmq
when a peer cannot speak it (:class:`ZmtpUnsupported`).
"""
from __future__ import annotations

import socket
import struct
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

GREETING_BYTES = 64
_SIGNATURE_END = 0x7F
_COMMAND = 0x04
_LONG = 0x02
# our greeting: signature, version 3.0, mechanism NULL, as-server 0, filler
_GREETING = (b"\xff" + bytes(8) + bytes([_SIGNATURE_END]) + bytes([3, 0]) + b"NULL".ljust(20, b"\0")
             + b"\0" + bytes(31))
_MAX_HANDSHAKE_COMMAND = 1 << 16  # bytes: a READY with its metadata is a few dozen
_PEER_TYPES = {b"PUSH"}  # what may send to a PULL socket


class ZmtpError(ConnectionError):
    """The peer broke the ZMTP handshake (or is not a ZeroMQ socket): retried later."""


class ZmtpUnsupported(ZmtpError):
    """The peer speaks ZeroMQ, but something this transport does not do (a ZMTP version before
    3.0, a security mechanism): the ``auto`` transport falls back to libzmq."""


@dataclass(frozen=True)
class TcpEndpoint:
    host: str
    port: int

    @classmethod
    def parse(cls, endpoint: str) -> TcpEndpoint | None:
        """``tcp://host:port`` as host and port; None for any other kind of endpoint."""
        parts = urlsplit(endpoint)
        if parts.scheme != "tcp" or not parts.hostname:
            return None
        try:
            port = parts.port
        except ValueError:
            return None
        if port is None or parts.path not in ("", "/"):
            return None
        return cls(parts.hostname, port)


def _recv_exactly(sock: socket.socket, count: int, deadline: float) -> bytes:
    chunks = []
    while count:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ZmtpError("no ZMTP handshake from the peer in time (is it a ZeroMQ PUSH socket?)")
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(count)
        except socket.timeout:
            continue
        if not chunk:
            raise ZmtpError("the peer closed the connection during the ZMTP handshake")
        chunks.append(chunk)
        count -= len(chunk)
    return b"".join(chunks)


def check_signature(signature: bytes) -> None:
    """Raise unless ``signature`` (10 bytes) starts a ZeroMQ greeting."""
    if len(signature) < 10 or signature[0] != 0xFF or not signature[9] & 0x01:
        raise ZmtpError(f"the peer did not send a ZeroMQ greeting (first bytes {signature[:10]!r})")


def check_greeting(greeting: bytes) -> tuple[int, int]:
    """The peer's (major, minor) ZMTP version from its 64-byte greeting; raises if unusable."""
    check_signature(greeting)
    if len(greeting) < 32:
        raise ZmtpError(f"a truncated ZeroMQ greeting ({len(greeting)} bytes)")
    major, minor = greeting[10], greeting[11]
    if major < 3:
        raise ZmtpUnsupported(f"the peer speaks ZMTP {major}.x; this transport needs 3.0 or later")
    mechanism = greeting[12:32].rstrip(b"\0")
    if mechanism != b"NULL":
        raise ZmtpUnsupported(f"the peer uses the {mechanism.decode('ascii', 'replace')} security mechanism; "
                              "this transport only speaks NULL")
    return major, minor


def ready_command(socket_type: bytes = b"PULL") -> bytes:
    """A READY command frame announcing ``socket_type``."""
    body = b"\x05READY" + bytes([len(b"Socket-Type")]) + b"Socket-Type" + struct.pack(">I", len(socket_type)) \
        + socket_type
    return bytes([_COMMAND, len(body)]) + body


def parse_ready(body: bytes) -> dict[str, bytes]:
    """The metadata of a READY command body (raises for ERROR or anything else)."""
    if not body or len(body) < 1 + body[0]:
        raise ZmtpError("empty or truncated ZMTP command from the peer")
    name, pos = body[1:1 + body[0]], 1 + body[0]
    if name == b"ERROR":
        reason = body[pos + 1:pos + 1 + body[pos]] if pos < len(body) else b""
        raise ZmtpError(f"the peer refused the connection: {reason.decode('ascii', 'replace')}")
    if name != b"READY":
        raise ZmtpError(f"expected the peer's READY command, got {name.decode('ascii', 'replace')!r}")
    properties: dict[str, bytes] = {}
    while pos < len(body):
        key_len = body[pos]
        key = body[pos + 1:pos + 1 + key_len]
        pos += 1 + key_len
        if pos + 4 > len(body):
            raise ZmtpError("truncated metadata in the peer's READY command")
        (value_len,) = struct.unpack_from(">I", body, pos)
        pos += 4
        if pos + value_len > len(body):
            raise ZmtpError("truncated metadata in the peer's READY command")
        properties[key.decode("ascii", "replace").lower()] = body[pos:pos + value_len]
        pos += value_len
    return properties


def handshake(sock: socket.socket, timeout: float) -> tuple[int, int]:
    """Greet the peer as a PULL socket on the connected ``sock``; returns its ZMTP version.
    Reads exactly the handshake's bytes, so the stream's first frame is the next byte."""
    deadline = time.monotonic() + timeout
    sock.sendall(_GREETING)
    signature = _recv_exactly(sock, 10, deadline)  # judged first: a stranger may send fewer than 64 bytes
    check_signature(signature)
    version = check_greeting(signature + _recv_exactly(sock, GREETING_BYTES - 10, deadline))
    sock.sendall(ready_command())
    flags = _recv_exactly(sock, 1, deadline)[0]
    if not flags & _COMMAND:
        raise ZmtpError("the peer sent a message before its READY command")
    size = struct.unpack(">Q", _recv_exactly(sock, 8, deadline))[0] if flags & _LONG \
        else _recv_exactly(sock, 1, deadline)[0]
    if size > _MAX_HANDSHAKE_COMMAND:
        raise ZmtpError(f"a {size}-byte handshake command from the peer")
    properties = parse_ready(_recv_exactly(sock, size, deadline))
    peer_type = properties.get("socket-type", b"")
    if peer_type not in _PEER_TYPES:
        raise ZmtpError(f"the peer is a {peer_type.decode('ascii', 'replace') or 'untyped'} socket; "
                        "a DECTRIS stream comes from a PUSH socket")
    return version


def connect(endpoint: TcpEndpoint, timeout: float = 1.0, receive_buffer: int | None = None) -> socket.socket:
    """A TCP connection to ``endpoint``, handshaken, non-blocking, ready for ``StreamLoop.attach``.

    Raises OSError when nobody listens (retry later), :class:`ZmtpError` for a broken handshake
    and :class:`ZmtpUnsupported` for a peer that needs libzmq."""
    sock = socket.create_connection((endpoint.host, endpoint.port), timeout=timeout)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if receive_buffer:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        handshake(sock, timeout)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock
