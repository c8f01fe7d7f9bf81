"""StreamReceiver: a thread that takes a DECTRIS ZeroMQ stream into shared-memory frame stacks.

The thread runs the compiled loop (``_receiver.StreamLoop``) with the GIL released; it comes back
here only for what needs Python: handing a stack over, finding a free slot (back-pressure),
series headers and ends, and the rare image whose layout the C code does not know. Consumers get
:class:`SeriesStarted`, :class:`StackReady`, :class:`SeriesFinished` and :class:`ReceiverError`
events from :meth:`StreamReceiver.next_event` and give each stack back with
:meth:`StreamReceiver.release`.

Transports: ``zmtp`` (the default for ``tcp://``) reads the TCP connection in this thread
(``zmtp.py``), ``libzmq`` through pyzmq's socket and libzmq's I/O thread.

Modes (docs/receiver.md has the whole picture): IDLE reads nothing, so ZeroMQ keeps what the DCU
sends (up to the socket buffers and the send high-water mark, then the DCU's send waits or drops) and a
series header sent at the DCU's arm is still there when :meth:`StreamReceiver.arm` comes; ARMED
drains other series' messages (counted ``stale``/``wrong_series``) until the armed series' header,
takes that one series and goes back to IDLE; LISTENING takes every series, one after the other.
"""
from __future__ import annotations

import enum
import logging
import os
import queue
import socket as _socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Union

import numpy as np
import zmq

from tango_dectris_live.allocator import tune_allocator
from tango_dectris_live.stream import (
    ImageFrame,
    SeriesEnd,
    SeriesHeader,
    StreamFormatError,
    parse_v1_message,
    parse_v2_message,
)

from . import _receiver, zmtp
from .native import function_addresses
from .framestack import FrameStackHandle, FrameStackLayout, SharedFrameStacks, SlotState, dtype_of_tag, dtype_tag
from .stats import RateWindow, ReceiverStats

log = logging.getLogger(__name__)

_LIBZMQ_FUNCTIONS = ("zmq_msg_init", "zmq_msg_recv", "zmq_msg_close", "zmq_msg_move", "zmq_msg_data",
                     "zmq_msg_size", "zmq_msg_more", "zmq_poll", "zmq_errno")
# Counters of the C loop that are errors (the others are plain totals).
_C_ERRORS = ("out_of_range", "wrong_series", "stale", "no_header", "truncated", "size_mismatch",
             "oversize", "shape_mismatch", "too_many_parts")
_C_INDEX = {name: i for i, name in enumerate(_receiver.COUNTER_NAMES)}

TRANSPORTS = ("auto", "zmtp", "libzmq")
_CONNECT_TIMEOUT_S = 0.5  # TCP connect + ZMTP handshake; the receiver thread waits this long at most
_RECONNECT_S = 0.1  # retry interval after a failed connection attempt (libzmq's default)


def libzmq_functions() -> dict[str, int]:
    """Addresses of the libzmq functions the C loop calls, from the libzmq pyzmq has loaded.

    Resolving through pyzmq's backend module finds its bundled libzmq (a dependency of that
    module), a system libzmq, or one linked into the module, and always the same instance that
    owns pyzmq's sockets (see cython/receiver.pyx for why this is not linked at build time).
    """
    from zmq.backend.cython import _zmq as backend

    return function_addresses(backend.__file__, _LIBZMQ_FUNCTIONS,
                              f"the compiled receiver needs libzmq >= 4.0 (pyzmq reports {zmq.zmq_version()})")


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
    header: SeriesHeader


@dataclass(frozen=True)
class StackReady:
    handle: FrameStackHandle


