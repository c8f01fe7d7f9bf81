"""StreamReceiver: a thread that takes a DECTRIS ZeroMQ stream into shared-memory frame stacks.

The thread runs the compiled loop (``_receiver.StreamLoop``) with the GIL released; it comes back
here only for what needs Python: handing a stack over, finding a free slot (back-pressure),
series headers and ends, and the rare image whose layout the C code does not know. Consumers get
:class:`SeriesStarted`, :class:`StackReady`, :class:`SeriesFinished` and :class:`ReceiverError`
events from :meth:`StreamReceiver.next_event` and give each stack back with
:meth:`StreamReceiver.release`.

Transports: ``zmtp`` (the default for ``tcp://``) reads the TCP connection in this thread
(``zmtp.py``), ``libzmq`` through pyzmq's socket and libzmq's I/O thread.

Stream v1 messages are taken by content, whatever the ZeroMQ message boundaries: the C loop
places an image that came as one multipart message (a DCU's framing) and hands everything else to
:class:`V1Regrouper` here (headers and ends, and the parts of messages that a zmqdump replay sends
split over several ZeroMQ messages).

Connection policy: ``always`` stays connected from :meth:`StreamReceiver.start` on;
``per_series`` connects for :meth:`StreamReceiver.connect`, ``arm`` or ``listen`` and disconnects
when the receiver is idle again, so that other consumers of the DCU's PUSH socket (which deals
messages round-robin to every connected peer) get whole series meanwhile.

Modes (docs/receiver.md has the whole picture): IDLE reads nothing, so ZeroMQ keeps what the DCU
sends (up to the socket buffers and the send high-water mark, then the DCU's send waits or drops) and a
series header sent at the DCU's arm is still there when :meth:`StreamReceiver.arm` comes; ARMED
drains other series' messages (counted ``stale``/``wrong_series``) until the armed series' header,
takes that one series and goes back to IDLE; LISTENING takes every series, one after the other.
"""
from __future__ import annotations

import collections
import enum
import logging
import os
import queue
import select
import socket as _socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, Union

import numpy as np
import zmq

from tango_dectris_live.allocator import tune_allocator
from zmq.utils.monitor import recv_monitor_message

from tango_dectris_live.stream import (
    ImageFrame,
    SeriesEnd,
    SeriesHeader,
    StreamFormatError,
    V1Regrouper,
    parse_v1_message,
    parse_v2_message,
)

from . import _receiver, zmtp
from .native import function_addresses
from .framestack import FrameStackHandle, FrameStackLayout, SharedFrameStacks, SlotState, dtype_of_tag, dtype_tag
from .stats import RateMeter, ReceiverStats

log = logging.getLogger(__name__)

_LIBZMQ_FUNCTIONS = ("zmq_msg_init", "zmq_msg_recv", "zmq_msg_close", "zmq_msg_move", "zmq_msg_data",
                     "zmq_msg_size", "zmq_msg_more", "zmq_poll", "zmq_errno")
# Counters of the C loop that are errors (the others are plain totals).
_C_ERRORS = ("out_of_range", "wrong_series", "stale", "no_header", "truncated", "size_mismatch",
             "oversize", "shape_mismatch", "too_many_parts")
_C_INDEX = {name: i for i, name in enumerate(_receiver.COUNTER_NAMES)}

TRANSPORTS = ("auto", "zmtp", "libzmq")
CONNECTIONS = ("always", "per_series")
_CONNECT_TIMEOUT_S = 0.5  # TCP connect + ZMTP handshake; the receiver thread waits this long at most
_RECONNECT_S = 0.1  # retry interval after a failed connection attempt (libzmq's default)
# libzmq socket monitor: the handshake tells that the DCU's PUSH socket deals messages to us now
_MONITOR_EVENTS = (zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECT_RETRIED
                   | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                   | zmq.EVENT_HANDSHAKE_FAILED_AUTH)


def libzmq_functions() -> dict[str, int]:
    """Addresses of the libzmq functions the C loop calls, from the libzmq pyzmq has loaded.

    Resolving through pyzmq's backend module finds its bundled libzmq (a dependency of that
    module), a system libzmq, or one linked into the module, and always the same instance that
    owns pyzmq's sockets (see _receiver.pyx for why this is not linked at build time).
    """
    from zmq.backend.cython import _zmq as backend

    return function_addresses(backend.__file__, _LIBZMQ_FUNCTIONS,
                              f"the compiled receiver needs libzmq >= 4.0 (pyzmq reports {zmq.zmq_version()})")


class StreamConnectError(ConnectionError):
    """:meth:`StreamReceiver.connect` found no stream connection to ``endpoint`` in time."""

    def __init__(self, endpoint: str, timeout: float, reason: str) -> None:
        super().__init__(
            f"no stream connection to {endpoint} within {timeout:g} s ({reason or 'no answer'}): check that "
            f"the DCU is up, that its stream is enabled (stream/config/mode) and that {endpoint} is its "
            "stream endpoint")
        self.endpoint = endpoint
        self.timeout = timeout
        self.reason = reason


class _WholeMessages:
    """Stream v2: every ZeroMQ message is one whole message (a single CBOR part); the queue
    :class:`V1Regrouper` keeps for v1, with nothing to regroup."""

    def __init__(self) -> None:
        self._ready: collections.deque[list[bytes]] = collections.deque()

    @property
    def ready(self) -> bool:
        return bool(self._ready)

    busy = ready
    holds_header = False
    image_appendix_may_follow = False

    def add(self, parts: list[bytes], *, follows_image: bool | None = None) -> None:
        self._ready.append(parts)

    def take(self) -> list[bytes] | None:
        return self._ready.popleft() if self._ready else None

    def put_back(self, item: list[bytes]) -> None:
        self._ready.appendleft(item)

    def finish_held(self) -> bool:
        return False

    def reset(self) -> None:
        pass


