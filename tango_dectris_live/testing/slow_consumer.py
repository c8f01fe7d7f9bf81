"""A PULL consumer of a DCU stream that counts what reaches it, and a slow one (issue 22).

Why the slowness is on the consumer's side and not a simulator fault: a DCU's PUSH socket does not
know that a client is slow; it deals its messages round-robin and skips a client whose queue is
full. What makes a node keep only what it queued is the node's own pace together with the buffers
on the way (the DCU's ``send_hwm`` / ``send_buffer_bytes`` in the simulator, the client's
``RCVHWM`` / ``RCVBUF``). So the simulator stays a faithful DCU, and the slowness is here, where a
real slow node has it.

:class:`SlowConsumer` connects with a small ``RCVHWM`` and ``RCVBUF``, may wait for a ``gate`` (a
:class:`threading.Event`) before it takes anything, and waits ``delay_s`` after each image. A test
that sets the gate only once the series was sent gets a slow consumer whose share is bounded by the
buffers alone, however fast or slow the machine is.

Nothing of the product is imported (the layering test checks it); messages are told apart from
the SIMPLON documentation: stream v1 by the ``htype`` of the first part's JSON, stream v2 by the
``type`` of the CBOR message.
"""
from __future__ import annotations

import json
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self

import cbor2
import zmq
from zmq.utils.monitor import recv_monitor_message

CBOR_SELF_DESCRIBE = b"\xd9\xd9\xf7"
V2_KINDS = {"start": "header", "image": "image", "end": "end"}
V1_KINDS = {"dheader": "header", "dimage": "image", "dseries_end": "end"}


def message_kind(parts: list[bytes]) -> tuple[str, int]:
    """("header" | "image" | "end" | "other", frame number or -1) of one ZeroMQ message.

    "other": a part sent alone that carries no ``htype`` (the further parts of a v1 global header
    sent with the simulator's ``split_header`` / ``split_all`` framing) or anything unknown."""
    first = parts[0]
    if first.startswith(CBOR_SELF_DESCRIBE):
        try:
            document = cbor2.loads(first)
        except (cbor2.CBORDecodeError, ValueError):
            return "other", -1
        kind = V2_KINDS.get(document.get("type", "")) if isinstance(document, Mapping) else None
        if kind is None:
            return "other", -1
        return kind, int(document["image_id"]) if kind == "image" else -1
    if not first.startswith(b"{"):
        return "other", -1
    try:
        document = json.loads(first)
    except (UnicodeDecodeError, ValueError):
        return "other", -1
    htype = str(document.get("htype", "")) if isinstance(document, dict) else ""
    kind = V1_KINDS.get(htype.split("-", 1)[0])
    if kind is None:
        return "other", -1
    return kind, int(document["frame"]) if kind == "image" else -1


@dataclass
class Received:
    """What one consumer took, in order: (kind, frame) as :func:`message_kind` tells them."""

    messages: list[tuple[str, int]] = field(default_factory=list)

    @property
    def frames(self) -> list[int]:
        return [frame for kind, frame in self.messages if kind == "image"]

    def count(self, kind: str) -> int:
        return sum(k == kind for k, _ in self.messages)


class StreamConsumer:
    """One PULL client of a stream endpoint, in its own thread, recording every message it takes.

    ``rcvhwm`` / ``rcvbuf``: ZMQ_RCVHWM (messages) and ZMQ_RCVBUF (bytes) of its socket, None for
    ZeroMQ's defaults (1000 messages, the kernel's autotuning). ``gate``: it takes nothing until the
    event is set. ``delay_s``: it waits this long after each image it takes (its slowness).
    """

    def __init__(self, endpoint: str, *, rcvhwm: int | None = None, rcvbuf: int | None = None,
                 delay_s: float = 0.0, gate: threading.Event | None = None,
                 context: zmq.Context | None = None) -> None:
        if delay_s < 0:
            raise ValueError(f"delay_s must be >= 0 seconds, got {delay_s!r}")
        self.endpoint = endpoint
        self.rcvhwm = rcvhwm
        self.rcvbuf = rcvbuf
        self.delay_s = float(delay_s)
        self.gate = gate
        self.received = Received()
        self._context = context or zmq.Context.instance()
        self._socket: zmq.Socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self.error: BaseException | None = None  # what ended the receiving thread early, if anything

    def start(self, handshake_timeout_s: float = 10.0) -> Self:
        """Connect, wait until the ZeroMQ handshake with the sender is done (so a series started
        now deals to this client too), then receive in a thread."""
        if self._socket is not None:
            raise RuntimeError(f"the consumer of {self.endpoint} is already started")
        sock = self._context.socket(zmq.PULL)
        sock.setsockopt(zmq.LINGER, 0)
        if self.rcvhwm is not None:
            sock.setsockopt(zmq.RCVHWM, self.rcvhwm)
        if self.rcvbuf is not None:
            sock.setsockopt(zmq.RCVBUF, self.rcvbuf)
        monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
        try:
            sock.connect(self.endpoint)
            shaken = bool(monitor.poll(round(handshake_timeout_s * 1000)))
            if shaken:
                recv_monitor_message(monitor)
        finally:
            sock.disable_monitor()
            monitor.close(linger=0)
        if not shaken:
            sock.close(linger=0)
            raise TimeoutError(f"no ZeroMQ handshake with {self.endpoint} within {handshake_timeout_s} s "
                               f"(is the stream bound there?)")
        self._socket = sock
        self._thread = threading.Thread(target=self._run, name=f"stream-consumer-{self.endpoint}", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        sock = self._socket
        assert sock is not None
        try:
            if self.gate is not None:
                while not self.gate.wait(0.05):
                    if self._stopping.is_set():
                        return
            while not self._stopping.is_set():
                if not sock.poll(50):
                    continue
                kind, frame = message_kind(sock.recv_multipart())
                self.received.messages.append((kind, frame))
                if kind == "image" and self.delay_s > 0:
                    self._stopping.wait(self.delay_s)
        except zmq.ZMQError as exc:  # the socket closed under it: kept for the test to see
            self.error = exc

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop receiving and close the socket (what is still queued for it is lost)."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                raise RuntimeError(f"the consumer of {self.endpoint} did not stop within {timeout_s} s")
        if self._socket is not None:
            self._socket.close(linger=0)

    def __enter__(self) -> Self:
        return self.start() if self._socket is None else self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


class SlowConsumer(StreamConsumer):
    """A consumer that cannot keep up: small receive queue and buffer (so the sender finds its
    queue full soon and skips it), held by ``gate`` and/or ``delay_s`` per image. Its share of a
    series is then at most what the buffers between it and the sender hold (see :func:`queue_bound`)
    while the gate is closed."""

    def __init__(self, endpoint: str, *, gate: threading.Event | None = None, delay_s: float = 0.01,
                 rcvhwm: int = 2, rcvbuf: int = 65536, context: zmq.Context | None = None) -> None:
        super().__init__(endpoint, rcvhwm=rcvhwm, rcvbuf=rcvbuf, delay_s=delay_s, gate=gate, context=context)


def queue_bound(message_bytes: int, *, send_hwm: int, send_buffer_bytes: int, rcvhwm: int, rcvbuf: int) -> int:
    """The most messages of ``message_bytes`` each that can wait for one consumer that takes
    nothing: the sender's queue (``send_hwm``), the receiver's (``rcvhwm``), the two kernel buffers
    (Linux doubles the size asked for), and one message in each ZeroMQ I/O engine (being written,
    being read)."""
    kernel = 2 * (send_buffer_bytes + rcvbuf)
    return send_hwm + rcvhwm + -(-kernel // message_bytes) + 2