@dataclass(frozen=True)
class SeriesFinished:
    series: int
    summary: SeriesSummary


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
    """

    def __init__(self, endpoint: str, *, stream_version: int = 1, frame_shape: tuple[int, int] = (512, 512),
                 dtype: np.dtype | str = "uint16", num_slots: int | None = None, frame_stack_size: int | None = None,
                 bytes_per_frame: int | None = None, max_latency: float = 0.1, timeout: float = 10.0,
                 receive_hwm: int = 1000, poll_interval: float = 0.05, rate_window: float = 2.0,
                 coalesce: float = 200e-6, transport: str = "auto") -> None:
        if stream_version not in (1, 2):
            raise ValueError(f"stream_version must be 1 (legacy JSON) or 2 (CBOR), got {stream_version!r}")
        if max_latency <= 0 or timeout <= 0 or poll_interval <= 0:
            raise ValueError("max_latency, timeout and poll_interval must be positive seconds")
        if not 0.0 <= coalesce <= 0.01:
            raise ValueError(f"coalesce must be 0 to 0.01 seconds, got {coalesce!r}")
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {', '.join(TRANSPORTS)}, got {transport!r}")
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
        self.stream_version = stream_version
        self.layout = FrameStackLayout.for_frames(frame_shape, dtype, num_slots=num_slots,
                                                  frame_stack_size=frame_stack_size,
                                                  bytes_per_frame=bytes_per_frame)
        self.max_latency = max_latency
        self._timeout = float(timeout)
        self.receive_hwm = receive_hwm
        self.coalesce = float(coalesce)
        self.poll_interval = poll_interval
        self._rates = RateWindow(rate_window)
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

    def arm(self, series_id: int) -> None:
        """Active mode: take series ``series_id`` (the id the DCU's arm returned), then go idle.

        Call it after the DCU's arm: the header the DCU sent at arm is still queued in ZeroMQ.
        Messages of other series queued before it are drained and counted (``stale`` for older
        series, ``wrong_series`` for newer ones). Without that series' header within ``timeout``
        seconds a ``no_header`` :class:`ReceiverError` is emitted and the receiver goes idle.
        """
        if isinstance(series_id, bool) or not isinstance(series_id, (int, np.integer)) or series_id < 0:
            raise ValueError(f"arm() needs the series id the detector's arm returned (an integer >= 0), "
                             f"got {series_id!r}")
        series_id = int(series_id)

        def apply() -> None:
            if self._series is not None:
                self._finish("superseded")
            self._mode = ReceiverMode.ARMED
            self._armed_series = series_id
            self._armed_at = time.monotonic()
            self._loop.arm(series_id)
        self._command(apply)

    def listen(self) -> None:
        """Passive mode: take whichever series starts next, and the next one, again and again."""
        def apply() -> None:
            self._mode = ReceiverMode.LISTENING
            self._armed_series = None
            self._loop.arm(-1)
        self._command(apply)

    def cancel(self) -> None:
        """End the current series now (its summary says ``cancelled``) and go idle: the socket is
        not read until the next :meth:`arm` or :meth:`listen`."""
        def apply() -> None:
            if self._series is not None:
                self._finish("cancelled")
            self._mode = ReceiverMode.IDLE
            self._armed_series = None
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
        frames_per_second, bytes_per_second = self._rates.rates()
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
            frames_per_second=frames_per_second,
            megabytes_per_second=bytes_per_second / 1e6,
            backpressure_seconds=0.0 if stacks is None else stacks.backpressure_seconds,
            series_active=None if series is None else series.header.series_id,
            series_finished=self._series_finished,
            transport=self.transport,
            connected=self.transport == "libzmq" or self._connection is not None,
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
            else:
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
        self._zmq_socket.connect(self.endpoint)
        self._loop.set_socket(self._zmq_socket.underlying)
        self.transport = "libzmq"

    def _close_transport(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None
        if self._zmq_socket is not None:
            self._zmq_socket.close(0)
            self._zmq_socket = None
        if self._zmq_context is not None:
            self._zmq_context.term()
            self._zmq_context = None

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
        self._disconnects += 1
        log.warning("stream %s: connection lost (%s, %d bytes of an unfinished message dropped); reconnecting",
                    self.endpoint, reason, dropped)
        self._next_connect = 0.0

    def _receive(self) -> None:
        loop = self._loop
        while not self._stopping.is_set():
            if self.transport == "zmtp" and self._connection is None:
                self._try_connect()
                if self._connection is None and self.transport == "zmtp":
                    # not connected: answer commands until the next attempt, and let a series time out
                    wait = min(self.poll_interval, max(0.0, self._next_connect - time.monotonic()))
                    self._apply_commands(wait=max(wait, 1e-3))
                    self._sample_rates()
                    self._check_timeout()
                    continue
            if self._mode is ReceiverMode.IDLE:
                # Not reading is what keeps a header sent at the DCU's arm for the arm() to come.
                self._apply_commands(wait=self.poll_interval)
                self._sample_rates()
                continue
            self._apply_commands()
            if self._mode is ReceiverMode.IDLE:
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
            self._rates.add(now, counters[_C_INDEX["frames"]], counters[_C_INDEX["bytes"]])

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
                self._give_up_waiting_for_header()
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
        try:
            if self.stream_version == 1:
                message = parse_v1_message(parts)
            else:
                message = parse_v2_message(parts[0])
        except StreamFormatError as error:
            self._count(error.reason)
            log.debug("dropped a stream message: %s", error)
            return
        if isinstance(message, SeriesHeader):
            self._on_header(message)
        elif isinstance(message, SeriesEnd):
            self._on_end(message)
        elif isinstance(message, ImageFrame):
            self._on_image(message, parts, kind)

    def _on_header(self, header: SeriesHeader) -> None:
        series_id = header.series_id
        if self._mode is ReceiverMode.ARMED and series_id != self._armed_series:
            self._count(self._other_series_reason(series_id))
            return
        if self._series is not None:
            if series_id == self._series.header.series_id:
                self._count("duplicate_header")
                return
            self._finish("superseded")
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
        if self.stream_version == 1 and kind == _receiver.MESSAGE_NEW_FORMAT and series is not None \
                and frame.series_id == series.header.series_id:
            self._loop.set_v1_format(bytes(parts[1]), code, frame.encoding.elem_size, tag)
        self._loop.offer_frame(frame.series_id, frame.frame_number, [data.blob for data in frame.data],
                               code, frame.encoding.elem_size, tag)

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
        self._events.put(SeriesFinished(summary.series, summary))


_ALGORITHM_NAMES = {code: name for name, code in _receiver.ENCODING_IDS.items()}