# ---- events -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SeriesSummary:
    """How one series went: what arrived, what is missing, why it ended."""

    series: int
    expected_frames: int | None  # None when the header did not say
    frames_received: int
    missing_frames: np.ndarray  # frame numbers never received (int64)
    end_reason: str  # complete, end_message, timeout, cancelled, superseded, stopped
    errors: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    duration: float = 0.0
    # time.monotonic() when the receiver ended the series: its last frame or end message arrived
    # (or the timeout, cancel, ... named by end_reason)
    ended_at: float = 0.0

    @property
    def missing(self) -> int:
        return int(self.missing_frames.size)


@dataclass(frozen=True)
class SeriesStarted:
    """A series began. Its header may leave the frame shape and pixel type unknown (v1
    ``header_detail`` none): then its first stack tells."""

    header: SeriesHeader

    @property
    def series(self) -> int:
        return self.header.series_id


@dataclass(frozen=True)
class StackReady:
    """A stack of frames is ready; the consumer gives it back with ``release(handle)``.

    ``handle`` is picklable, so that worker processes decode the stack themselves (in-memory
    sources in the tests put their own handles here)."""

    handle: FrameStackHandle


@dataclass(frozen=True)
class SeriesFinished:
    """A series ended; ``summary`` says what arrived, what is missing and why it ended."""

    summary: SeriesSummary

    @property
    def series(self) -> int:
        return self.summary.series

    @property
    def ended_at(self) -> float:
        """``time.monotonic()`` when the receiver ended the series: where latencies start."""
        return self.summary.ended_at


@dataclass(frozen=True)
class ReceiverError:
    kind: str
    message: str


ReceiverEvent = Union[SeriesStarted, StackReady, SeriesFinished, ReceiverError]


class ReceiverMode(enum.Enum):
    IDLE = "idle"  # the socket is not read: ZeroMQ holds the messages for the next arm/listen
    ARMED = "armed"  # active: one given series, then IDLE
    LISTENING = "listening"  # passive: every series, one after the other


@dataclass
class _Series:
    header: SeriesHeader
    received: np.ndarray  # uint8 per frame number
    started_at: float
    counters_at_start: list[int]
    shape: tuple[int, int] | None
    dtype: np.dtype | None
    encoding: str = "none"
    python_errors: dict[str, int] = field(default_factory=dict)
    announced: bool = False  # started from the DCU's configuration; its header not seen yet


def _differs_from_announced(header: SeriesHeader, announced: SeriesHeader) -> bool:
    """Whether the header contradicts what was announced for the series (what both say)."""
    pairs = ((header.number_of_images, announced.number_of_images), (header.shape, announced.shape),
             (None if header.dtype is None else np.dtype(header.dtype),
              None if announced.dtype is None else np.dtype(announced.dtype)))
    return any(said is not None and known is not None and said != known for said, known in pairs)


_HUNG_UP = select.POLLHUP | select.POLLERR | getattr(select, "POLLRDHUP", 0)


def _peer_closed(connection: _socket.socket) -> bool:
    """The peer closed its end (or the connection failed), whatever is still queued to read."""
    poller = select.poll()
    poller.register(connection.fileno(), select.POLLIN | _HUNG_UP)
    return any(mask & _HUNG_UP for _, mask in poller.poll(0))


class StreamReceiver:
    """Receive a DECTRIS stream (v1 legacy or v2 CBOR) from ``endpoint`` into frame stacks.

    ``frame_shape``/``dtype`` size the slots (see :meth:`FrameStackLayout.for_frames`); frames of
    another size still work as long as they fit a slot. ``max_latency``: a stack with frames is
    handed over at the latest after this many seconds. ``timeout``: a series that receives
    nothing for this long ends with its missing frames counted, and an :meth:`arm` whose series
    header does not come within this long ends with a ``no_header`` :class:`ReceiverError`.
    ``coalesce``: while a stream flows and the socket runs dry, the receiver thread naps this many
    seconds (at most) instead of being woken for each batch ZeroMQ reads, then takes what piled up
    in one go (0: wake for every batch). The default, 200 us, cut the receiver thread's CPU per
    frame at 96x96 by 6-19 % in interleaved runs (docs/performance.md); it adds at most that much
    to a frame's latency.
    ``transport``: how the stream is read. ``zmtp`` reads the TCP connection in the receiver
    thread itself (ZeroMQ's wire protocol, see ``zmtp.py``): several times less CPU per ZeroMQ part
    than ``libzmq`` (its I/O thread and per-part queue), which is what small frames cost most.
    ``auto`` (default) is ``zmtp`` for ``tcp://`` endpoints and ``libzmq`` for others, and falls back to
    ``libzmq`` when the peer needs it (a security mechanism, ZMTP before 3.0). Both reconnect on their
    own when the connection drops (``disconnects`` in :meth:`stats`). ``receive_hwm`` only applies
    to ``libzmq``; with ``zmtp`` the kernel's socket buffer is the queue.
    ``connection``: ``always`` (default) connects at :meth:`start` and stays connected;
    ``per_series`` is connected only while needed: from :meth:`connect`, :meth:`arm` or
    :meth:`listen` until the receiver is idle again (the armed series ended and its end message
    came, :meth:`cancel`, ``no_header``). The DCU's PUSH socket deals its messages round-robin to
    every connected consumer, so ``per_series`` leaves whole series to another consumer (a second
    receiver, LiberTEM-live) meanwhile; with nobody connected the DCU queues them.
    """

    def __init__(self, endpoint: str, *, stream_version: int = 1, frame_shape: tuple[int, int] = (512, 512),
                 dtype: np.dtype | str = "uint16", num_slots: int | None = None, frame_stack_size: int | None = None,
                 bytes_per_frame: int | None = None, max_latency: float = 0.1, timeout: float = 10.0,
                 receive_hwm: int = 1000, poll_interval: float = 0.05, rate_window: float = 2.0,
                 coalesce: float = 200e-6, transport: str = "auto", connection: str = "always") -> None:
        if stream_version not in (1, 2):
            raise ValueError(f"stream_version must be 1 (legacy JSON) or 2 (CBOR), got {stream_version!r}")
        if max_latency <= 0 or timeout <= 0 or poll_interval <= 0:
            raise ValueError("max_latency, timeout and poll_interval must be positive seconds")
        if not 0.0 <= coalesce <= 0.01:
            raise ValueError(f"coalesce must be 0 to 0.01 seconds, got {coalesce!r}")
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {', '.join(TRANSPORTS)}, got {transport!r}")
        if connection not in CONNECTIONS:
            raise ValueError(f"connection must be one of {', '.join(CONNECTIONS)}, got {connection!r}")
        self._tcp = zmtp.TcpEndpoint.parse(endpoint)
        if transport == "zmtp" and self._tcp is None:
            raise ValueError(f"the zmtp transport needs a tcp://host:port endpoint, got {endpoint!r}")
        self.endpoint = endpoint
        self.requested_transport = transport
        self.transport = "zmtp" if transport != "libzmq" and self._tcp is not None else "libzmq"
        self._connection: _socket.socket | None = None
        self._next_connect = 0.0
        self._connect_failures = 0
        self._last_connect_error = ""
        self._disconnects = 0
        self._zmq_context: zmq.Context | None = None
        self._zmq_socket: zmq.Socket | None = None
        self._zmq_monitor: zmq.Socket | None = None
        self._zmq_connect_called = False  # libzmq: connect() was called on the socket (not disconnected since)
        self.connection = connection
        # whether the receiver thread keeps a connection up (per_series: from connect/arm/listen to idle)
        self._connection_wanted = connection == "always"
        self._connected = threading.Event()  # a connection is up (zmtp: handshaken; libzmq: monitor)
        self._awaiting_end_of: int | None = None  # per_series: the completed series whose end is awaited
        self._awaiting_end_until = 0.0
        self.stream_version = stream_version
        self.layout = FrameStackLayout.for_frames(frame_shape, dtype, num_slots=num_slots,
                                                  frame_stack_size=frame_stack_size,
                                                  bytes_per_frame=bytes_per_frame)
        self.max_latency = max_latency
        self._timeout = float(timeout)
        self.receive_hwm = receive_hwm
        self.coalesce = float(coalesce)
        self.poll_interval = poll_interval
        self._frame_rate = RateMeter(rate_window)
        self._byte_rate = RateMeter(rate_window)
        self._events: queue.Queue[ReceiverEvent] = queue.Queue()
        self._commands: queue.SimpleQueue[tuple[Callable[[], None], threading.Event]] = queue.SimpleQueue()
        self._stacks: SharedFrameStacks | None = None
        self._loop: _receiver.StreamLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._started = threading.Event()
        self._start_error: BaseException | None = None
        self._lock = threading.Lock()
        self._mode = ReceiverMode.IDLE
        self._armed_series: int | None = None
        self._armed_at = 0.0
        self._series: _Series | None = None
        self._python_errors: dict[str, int] = {}
        self._final_counters: list[int] = [0] * len(_receiver.COUNTER_NAMES)
        self._missing_total = 0
        self._series_finished = 0
        self._last_rate_sample = 0.0
        self._last_completed_series: int | None = None
        self._template: SeriesHeader | None = None  # listen(template): series without a header
        self._newest_series = -1  # the newest series started here
        self._framing: V1Regrouper | _WholeMessages = V1Regrouper() if stream_version == 1 else _WholeMessages()

    # ---- lifecycle ------------------------------------------------------------------------------

    def start(self) -> StreamReceiver:
        """Create the frame stacks, connect and start the receiver thread."""
        if self._thread is not None:
            raise RuntimeError("this receiver was already started; create a new one")
        tune_allocator()  # libzmq's per-message buffers: reuse freed memory (see allocator.py)
        self._stacks = SharedFrameStacks(self.layout)
        self._thread = threading.Thread(target=self._run, name=f"StreamReceiver({self.endpoint})", daemon=True)
        self._thread.start()
        self._started.wait()
        if self._start_error is not None:
            self.stop()
            raise RuntimeError(f"stream receiver could not start on {self.endpoint}: {self._start_error}") \
                from self._start_error
        return self

    def stop(self) -> None:
        """Stop the thread, close the socket and unlink the shared memory (idempotent)."""
        self._stopping.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        if self._stacks is not None:
            self._stacks.close()

    def __enter__(self) -> StreamReceiver:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def mode(self) -> ReceiverMode:
        return self._mode

    @property
    def connected(self) -> bool:
        """A connection to the DCU is up (zmtp: handshaken; libzmq: handshake reported by its
        socket monitor)."""
        return self._connected.is_set()

    @property
    def last_message_at(self) -> float:
        """``time.monotonic()`` when the last stream message came (0: none yet)."""
        loop = self._loop
        return float(loop.last_message_at) if loop is not None else 0.0

    @property
    def timeout(self) -> float:
        """Seconds without a message before a running series ends (``timeout``), and seconds an
        :meth:`arm` waits for its header (``no_header``); may be changed at any time, e.g. for
        an acquisition whose external triggers come far apart."""
        return self._timeout

    @timeout.setter
    def timeout(self, seconds: float) -> None:
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds > 0:
            raise ValueError(f"the receiver timeout must be a positive number of seconds, got {seconds!r}")
        self._timeout = float(seconds)  # one attribute store: the receiver thread reads it as it is

    # ---- control (any thread) -------------------------------------------------------------------

    def connect(self, timeout: float = 5.0) -> None:
        """Connect to the DCU now and return once the connection is up; call it before arming the
        DCU when ``connection="per_series"``, so that the header the DCU sends at arm comes here.

        "Up" means the ZeroMQ handshake with the DCU's PUSH socket completed (zmtp: this receiver's
        own handshake; libzmq: its socket monitor's ``HANDSHAKE_SUCCEEDED``). Raises
        :class:`StreamConnectError` (naming the endpoint and the last reason) when that does not
        happen within ``timeout`` seconds; ``per_series`` then stops trying, ``always`` goes on.
        With ``per_series`` the connection stays up until the receiver is idle again after the
        next :meth:`arm`'s series, or :meth:`cancel`.
        """
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise ValueError(f"connect() needs a positive timeout in seconds, got {timeout!r}")
        self._command(self._probe_idle_connection)
        self._command(self._want_connection)
        if self._connected.wait(timeout):
            return
        reason = self._last_connect_error

        def give_up() -> None:
            if not self._connected.is_set() and self.connection == "per_series" and self._mode is ReceiverMode.IDLE:
                self._disconnect()
        self._command(give_up)
        raise StreamConnectError(self.endpoint, timeout, reason)

    def arm(self, series_id: int, announced: SeriesHeader | None = None) -> None:
        """Active mode: take series ``series_id`` (the id the DCU's arm returned), then go idle.

        Call it after the DCU's arm: the header the DCU sent at arm is still queued in ZeroMQ.
        Messages of other series queued before it are drained and counted (``stale`` for older
        series, ``wrong_series`` for newer ones). Without that series' header within ``timeout``
        seconds a ``no_header`` :class:`ReceiverError` is emitted and the receiver goes idle.

        ``announced``: the series as the DCU's configuration describes it (its id, number of images,
        frame shape and pixel type), for a receiver that may never get the header: several receivers
        on one stream each get part of its messages, and only one the header and only one the end
        (the DCU deals them round-robin). The series then starts at once (:class:`SeriesStarted`
        with ``announced``); a header that does come is held against it (a difference is counted
        as ``header_mismatch``); without the end message, :meth:`cancel` ends it with what came.
        """
        if isinstance(series_id, bool) or not isinstance(series_id, (int, np.integer)) or series_id < 0:
            raise ValueError(f"arm() needs the series id the detector's arm returned (an integer >= 0), "
                             f"got {series_id!r}")
        series_id = int(series_id)
        if announced is not None and announced.series_id != series_id:
            raise ValueError(f"arm({series_id}): the announced series is {announced.series_id}")

        def apply() -> None:
            if self._series is not None:
                self._finish("superseded")
            self._mode = ReceiverMode.ARMED
            self._armed_series = series_id
            self._template = None
            self._loop.headerless_to_python = False
            self._armed_at = time.monotonic()
            self._awaiting_end_of = None
            self._loop.arm(series_id)
            self._want_connection()
            if announced is not None:
                self._on_header(announced)
                self._series.announced = True
            self._route_messages()
        self._command(apply)

    def listen(self, template: SeriesHeader | None = None) -> None:
        """Passive mode: take whichever series starts next, and the next one, again and again.

        ``template``: the series as the DCU's configuration describes them (number of images,
        frame shape, pixel type; its id is not used), for a receiver that shares the stream with
        others and so may never get a series' header: the first image of a series newer than any
        seen starts that series from the template (a header that does come is held against it,
        ``header_mismatch``); its end comes with the end message, or :meth:`cancel`."""
        def apply() -> None:
            self._mode = ReceiverMode.LISTENING
            self._armed_series = None
            self._awaiting_end_of = None
            self._template = template
            self._loop.headerless_to_python = template is not None
            self._loop.arm(-1)
            self._want_connection()
            self._route_messages()
        self._command(apply)

    def cancel(self) -> None:
        """End the current series now (its summary says ``cancelled``) and go idle: the socket is
        not read until the next :meth:`arm` or :meth:`listen` (``per_series``: disconnected)."""
        def apply() -> None:
            if self._series is not None:
                self._finish("cancelled")
            self._mode = ReceiverMode.IDLE
            self._armed_series = None
            self._awaiting_end_of = None
            if self.connection == "per_series":
                self._disconnect()
        self._command(apply)

    def _command(self, action: Callable[[], None]) -> None:
        """Run ``action`` in the receiver thread and wait for it, so that a message arriving
        right after arm()/listen() returns is already treated under the new mode."""
        if not self.running:
            raise RuntimeError("the stream receiver is not running (call start())")
        done = threading.Event()
        self._commands.put((action, done))
        while not done.wait(self.poll_interval):
            if not self.running:
                raise RuntimeError("the stream receiver stopped before the command was applied")

    # ---- consumer side (any thread) -------------------------------------------------------------

    def next_event(self, timeout: float | None = None) -> ReceiverEvent | None:
        """The next event, or None after ``timeout`` seconds. A StackReady's slot is the
        consumer's until :meth:`release`."""
        try:
            event = self._events.get(timeout=timeout)
        except queue.Empty:
            return None
        if isinstance(event, StackReady) and self._stacks is not None:
            self._stacks.mark(event.handle.slot, SlotState.IN_USE, expected=(SlotState.READY,))
        return event

    def post(self, event: Any) -> None:
        """Queue a consumer's own event among the receiver's (see :meth:`next_event`): whoever
        consumes the events waits on one queue for them and for its own."""
        self._events.put(event)

    def __iter__(self) -> Iterator[ReceiverEvent]:
        """Events until the receiver stops."""
        while True:
            event = self.next_event(self.poll_interval)
            if event is not None:
                yield event
            elif not self.running:
                return

    def release(self, handle: FrameStackHandle) -> None:
        """Give a stack's slot back to the receiver."""
        if self._stacks is None or handle.segment != self._stacks.name:
            raise ValueError(f"frame stack {handle.segment}/{handle.slot} does not belong to this receiver")
        self._stacks.mark(handle.slot, SlotState.FREE, expected=(SlotState.IN_USE, SlotState.READY))

    def stats(self) -> ReceiverStats:
        counters = self._counters()
        errors = {name: counters[_C_INDEX[name]] for name in _C_ERRORS if counters[_C_INDEX[name]]}
        with self._lock:
            for reason, count in self._python_errors.items():
                errors[reason] = errors.get(reason, 0) + count
        stacks = self._stacks
        in_use = 0 if stacks is None else self.layout.num_slots - stacks.count(SlotState.FREE)
        series = self._series
        return ReceiverStats(
            frames_received=counters[_C_INDEX["frames"]],
            bytes_received=counters[_C_INDEX["bytes"]],
            messages_received=counters[_C_INDEX["messages"]],
            frames_missing=self._missing_total,
            duplicates=counters[_C_INDEX["duplicate"]],
            errors=MappingProxyType(errors),
            slots_in_use=in_use,
            slots_total=self.layout.num_slots,
            frames_per_second=self._frame_rate.rate(),
            megabytes_per_second=self._byte_rate.rate() / 1e6,
            backpressure_seconds=0.0 if stacks is None else stacks.backpressure_seconds,
            series_active=None if series is None else series.header.series_id,
            series_finished=self._series_finished,
            transport=self.transport,
            connection=self.connection,
            connected=self._connected.is_set(),
            disconnects=self._disconnects,
            connect_error=self._last_connect_error,
            zmtp_commands=counters[_C_INDEX["zmtp_commands"]],
        )

    def _counters(self) -> list[int]:
        loop = self._loop
        return loop.counters() if loop is not None else list(self._final_counters)

    # ---- the receiver thread --------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._loop = _receiver.StreamLoop(
                libzmq_functions(), self.stream_version == 2, self._stacks.buffer,
                self.layout.num_slots, self.layout.slot_bytes, self.layout.frame_stack_size, self.max_latency,
                self.coalesce)
            if self.transport == "libzmq":
                self._open_libzmq()
            elif self._connection_wanted:
                self._try_connect()  # a peer that is there is connected when start() returns
        except (zmq.ZMQError, RuntimeError, ValueError) as error:
            self._start_error = error
            self._close_transport()
            self._started.set()
            return
        self._started.set()
        try:
            self._receive()
        except Exception as error:  # noqa: BLE001 - reported to the consumer, then the thread ends
            log.exception("stream receiver failed")
            self._events.put(ReceiverError("internal", f"the stream receiver stopped: {error!r}"))
        finally:
            if self._series is not None:
                self._finish("stopped")
            self._final_counters = self._loop.counters()
            loop, self._loop = self._loop, None
            if loop.attached:
                loop.detach()
            loop.close()
            self._close_transport()
            self._drain_commands()

    # ---- transports (receiver thread) -----------------------------------------------------------

    def _open_libzmq(self) -> None:
        self._zmq_context = zmq.Context()
        self._zmq_socket = self._zmq_context.socket(zmq.PULL)
        self._zmq_socket.setsockopt(zmq.RCVHWM, self.receive_hwm)
        self._zmq_socket.setsockopt(zmq.LINGER, 0)
        self._zmq_monitor = self._zmq_socket.get_monitor_socket(_MONITOR_EVENTS)
        self._loop.set_socket(self._zmq_socket.underlying)
        self.transport = "libzmq"
        if self._connection_wanted:
            self._zmq_socket.connect(self.endpoint)
            self._zmq_connect_called = True

    def _close_transport(self) -> None:
        self._connected.clear()
        if self._connection is not None:
            self._connection.close()
            self._connection = None
        if self._zmq_monitor is not None:
            self._zmq_socket.disable_monitor()
            self._zmq_monitor.close(0)
            self._zmq_monitor = None
        if self._zmq_socket is not None:
            self._zmq_socket.close(0)
            self._zmq_socket = None
        if self._zmq_context is not None:
            self._zmq_context.term()
            self._zmq_context = None

    def _probe_idle_connection(self) -> None:
        """zmtp, not reading (idle): find out whether the DCU closed the connection meanwhile (a
        DCU restart), so that a connect() before the next arm makes a new one instead of trusting a
        dead one, whose loss would take the header the DCU sends at arm with it. A peek reads
        nothing: queued messages stay for the next arm."""
        connection = self._connection
        if connection is None or self._mode is not ReceiverMode.IDLE:
            return
        try:
            peeked = connection.recv(1, _socket.MSG_PEEK | _socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return  # open, nothing queued
        except OSError as error:
            self._drop_connection(error.strerror or type(error).__name__)
            return
        if not peeked or _peer_closed(connection):
            # queued bytes do not mean alive: a DCU that was killed after sending them closed
            # the connection behind them, and the header of the next arm will not come over it
            self._drop_connection("closed by the DCU while idle")

    def _want_connection(self) -> None:
        """Keep a connection up from now on (per_series: until idle again); zmtp tries at once."""
        if self._connection_wanted:
            return
        self._connection_wanted = True
        self._next_connect = 0.0
        if self.transport == "libzmq" and self._zmq_socket is not None and not self._zmq_connect_called:
            self._zmq_socket.connect(self.endpoint)
            self._zmq_connect_called = True

    def _disconnect(self) -> None:
        """per_series, idle: close the connection so that other consumers get the DCU's messages.
        What the regrouper holds of an unfinished message cannot go on in a new connection."""
        self._connection_wanted = False
        self._awaiting_end_of = None
        self._connected.clear()
        if self._connection is not None:
            dropped = self._loop.detach()
            self._connection.close()
            self._connection = None
            if dropped:
                log.warning("stream %s: disconnected with %d bytes of an unfinished message", self.endpoint, dropped)
        if self._zmq_socket is not None and self._zmq_connect_called:
            self._zmq_socket.disconnect(self.endpoint)
            self._zmq_connect_called = False
            self._zmq_socket.getsockopt(zmq.EVENTS)  # let libzmq go on with it (see _receive)
        self._framing.reset()
        self._route_messages()

    def _try_connect(self) -> None:
        """One connection attempt (zmtp transport) once the retry interval has passed; a failure
        is logged as a warning when its reason changes, and retried."""
        if time.monotonic() < self._next_connect:
            return
        try:
            connection = zmtp.connect(self._tcp, timeout=_CONNECT_TIMEOUT_S)
        except zmtp.ZmtpUnsupported as error:
            if self.requested_transport == "auto":
                log.warning("stream %s: %s; reading it through libzmq instead", self.endpoint, error)
                self._open_libzmq()
                return
            self._connect_failed(error)
            return
        except OSError as error:  # nobody listening yet, unreachable, or a broken handshake
            self._connect_failed(error)
            return
        self._connection = connection
        self._loop.attach(connection.fileno())
        self._connected.set()
        if self._connect_failures:
            log.info("stream %s: connected after %d failed attempt(s)", self.endpoint, self._connect_failures)
        self._connect_failures = 0
        self._last_connect_error = ""

    def _connect_failed(self, error: OSError) -> None:
        message = str(error) or type(error).__name__
        if message != self._last_connect_error:
            log.warning("stream %s: cannot connect (%s); retrying", self.endpoint, message)
        self._last_connect_error = message
        self._connect_failures += 1
        self._next_connect = time.monotonic() + _RECONNECT_S

    def _drop_connection(self, reason: str) -> None:
        """The zmtp connection failed or closed: forget it and reconnect at once; a series in
        progress goes on (its frames sent meanwhile are missing, as with libzmq)."""
        dropped = self._loop.detach()
        self._connection.close()
        self._connection = None
        self._connected.clear()
        self._disconnects += 1
        self._framing.reset()
        self._route_messages()
        log.warning("stream %s: connection lost (%s, %d bytes of an unfinished message dropped); reconnecting",
                    self.endpoint, reason, dropped)
        self._next_connect = 0.0

    def _read_monitor(self) -> None:
        """libzmq: what its socket monitor reported since the last look (no waiting)."""
        while self._zmq_monitor is not None:
            try:
                event = recv_monitor_message(self._zmq_monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            kind = event["event"]
            if kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                if self._zmq_connect_called:  # not the late report of a connection since closed
                    self._connected.set()
                    self._last_connect_error = ""
            elif kind == zmq.EVENT_DISCONNECTED:
                # libzmq reconnects by itself; what the old connection brought may still be queued
                # in the socket, so the regrouper is not reset here: a message the drop cut short
                # is counted when the next one starts
                if self._connected.is_set():
                    self._disconnects += 1
                self._connected.clear()
            elif kind == zmq.EVENT_CONNECT_RETRIED:
                self._last_connect_error = "nobody accepted the connection; libzmq retries"
            else:
                self._last_connect_error = "the ZeroMQ handshake with the peer failed (is it a PUSH socket " \
                                           "without security?)"

    @property
    def _reading(self) -> bool:
        """The socket is read: armed or listening, or (per_series) waiting for the end message of
        the series just completed before disconnecting."""
        return self._mode is not ReceiverMode.IDLE or self._awaiting_end_of is not None

    def _receive(self) -> None:
        loop = self._loop
        while not self._stopping.is_set():
            if self._zmq_monitor is not None:
                self._read_monitor()
            if self.transport == "zmtp" and self._connection is None and self._connection_wanted:
                self._try_connect()
                if self._connection is None and self.transport == "zmtp":
                    # not connected: answer commands until the next attempt, and let a series time out
                    wait = min(self.poll_interval, max(0.0, self._next_connect - time.monotonic()))
                    self._apply_commands(wait=max(wait, 1e-3))
                    self._sample_rates()
                    self._check_timeout()
                    continue
            if not self._reading:
                # Not reading is what keeps a header sent at the DCU's arm for the arm() to come.
                if self._zmq_socket is not None:
                    # libzmq does the steps of a disconnect (its TCP connection closes last) when
                    # the socket is called; asking for its events reads no message
                    self._zmq_socket.getsockopt(zmq.EVENTS)
                if self._zmq_monitor is not None and self._connection_wanted and not self._connected.is_set():
                    # a connect() waits: look at the monitor again soon
                    self._zmq_monitor.poll(self.poll_interval * 1000)
                    self._apply_commands()
                else:
                    self._apply_commands(wait=self.poll_interval)
                self._sample_rates()
                continue
            self._apply_commands()
            if not self._reading:
                continue
            if self.transport == "zmtp" and self._connection is None:  # not wanted (cannot be while reading)
                self._apply_commands(wait=self.poll_interval)
                continue
            if self._framing.ready:  # messages read before a mode change, or put back
                self._take_messages()
                self._check_timeout()
                continue
            event = loop.pump(self.poll_interval)
            self._sample_rates()
            if event == _receiver.EVENT_STACK_READY:
                self._hand_over()
            elif event == _receiver.EVENT_NEED_SLOT:
                self._assign_slot()
            elif event == _receiver.EVENT_MESSAGE:
                self._on_message(loop.take_message(), loop.message_kind)
            elif event == _receiver.EVENT_SERIES_COMPLETE:
                self._finish("complete")
            elif event == _receiver.EVENT_GROW:
                self._grow_bitmap()
            elif event == _receiver.EVENT_SOCKET_ERROR:
                if loop.attached:
                    self._drop_connection(os.strerror(loop.socket_errno))
                    continue
                self._events.put(ReceiverError("socket", f"ZeroMQ socket failed: {os.strerror(loop.socket_errno)}"))
                return
            self._check_timeout()

    def _apply_commands(self, wait: float = 0.0) -> None:
        """Run the queued commands; with ``wait``, block up to that long for the first one."""
        block = wait > 0
        while True:
            try:
                action, done = self._commands.get(timeout=wait) if block else self._commands.get_nowait()
            except queue.Empty:
                return
            block = False
            try:
                action()
            finally:
                done.set()

    def _drain_commands(self) -> None:
        while True:
            try:
                _action, done = self._commands.get_nowait()
            except queue.Empty:
                return
            done.set()

    def _sample_rates(self) -> None:
        now = time.monotonic()
        if now - self._last_rate_sample >= 0.05:
            self._last_rate_sample = now
            counters = self._loop.counters()
            self._frame_rate.add(counters[_C_INDEX["frames"]], now)
            self._byte_rate.add(counters[_C_INDEX["bytes"]], now)

    def _count(self, reason: str) -> None:
        with self._lock:
            self._python_errors[reason] = self._python_errors.get(reason, 0) + 1
        if self._series is not None:
            errors = self._series.python_errors
            errors[reason] = errors.get(reason, 0) + 1

    def _assign_slot(self) -> None:
        """Wait for a free slot; while none is free nothing is read, so ZeroMQ buffers up to its
        high-water mark and then the sender waits (back-pressure)."""
        while not self._stopping.is_set():
            slot = self._stacks.take_free_slot(self.poll_interval)
            if slot is not None:
                self._loop.set_slot(slot)
                # the sender was silent because we held it back: that is not inactivity
                self._loop.last_message_at = max(self._loop.last_message_at, time.monotonic())
                return
            self._apply_commands()
            if self._loop.pending_frame < 0:  # cancelled while waiting
                return

    def _grow_bitmap(self) -> None:
        series = self._series
        needed = self._loop.pending_frame + 1
        grown = np.zeros(max(needed, 2 * series.received.size), dtype=np.uint8)
        grown[:series.received.size] = series.received
        series.received = grown
        self._loop.set_bitmap(grown)

    def _check_timeout(self) -> None:
        series = self._series
        now = time.monotonic()
        if series is None:
            if self._mode is ReceiverMode.ARMED and now - self._armed_at >= self.timeout:
                # a header split over single-part messages waits for the next part to tell whether
                # an appendix follows; nothing came for that long: take it without one
                if self._framing.finish_held():
                    self._take_messages()
                    if self._series is not None:
                        return
                self._give_up_waiting_for_header()
            elif self._awaiting_end_of is not None and self._mode is ReceiverMode.IDLE \
                    and now >= self._awaiting_end_until:
                log.info("stream %s: no end message of series %d within %g s; disconnecting",
                         self.endpoint, self._awaiting_end_of, self.timeout)
                self._disconnect()
            return
        last = max(series.started_at, self._loop.last_message_at)
        if now - last >= self.timeout:
            self._finish("timeout")

    def _give_up_waiting_for_header(self) -> None:
        series_id = self._armed_series
        self._count("no_header")
        self._mode = ReceiverMode.IDLE
        self._armed_series = None
        self._events.put(ReceiverError(
            "no_header",
            f"series {series_id} armed but no header within {self.timeout:g} s: check that the detector "
            f"was armed for series {series_id}, that its stream is enabled (stream/config/mode) in the "
            f"format this receiver expects (stream v{self.stream_version}), and that {self.endpoint} is "
            f"the DCU's stream endpoint; the receiver is idle again"))
        if self.connection == "per_series":
            self._disconnect()

    def _hand_over(self) -> None:
        taken = self._loop.take_stack()
        if taken is None:
            return
        slot, frames, first, last = taken
        series = self._series
        shape = (0, 0)
        dtype = "uint16"
        encoding = "none"
        if self.stream_version == 2 and self._loop.last_height > 0:
            shape = (int(self._loop.last_height), int(self._loop.last_width))
            if self._loop.last_dtype_tag:
                dtype = dtype_of_tag(self._loop.last_dtype_tag).name
            encoding = _ALGORITHM_NAMES.get(self._loop.last_encoding, "none")
        elif series is not None and series.shape is not None:
            shape = series.shape
            dtype = series.dtype.name if series.dtype is not None else dtype
            encoding = series.encoding
        self._stacks.mark(slot, SlotState.READY, expected=(SlotState.FILLING,))
        handle = FrameStackHandle(
            segment=self._stacks.name, slot=slot, layout=self.layout, frames=frames, first_frame=first,
            last_frame=last, series=-1 if series is None else series.header.series_id,
            shape=shape, dtype=dtype, encoding=encoding)
        self._events.put(StackReady(handle))

    # ---- messages for Python --------------------------------------------------------------------

    def _on_message(self, parts: list[bytes], kind: int) -> None:
        """A ZeroMQ message the C loop did not take itself: regrouped into stream messages (v1,
        by content) and those taken in order."""
        loop = self._loop
        self._framing.add(parts, follows_image=loop.follows_v1_image)
        self._take_messages(kind)
        loop.follows_v1_image = self._framing.image_appendix_may_follow

    def _take_messages(self, kind: int = _receiver.MESSAGE_OTHER) -> None:
        """Take the whole messages the regrouper has, while the socket is to be read; the rest
        waits for the next arm()/listen() as if still queued in ZeroMQ."""
        framing = self._framing
        while self._reading:
            item = framing.take()
            if item is None:
                break
            if isinstance(item, StreamFormatError):
                self._count(item.reason)
                log.debug("dropped stream parts: %s", item)
                continue
            try:
                message = parse_v1_message(item) if self.stream_version == 1 else parse_v2_message(item[0])
            except StreamFormatError as error:
                self._count(error.reason)
                log.debug("dropped a stream message: %s", error)
                continue
            if self._mode is ReceiverMode.IDLE:  # per_series: waiting for the completed series' end
                if isinstance(message, SeriesEnd) and message.series_id == self._awaiting_end_of:
                    self._on_end(message)
                    self._disconnect()
                else:
                    # another series begins before that end came: stay connected (closing now
                    # would drop what is on its way) and keep this for the next arm()/listen()
                    framing.put_back(item)
                    self._awaiting_end_of = None
                break
            if isinstance(message, SeriesHeader):
                self._on_header(message)
            elif isinstance(message, SeriesEnd):
                self._on_end(message)
            elif isinstance(message, ImageFrame):
                self._on_image(message, item, kind)
        self._route_messages()

    def _route_messages(self) -> None:
        """Every message goes to Python while the regrouper holds something that the next one
        continues, or while waiting for a series' end (the C loop would take an image itself)."""
        if self._loop is not None:
            self._loop.route_to_python = self._framing.busy or self._awaiting_end_of is not None

    def _on_header(self, header: SeriesHeader) -> None:
        series_id = header.series_id
        if self._mode is ReceiverMode.ARMED and series_id != self._armed_series:
            self._count(self._other_series_reason(series_id))
            return
        if self._series is not None:
            if series_id == self._series.header.series_id:
                if self._series.announced:
                    self._series.announced = False  # the one header of the series: checked once
                    if _differs_from_announced(header, self._series.header):
                        self._count("header_mismatch")
                    return
                self._count("duplicate_header")
                return
            self._finish("superseded")
        self._newest_series = max(self._newest_series, series_id)
        expected = header.number_of_images or 0
        received = np.zeros(expected if expected > 0 else 1024, dtype=np.uint8)
        shape = header.shape
        check_shape = shape if (self.stream_version == 2 and shape is not None) else (0, 0)
        self._series = _Series(header=header, received=received, started_at=time.monotonic(),
                               counters_at_start=self._loop.counters(), shape=shape, dtype=header.dtype)
        self._loop.begin_series(series_id, expected, received, check_shape[0], check_shape[1])
        self._events.put(SeriesStarted(header))

    def _on_end(self, end: SeriesEnd) -> None:
        series = self._series
        if series is not None and end.series_id == series.header.series_id:
            self._finish("end_message")
        elif series is None and end.series_id == self._last_completed_series:
            # the DCU's end after the last expected frame had already completed the series; only
            # the first one: another end of that series is a stale message
            self._last_completed_series = None
        else:
            self._count(self._other_series_reason(end.series_id))

    def _other_series_reason(self, series_id: int) -> str:
        """Why a header or end of ``series_id`` is not taken: ``stale`` (an older series than the
        one received or armed for), ``wrong_series`` (a newer one), ``no_header`` (the end of the
        armed series whose header never came)."""
        series = self._series
        reference = series.header.series_id if series is not None else self._armed_series
        if reference is None or series_id < reference:
            return "stale"
        return "wrong_series" if series_id > reference else "no_header"

    def _on_image(self, frame: ImageFrame, parts: list[bytes], kind: int) -> None:
        series = self._series
        if series is None and self._mode is ReceiverMode.LISTENING and self._template is not None:
            if frame.series_id <= self._newest_series:
                self._count("stale")  # the tail of a series already ended here
                return
            self._on_header(replace(self._template, series_id=frame.series_id))
            self._series.announced = True
            series = self._series
        if series is not None and frame.series_id == series.header.series_id:
            if series.header.shape is not None and frame.shape != series.header.shape:
                self._count("shape_mismatch")
                return
            series.shape = frame.shape
            series.dtype = frame.dtype
            series.encoding = frame.encoding.algorithm.value
        try:
            tag = dtype_tag(frame.dtype)
        except ValueError:
            self._count("unsupported_dtype")
            return
        code = frame.encoding.algorithm.code
        if self.stream_version == 1 and series is not None and frame.series_id == series.header.series_id:
            # the frames that follow in this layout are taken by the C loop itself
            self._loop.set_v1_format(bytes(parts[1]), code, frame.encoding.elem_size, tag)
        if self._loop.offer_frame(frame.series_id, frame.frame_number, [data.blob for data in frame.data],
                                  code, frame.encoding.elem_size, tag):
            self._place_offered()

    def _place_offered(self) -> None:
        """Place the frame just offered before the next message is taken (the C loop holds one)."""
        loop = self._loop
        while True:
            event = loop.place_offered()
            if event == _receiver.EVENT_STACK_READY:
                self._hand_over()
            elif event == _receiver.EVENT_NEED_SLOT:
                self._assign_slot()
            elif event == _receiver.EVENT_GROW:
                self._grow_bitmap()
            elif event == _receiver.EVENT_SERIES_COMPLETE:
                self._finish("complete")
            else:
                return

    def _finish(self, reason: str) -> None:
        series = self._series
        if series is None:
            return
        self._hand_over()
        self._loop.drop_pending()
        ended_at = time.monotonic()
        expected = series.header.number_of_images or 0
        received = series.received
        if expected > 0:
            seen = received[:expected]
        else:
            got = np.flatnonzero(received)
            seen = received[:int(got[-1]) + 1] if got.size else received[:0]
        missing = np.flatnonzero(seen == 0).astype(np.int64)
        counters = self._loop.counters()
        errors = {name: counters[_C_INDEX[name]] - series.counters_at_start[_C_INDEX[name]]
                  for name in ("duplicate",) + _C_ERRORS}
        errors = {name: count for name, count in errors.items() if count}
        for name, count in series.python_errors.items():
            errors[name] = errors.get(name, 0) + count
        summary = SeriesSummary(
            series=series.header.series_id, expected_frames=expected or None,
            frames_received=int(self._loop.received_frames), missing_frames=missing, end_reason=reason,
            errors=MappingProxyType(errors), duration=ended_at - series.started_at, ended_at=ended_at)
        self._loop.end_series()
        self._series = None
        self._last_completed_series = summary.series if reason == "complete" else None
        self._missing_total += summary.missing
        self._series_finished += 1
        if self._mode is ReceiverMode.ARMED:
            self._mode = ReceiverMode.IDLE
            self._armed_series = None
            if self.connection == "per_series":
                if reason == "complete":
                    # the DCU sends the end message right after the last frame: take it before
                    # disconnecting, so that it does not go to the next consumer
                    self._awaiting_end_of = summary.series
                    self._awaiting_end_until = ended_at + self.timeout
                    self._route_messages()
                elif reason in ("end_message", "timeout"):
                    self._disconnect()
        self._events.put(SeriesFinished(summary))


_ALGORITHM_NAMES = {code: name for name, code in _receiver.ENCODING_IDS.items()}
