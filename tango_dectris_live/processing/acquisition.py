"""Live acquisitions: the detector, the stream receiver and the analyses of one device, together.

:class:`LiveAcquisition` runs **active** acquisitions (it sets the scan size on the DCU, arms,
receives, processes, sends the software triggers) and **passive** ones (it processes every series
that someone else arms -- vendor GUI, a script, a Sardana macro -- one after the other, until told
to stop). It is Tango-free: the device turns its commands into calls here and publishes what
``on_update`` hands it (progress while data arrives, at most ``event_rate`` times per second, and
one final update per series that is never skipped).

Threads: a *session* thread per acquisition (arms, triggers, waits for the series) and one
*publisher* thread, the only one that calls ``on_update``: rate-limited intermediate results and
progress, and the final result and end of each session, which the session thread hands it and
waits for. Commands from any thread only set flags and send the DCU its cancel/abort; they never
wait for the pipeline. The SIMPLON side of a series is :class:`~.series_control.SeriesControl`;
what it runs on (receiver, frame source, worker pool) comes from a pipeline factory
(:class:`~.pipeline_factory.StreamPipelineFactory`, or in-memory frames in tests).
"""
from __future__ import annotations

import enum
import logging
import math
import os
import queue
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from tango_dectris_live.receiver import (CONNECTIONS, TRANSPORTS, FrameStackLayout, RateMeter, ReceiverMode,
                                         StreamConnectError,
                                         StreamReceiver)  # noqa: F401 - StreamReceiver: the type of _receiver
from tango_dectris_live.simplon.client import DetectorClient
from tango_dectris_live.simplon.errors import SimplonError

from .analyses import AnalysisParameters, AnalysisRegistry
from .announcement import SeriesAnnouncement
from .limits import (MAX_SERIES_TIMEOUT, MachineLimits, check_beam_center, check_choice, check_config_reuse,
                     check_event_rate, check_images_per_trigger, check_nav_shape, check_radii, check_series_timeout,
                     check_tuning, check_whole_numbers, check_workers)
from .live_dataset import ReceiverFrameSource
from .partials import PartialResults
from .pipeline_factory import StreamPipelineFactory
from .runner import LiveRunner, SeriesRun
from .series_saving import SeriesSaving
from .series_control import EXTERNAL_TRIGGER_MODES, SeriesControl, StreamGeometry
from .snapshot import ResultSnapshot, RunState

log = logging.getLogger(__name__)

# The session thread waits on events (Stop, Abort, the series' start, a receiver error, the
# run's end); this only bounds the wait should an event ever be missed.
_SAFETY_WAKE = 2.0
_CANCEL_GRACE = 2.0  # after a Stop, how long the DCU's own end of series may take to arrive
# Automatic series timeout (series_timeout 0): the DCU sends the header at arm, whatever the
# trigger mode, so it gets a short bound; frames then get a bound from the frame time (internal
# triggers) or from the whole series' duration (external triggers: the first may come late).
HEADER_TIMEOUT = 10.0
FRAME_TIMEOUT_INTERNAL = 10.0  # + 10 frame times
FRAME_TIMEOUT_EXTERNAL = 60.0  # + the series' duration at the frame time
# node role: how long a prepared node waits for the merging device's NodeArm before it gives up
NODE_ARM_TIMEOUT = 30.0
# node role: partial results (whole-scan buffers) sent at most this often while a series runs
PARTIAL_RATE = 4.0
# ... or sooner, when the stream has paused this long and the node processed all it received
STREAM_PAUSE = 0.05


class AcquisitionMode(str, enum.Enum):
    IDLE = "idle"
    ACTIVE = "active"  # this device arms and triggers
    PASSIVE = "passive"  # someone else arms; every series is processed
    NODE = "node"  # a share of a series, for a merging device (it arms; this one takes what reaches it)


class AcquisitionBusyError(RuntimeError):
    """An acquisition is already running (Stop or Abort it first)."""


@dataclass(frozen=True)
class PipelineSettings:
    """The tuning parameters; 0 means "computed from the detector geometry"."""

    workers: int = 0
    num_slots: int = 0
    bytes_per_frame: int = 0
    frame_stack_size: int = 0
    frames_per_partition: int = 0

    def __post_init__(self) -> None:
        check_whole_numbers(workers=self.workers)
        check_tuning(self.num_slots, self.bytes_per_frame, self.frame_stack_size, self.frames_per_partition)

    def resolved(self, frame_shape: tuple[int, int], dtype: str) -> PipelineSettings:
        """Concrete values for frames of ``frame_shape``/``dtype``: what is 0 gets its default."""
        layout = FrameStackLayout.for_frames(
            frame_shape, dtype, num_slots=self.num_slots or None,
            frame_stack_size=self.frame_stack_size or None, bytes_per_frame=self.bytes_per_frame or None)
        return PipelineSettings(
            workers=self.workers or default_workers(),
            num_slots=layout.num_slots, bytes_per_frame=layout.bytes_per_frame,
            frame_stack_size=layout.frame_stack_size,
            frames_per_partition=self.frames_per_partition or layout.frame_stack_size)


def default_workers() -> int:
    """Two workers at least (decode runs in parallel with the merge), one core left for the receiver."""
    return max(2, min(16, (os.cpu_count() or 2) - 1))


@dataclass(frozen=True)
class AcquisitionRequest:
    """What to compute: analyses by registered name, their parameters, the scan shape."""

    analyses: tuple[str, ...]
    parameters: AnalysisParameters = AnalysisParameters()
    nav_shape: tuple[int, ...] | None = None
    images_per_trigger: int = 0  # 0: automatic (series_control.scan_triggers)


@dataclass(frozen=True)
class AcquisitionProgress:
    """The progress scalars the device publishes."""

    mode: AcquisitionMode
    series_id: int = -1
    frames_expected: int = 0
    frames_received: int = 0
    frames_processed: int = 0
    frames_missing: int = 0
    receive_rate: float = 0.0
    process_rate: float = 0.0
    backlog: int = 0
    message: str = "idle"
    hint: str = ""  # where the bottleneck is, from the telemetry ("" when nothing stands out)
    transport: str = ""  # how the receiver reads the stream: zmtp or libzmq ("" before the first acquisition)
    # stream messages the receiver rejected since the series was armed/listened for, by reason
    rejected: tuple[tuple[str, int], ...] = ()
    saving_status: str = ""  # what the saving of series files does or did, in words
    saving_problem: str = ""  # why the last series was not (completely) saved ("" when it was)
    last_saved_file: str = ""
    frames_saved: int = 0  # of the series being saved (or the last one)
    saving_rate: float = 0.0  # MB/s
    # Start/Listen sessions over since the object was made, whatever their outcome: a client that
    # started one waits for this to grow (a failed Start publishes no final result to wait on)
    acquisitions_ended: int = 0
    # merging role: per node, what it did for the series (or why it was left out), in words
    nodes: tuple[str, ...] = ()

    @property
    def messages_rejected(self) -> int:
        return sum(count for _name, count in self.rejected)

    @property
    def rejected_by_reason(self) -> list[str]:
        return [f"{name}: {count}" for name, count in self.rejected]

    @property
    def progress(self) -> float:
        """Percent of the scan processed."""
        return 100.0 * self.frames_processed / self.frames_expected if self.frames_expected else 0.0


@dataclass(frozen=True)
class AcquisitionUpdate:
    """Handed to ``on_update``: the progress and, when results changed, a snapshot of them."""

    progress: AcquisitionProgress
    snapshot: ResultSnapshot | None
    final: bool
    partial: PartialResults | None = None  # node role: the raw buffers for the merging device


UpdateCallback = Callable[[AcquisitionUpdate], None]


class BottleneckMeter:
    """Reads the receiver's telemetry for the part of the pipeline that cannot keep up.

    The receiver waiting for a free slot (back-pressure) while the slots are full means the
    workers are saturated; a full backlog without back-pressure is a burst being absorbed."""

    def __init__(self, window: float = 2.0) -> None:
        self._window = window
        self._last: tuple[float, float] | None = None  # (time, back-pressure seconds)
        self._hint = ""

    def update(self, stats: Any, now: float | None = None, writer_backlog: int = 0) -> str:
        now = time.monotonic() if now is None else now
        if self._last is None or now - self._last[0] >= self._window:
            waited = 0.0 if self._last is None else stats.backpressure_seconds - self._last[1]
            span = self._window if self._last is None else now - self._last[0]
            self._last = (now, stats.backpressure_seconds)
            self._hint = self.diagnose(waited / span if span > 0 else 0.0, stats.slots_in_use, stats.slots_total,
                                       writer_backlog)
        return self._hint

    @staticmethod
    def diagnose(waiting_share: float, slots_in_use: int, slots_total: int, writer_backlog: int = 0) -> str:
        """``writer_backlog``: stacks waiting for the series file's writer (they hold their slots)."""
        busy = waiting_share > 0.05 or slots_in_use >= max(2, slots_total * 3 // 4)
        if slots_total and busy and writer_backlog * 2 >= max(2, slots_in_use):
            return (f"saving behind: {writer_backlog} of the {slots_in_use}/{slots_total} slots in use wait for the "
                    f"series file's writer (the disk, or HDF5's time per frame); the receiver waited "
                    f"{waiting_share:.0%} of the time for a free slot: save results only, or a faster disk")
        if slots_total and waiting_share > 0.05:
            return (f"workers saturated: the receiver waited {waiting_share:.0%} of the time for a free "
                    f"slot ({slots_in_use}/{slots_total} in use); add workers, select fewer analyses, or "
                    f"raise frame_stack_size")
        if slots_total and slots_in_use >= max(2, slots_total * 3 // 4):
            return f"backlog high ({slots_in_use}/{slots_total} slots): processing is falling behind"
        return ""


class LiveAcquisition:
    """Active and passive live acquisitions of one detector.

    ``stream_host``: where the DCU's stream is (usually the DCU's host); ``stream_ports``: the port
    of each stream version ({1: 9999, 2: 31001}).
    """

    def __init__(self, detector: DetectorClient, stream_host: str, stream_ports: Mapping[int, int], *,
                 registry: AnalysisRegistry | None = None, settings: PipelineSettings = PipelineSettings(),
                 event_rate: float = 10.0, on_update: UpdateCallback | None = None,
                 series_timeout: float = 0.0, worker_start_method: str = "spawn", config_reuse: float = 0.0,
                 saving: SeriesSaving | None = None,
                 transport: str = "auto", connection: str = "per_series",
                 pipeline_factory: Any = None, result_counts: Mapping[str, int] | None = None) -> None:
        self.connection = connection  # validated by the setter below
        # StreamReceiver's transport (auto: zmtp for tcp://, libzmq fallback)
        self.transport = check_choice("StreamTransport", transport, TRANSPORTS)
        self.detector = detector
        self.control = SeriesControl(detector)
        self.pipeline_factory = pipeline_factory if pipeline_factory is not None else \
            StreamPipelineFactory(stream_host, stream_ports, worker_start_method)
        self.registry = registry if registry is not None else AnalysisRegistry.discover()
        self.settings = settings
        self.saving = saving if saving is not None else SeriesSaving()
        self.on_update = on_update
        self._series_timeout = 0.0
        self.series_timeout = series_timeout
        self._config_reuse = 0.0
        self.config_reuse = config_reuse
        self._event_rate = 10.0
        self.event_rate = event_rate
        self._lock = threading.RLock()
        self._publish_requests: queue.SimpleQueue[_PublishRequest] = queue.SimpleQueue()
        self._mode = AcquisitionMode.IDLE
        self._session: threading.Thread | None = None
        self._stop = threading.Event()
        self._abort = threading.Event()
        # set by whatever the session thread following a series must look at: a Stop or Abort,
        # the series' start, a receiver error, the run's end
        self._wakeup = threading.Event()
        self._closing = threading.Event()
        self._receiver: StreamReceiver | None = None
        self._receiver_key: tuple | None = None
        self._source: ReceiverFrameSource | None = None
        self._runner: LiveRunner | None = None
        self._run: SeriesRun | None = None
        self._received_at_start = 0
        self._message = "idle"
        self._last_error: str | None = None
        self._last_final: ResultSnapshot | None = None
        self._final_received = 0
        self._trigger_mode = ""
        self._published_processed = -1
        self._published_progress: AcquisitionProgress | None = None
        self._process_meter = RateMeter()
        self._bottleneck = BottleneckMeter()
        self._series_started_at = 0.0
        self._series_completed = 0
        self._sessions_ended = 0
        self._armed_series: int | None = None  # armed by us and not yet disarmed (active mode)
        # results per analysis; found by a trial run on blank frames unless the owner knows them
        self._result_counts: dict[str, int] = dict(result_counts or {})
        self._start_geometry: StreamGeometry | None = None  # read by the Start/Listen that checked it
        self._errors_at_arm: dict[str, int] = {}
        self._messages_at_arm = 0
        self._frame_time = 0.0
        self._resolved_settings = settings
        # node role: the announced series, its arm (NodeArm) and the merging device's NodeFinish
        self._announced: SeriesAnnouncement | None = None
        self._node_series: int | None = None
        self._node_armed = threading.Event()
        self._node_received_before = 0
        self._drain = threading.Event()
        self._drain_quiet = 0.0
        self._drain_series: int | None = None
        self._partial_sequence = 0
        self._partial_sent_at = 0.0
        self._partial_processed = -1
        self._publisher = threading.Thread(target=self._publish_loop, name="live-results-publisher", daemon=True)
        self._publisher.start()

    # ---- settings -----------------------------------------------------------------------------

    @property
    def event_rate(self) -> float:
        return self._event_rate

    @event_rate.setter
    def event_rate(self, rate: float) -> None:
        self._event_rate = check_event_rate(rate)

    @property
    def connection(self) -> str:
        """When the receiver is connected to the DCU's stream: ``per_series`` (only while a series
        is armed or listened for: other consumers get whole series while this one is idle) or
        ``always``. Applies from the next Start/Listen."""
        return self._connection

    @connection.setter
    def connection(self, policy: str) -> None:
        self._connection = check_choice("stream_connection", policy, CONNECTIONS)

    @property
    def series_timeout(self) -> float:
        """Seconds an armed series may wait for its header, then for each next frame, before it
        ends with a 'no data' error; 0: automatic (see :meth:`header_timeout`, :meth:`frame_timeout`)."""
        return self._series_timeout

    @series_timeout.setter
    def series_timeout(self, seconds: float) -> None:
        self._series_timeout = check_series_timeout(seconds)

    @property
    def config_reuse(self) -> float:
        """Seconds a DCU setting this client read (or wrote and re-read) may serve a Start again
        instead of a new GET; 0: read at every Start. A change through this device is always
        seen; one by another client only once the value is older than this."""
        return self._config_reuse

    @config_reuse.setter
    def config_reuse(self, seconds: float) -> None:
        self._config_reuse = check_config_reuse(seconds)

    def header_timeout(self) -> float:
        return self._series_timeout or HEADER_TIMEOUT

    def frame_timeout(self, trigger_mode: str, frame_time: float, count: int) -> float:
        """The bound on the silence between two frames of a series."""
        if self._series_timeout:
            return self._series_timeout
        frame_time = frame_time if math.isfinite(frame_time) and frame_time > 0 else 0.0
        if trigger_mode in EXTERNAL_TRIGGER_MODES:
            return min(MAX_SERIES_TIMEOUT, FRAME_TIMEOUT_EXTERNAL + frame_time * max(1, count))
        return FRAME_TIMEOUT_INTERNAL + 10 * frame_time

    @property
    def mode(self) -> AcquisitionMode:
        return self._mode

    @property
    def busy(self) -> bool:
        """An acquisition runs: from Start/Listen until its session has published that it ended
        (a client that sees the device idle may Start at once, while that thread returns)."""
        return self._mode is not AcquisitionMode.IDLE

    @property
    def last_error(self) -> str | None:
        return self._last_error

    @property
    def series_completed(self) -> int:
        """Series processed to the end since this object was made (passive mode counts each)."""
        return self._series_completed

    def prepare(self) -> None:
        """Start the worker processes now (they take seconds to start) rather than at the first series."""
        with self._lock:
            self._ensure_runner(self.settings.workers or default_workers())

    # ---- commands (any thread; they return at once) ----------------------------------------------

    def start(self, request: AcquisitionRequest) -> None:
        """Active acquisition: configure the scan, arm, receive, process, trigger (ints/inte)."""
        self._begin(AcquisitionMode.ACTIVE, request)

    def listen(self, request: AcquisitionRequest) -> None:
        """Passive acquisitions: process every series armed by someone else until :meth:`stop`."""
        self._begin(AcquisitionMode.PASSIVE, request)

    # ---- node role: a share of a series for a merging device -------------------------------------

    def node_prepare(self, announcement: SeriesAnnouncement) -> None:
        """Node role, before the merging device arms the DCU: build the receiver and workers for
        the announced series and connect to the stream; returns once connected (the DCU deals
        messages only to consumers connected when it sends them). :meth:`node_arm` follows."""
        self._node_begin(announcement, self._run_node)

    def node_listen(self, announcement: SeriesAnnouncement) -> None:
        """Node role, passive (the merging device listens): take every series someone else arms,
        one after the other, each from its header or, without it, from its first image and the
        ``announcement`` (the DCU's configuration), until Stop; :meth:`node_finish` ends each."""
        self._node_begin(announcement, self._run_node_passive)

    def _node_begin(self, announcement: SeriesAnnouncement, target: Callable[[AcquisitionRequest], None]) -> None:
        request = AcquisitionRequest(announcement.analyses, announcement.parameters, announcement.nav_shape)
        request = self.check_request(request, self.settings, announcement.geometry)
        with self._lock:
            if self.busy:
                raise AcquisitionBusyError(f"a {self._mode.value} acquisition is running; Stop or Abort it first")
            self._stop.clear()
            self._abort.clear()
            self._drain.clear()
            self._drain_series = None
            self._empty_final = None
            self._node_armed.clear()
            self._node_series = None
            self._last_error = None
            self._announced = announcement
            self._start_geometry = announcement.geometry
            self._mode = AcquisitionMode.NODE
            self._series_started_at = time.monotonic()
            self._message = "node: preparing the receiver and the workers"
        try:
            self._prepare_pipeline(enable_stream=False)
            self._trigger_mode = announcement.trigger_mode
            self._frame_time = announcement.frame_time
            self._receiver.timeout = self.header_timeout()
            self._mark_errors()
            self._receiver.connect(timeout=self.header_timeout())
        except Exception as error:
            self._last_error = f"{type(error).__name__}: {error}"
            self._message = f"node: not prepared: {error}"
            self._mode = AcquisitionMode.IDLE
            self._sessions_ended += 1
            self._request_publish()
            raise
        self._message = "node: connected, waiting for the merging device's arm"
        with self._lock:
            self._session = threading.Thread(target=self._session_main, args=(target, request),
                                             name="acquisition-node", daemon=True)
            self._session.start()

    def node_arm(self, series: int) -> None:
        """Node role: the DCU was armed for ``series``: take its frames that reach this node."""
        announcement = self._announced
        if self._mode != AcquisitionMode.NODE or announcement is None or self._node_armed.is_set():
            raise AcquisitionBusyError("NodeArm needs a prepared node (NodePrepare first, one NodeArm per series)")
        # frames may come before the session thread starts the run: counted from here
        self._node_received_before = self._receiver.stats().frames_received
        self._receiver.arm(int(series), announcement.header(series))
        self._node_series = int(series)
        self._node_armed.set()
        self._wakeup.set()

    def node_finish(self, quiet: float, series: int) -> None:
        """Node role: series ``series`` is over elsewhere (its end reached another node, or every
        frame is accounted for): end it once no stream message came for ``quiet`` seconds (what
        this node still has queued is taken first), publish the final partial results -- empty
        ones when this node got nothing of the series (passive: it may never have started it)."""
        if not math.isfinite(quiet) or quiet < 0 or quiet > MAX_SERIES_TIMEOUT:
            raise ValueError(f"NodeFinish: quiet time {quiet} s must be within 0..{MAX_SERIES_TIMEOUT:g} s")
        if self._mode != AcquisitionMode.NODE:
            return  # ended already (this node had the end message, or was stopped)
        run = self._run
        if run is not None and run.series is not None and run.series > series:
            self._publish_empty_final(series)  # this node is on a newer series already
            return
        self._drain_quiet = float(quiet)
        self._drain_series = int(series)
        self._drain.set()
        self._wakeup.set()

    def _publish_empty_final(self, series: int) -> None:
        """Node role: tell the merging device that this node has no frame of ``series``. Not
        waited for: the caller may be a Tango command, which holds the device the publisher pushes on."""
        announcement = self._announced
        self._partial_sequence += 1
        partial = PartialResults(series=int(series), state=RunState.FINISHED.value, end_seen=False,
                                 frames_received=0, frames_processed=0, analyses=tuple(announcement.analyses),
                                 done=np.zeros(announcement.number_of_images, bool), buffers=(),
                                 sequence=self._partial_sequence)
        self._publish_requests.put(_PublishRequest(None, partial))

    def _run_node_passive(self, request: AcquisitionRequest) -> None:
        announcement = self._announced
        template = announcement.header(0)
        self._receiver.listen(template)
        self._receiver.timeout = self.frame_timeout(announcement.trigger_mode, announcement.frame_time,
                                                    announcement.number_of_images)
        try:
            while not (self._stop.is_set() or self._abort.is_set()):
                self._message = "node: listening for a series armed by someone else"
                run = self._process(self._source, request, request.parameters, request.nav_shape, None)
                self._follow(run)
                self._drain.clear()
                if not (self._stop.is_set() or self._abort.is_set()) and \
                        self._receiver.mode is not ReceiverMode.LISTENING:
                    self._receiver.listen(template)
        finally:
            if self._receiver is not None and self._receiver.running:
                self._receiver.cancel()

    def _run_node(self, request: AcquisitionRequest) -> None:
        announcement = self._announced
        while not self._node_armed.wait(min(_SAFETY_WAKE, NODE_ARM_TIMEOUT)):
            if self._stop.is_set() or self._abort.is_set() or self._drain.is_set():
                self._message = "node: stopped before the merging device armed"
                self._receiver.cancel()
                return
            if self._session_age() > NODE_ARM_TIMEOUT:
                self._last_error = f"the merging device did not arm within {NODE_ARM_TIMEOUT:g} s of NodePrepare"
                self._message = f"node: {self._last_error}"
                self._receiver.cancel()
                return
        series = self._node_series
        run = self._process(self._source, request, request.parameters, request.nav_shape, series,
                            self._node_received_before)
        self._receiver.timeout = self.frame_timeout(announcement.trigger_mode, announcement.frame_time,
                                                    announcement.number_of_images)
        self._message = f"series {series}: node receiving and processing its share"
        self._follow(run)

    def _session_age(self) -> float:
        return time.monotonic() - self._series_started_at

    def node_partial(self, run: SeriesRun | None, final: ResultSnapshot | None = None) -> PartialResults | None:
        """The partial results of ``run`` to send the merging device (node role)."""
        if run is None:
            return None
        summary = self._source.last_summary if self._source is not None else None
        end_seen = final is not None and summary is not None and summary.series == final.series and \
            summary.end_reason in ("end_message", "complete")
        received = self._final_received if final is not None else \
            max(0, self._receiver.stats().frames_received - self._received_at_start)
        self._partial_sequence += 1
        # what this node's receiver refused (a header that contradicts the announcement, ...)
        rejected = dict(self._rejected_since_arm(self._receiver.stats()))
        return run.partial(end_seen=end_seen, frames_received=received, sequence=self._partial_sequence,
                           extra={"rejected": rejected} if rejected else {})

    def stop(self) -> None:
        """Graceful: the DCU cancels (active mode), what arrived is processed and published."""
        if not self.busy:
            return
        self._stop.set()
        self._wakeup.set()
        if self._mode == AcquisitionMode.ACTIVE:
            self.control.tell("cancel", self.detector.cancel)

    def abort(self) -> None:
        """At once: the DCU aborts (active mode), pending frames are dropped; results so far are published."""
        if not self.busy:
            return
        self._abort.set()
        self._wakeup.set()
        if self._mode == AcquisitionMode.ACTIVE:
            self.control.tell("abort", self.detector.abort)
        run = self._run
        if run is not None:
            run.abort()

    def wait(self, timeout: float | None = None) -> bool:
        """True once no acquisition runs (False if one still does after ``timeout`` seconds)."""
        session = self._session
        if session is not None:
            session.join(timeout)
            return not session.is_alive()
        return True

    def close(self) -> None:
        """Abort what runs, stop the publisher, the receiver and the worker processes (idempotent)."""
        self.abort()
        self.wait(30)
        self._closing.set()
        self._publisher.join(10)
        self.saving.close()
        with self._lock:
            if self._receiver is not None:
                self._receiver.stop()
                self._receiver = None
            if self._runner is not None:
                self._runner.close()
                self._runner = None

    # ---- state for the device ---------------------------------------------------------------------

    def progress(self) -> AcquisitionProgress:
        """Counters of the series being processed or, while waiting for the next one, of the last."""
        run, receiver, final = self._run, self._receiver, self._last_final
        stats = receiver.stats() if receiver is not None else None
        saving = self.saving.status()
        common = dict(mode=self._mode, message=self._message, saving_status=self.saving.status_text(saving),
                      saving_problem=self.saving.problem(saving),
                      last_saved_file=self.saving.last_file,
                      frames_saved=saving.frames_saved if saving is not None else 0,
                      saving_rate=round(saving.megabytes_per_second, 1) if saving is not None else 0.0,
                      receive_rate=stats.frames_per_second if stats is not None else 0.0,
                      backlog=stats.slots_in_use if stats is not None else 0,
                      hint=self._bottleneck.update(stats, writer_backlog=saving.backlog if saving is not None else 0)
                      if stats is not None else "",
                      transport=stats.transport if stats is not None else "",
                      rejected=self._rejected_since_arm(stats), acquisitions_ended=self._sessions_ended)
        if run is not None and run.series is not None and not (final is not None and final.series == run.series):
            expected, processed = run.counters()
            received = max(0, stats.frames_received - self._received_at_start) if stats is not None else 0
            return AcquisitionProgress(series_id=run.series, frames_expected=expected, frames_received=received,
                                       frames_processed=processed, process_rate=self._process_meter.add(processed),
                                       **common)
        if final is not None:
            return AcquisitionProgress(series_id=final.series, frames_expected=final.frames_expected,
                                       frames_received=self._final_received, frames_processed=final.frames_processed,
                                       frames_missing=final.frames_missing, **common)
        return AcquisitionProgress(**common)

    def snapshot(self) -> ResultSnapshot | None:
        """The results of the series being processed, or of the last one."""
        run = self._run
        return run.snapshot() if run is not None else self._last_final

    def receiver_errors(self) -> dict[str, int]:
        receiver = self._receiver
        return dict(receiver.stats().errors) if receiver is not None else {}

    def _rejected_since_arm(self, stats: Any) -> tuple[tuple[str, int], ...]:
        """The receiver's error counters that grew since the series was armed or listened for."""
        if stats is None:
            return ()
        before = self._errors_at_arm
        grown = ((name, count - before.get(name, 0)) for name, count in sorted(stats.errors.items()))
        return tuple((name, n) for name, n in grown if n > 0)

    def _mark_errors(self) -> None:
        receiver = self._receiver
        stats = receiver.stats() if receiver is not None else None
        self._errors_at_arm = dict(stats.errors) if stats is not None else {}
        self._messages_at_arm = stats.messages_received if stats is not None else 0

    def _rejected_text(self) -> str:
        rejected = self._rejected_since_arm(self._receiver.stats() if self._receiver is not None else None)
        if not rejected:
            return "no message was rejected"
        return "rejected: " + ", ".join(f"{name} {count}" for name, count in rejected)

    # ---- the session ----------------------------------------------------------------------------

    def result_count(self, analyses: tuple[str, ...]) -> int:
        """How many results the analyses publish (an upper bound on the scan-shaped ones)."""
        for name in analyses:
            if name not in self._result_counts:
                self._result_counts[name] = len(self.registry.result_names(name))
        return sum(self._result_counts[name] for name in analyses)

    def check_request(self, request: AcquisitionRequest, settings: PipelineSettings,
                      geometry: StreamGeometry | None = None) -> AcquisitionRequest:
        """Every setting of an acquisition against this machine and (with ``geometry``) the
        detector's frames; raises :class:`~.limits.SettingRefused` naming the limit."""
        names = self.registry.validate(request.analyses)  # unknown names fail here, in the caller
        request = replace(request, analyses=tuple(names))
        machine = MachineLimits.of_this_machine()
        check_workers(settings.workers, machine)
        nav_shape = check_nav_shape(request.nav_shape, self.result_count(request.analyses), machine)
        frame_shape = geometry.frame_shape if geometry is not None else None
        parameters = request.parameters
        check_radii(parameters.bf_radius, parameters.adf_inner_radius, parameters.adf_outer_radius, frame_shape)
        if parameters.beam_centre is not None:
            check_beam_center((parameters.beam_centre[1], parameters.beam_centre[0]), frame_shape)
        check_tuning(settings.num_slots, settings.bytes_per_frame, settings.frame_stack_size,
                     settings.frames_per_partition, frame_shape,
                     geometry.dtype if geometry is not None else "uint16", machine)
        check_images_per_trigger(request.images_per_trigger, nav_shape)
        return replace(request, nav_shape=nav_shape)

    def _begin(self, mode: AcquisitionMode, request: AcquisitionRequest) -> None:
        # active: the DCU's settings read for the last Start may serve again (config_reuse; a
        # step scan then reads them once, not at every point); passive: someone else sets them
        self.control.reuse_for = self._config_reuse if mode == AcquisitionMode.ACTIVE else 0.0
        try:
            geometry = self.stream_geometry()
        except SimplonError as error:
            raise SimplonError(f"cannot start: the detector's frame size and stream format could not be "
                               f"read from the DCU: {error}") from error
        request = self.check_request(request, self.settings, geometry)
        self._start_geometry = geometry
        with self._lock:
            if self.busy:
                raise AcquisitionBusyError(f"a {self._mode.value} acquisition is running; Stop or Abort it first")
            self._stop.clear()
            self._abort.clear()
            self._last_error = None
            self._mode = mode
            self._message = "starting: preparing the receiver and the workers"
            target = self._run_active if mode == AcquisitionMode.ACTIVE else self._run_passive
            self._session = threading.Thread(target=self._session_main, args=(target, request),
                                             name=f"acquisition-{mode.value}", daemon=True)
            self._session.start()

    def _session_main(self, target: Callable[[AcquisitionRequest], None], request: AcquisitionRequest) -> None:
        try:
            target(request)
        except Exception as error:  # reported in Status; the next Start/Listen begins afresh
            log.exception("%s acquisition failed", self._mode.value)
            self._last_error = f"{type(error).__name__}: {error}"
            self._message = f"{self._mode.value} acquisition failed: {error}"
            self._recover()
        finally:
            self._mode = AcquisitionMode.IDLE
            self._sessions_ended += 1
            self._request_publish()

    def _recover(self) -> None:
        """After a failed acquisition: the series processing ended, the receiver idle, a broken
        worker pool dropped (the next Start builds a new one), the DCU disarmed if we armed it."""
        run = self._run
        if run is not None and not run.ended:
            run.abort()
            try:
                run.wait(30)
            except TimeoutError:
                log.error("the failed series' processing did not end within 30 s")
        if self._receiver is not None and self._receiver.running:
            try:
                self._receiver.cancel()
            except RuntimeError as error:
                log.warning("receiver not cancelled: %s", error)
        with self._lock:
            runner = self._runner
            if runner is not None:
                try:
                    runner.pool.check_alive()
                except RuntimeError:
                    log.warning("worker pool broken by the failed acquisition; a new one starts with the next")
                    runner.close()
                    self._runner = None
        if self._armed_series is not None:
            self.control.tell("abort", self.detector.abort, quiet_when_idle=True)
            self._armed_series = None

    def _run_active(self, request: AcquisitionRequest) -> None:
        nav_shape = request.nav_shape or self.control.scan_shape()
        trigger_mode = self.control.trigger_mode()
        self._trigger_mode = trigger_mode
        self.control.configure_scan(nav_shape, trigger_mode, request.images_per_trigger)
        source = self._prepare_pipeline()
        parameters = self.control.with_beam_centre(request.parameters)
        if self._stop.is_set() or self._abort.is_set():
            self._message = "stopped before arming"
            return
        self._frame_time = self.control.frame_time()
        self._receiver.timeout = self.header_timeout()
        self._mark_errors()
        # Connected (and the connection alive) before the DCU sends the header at arm.
        try:
            self._receiver.connect(timeout=self.header_timeout())
        except StreamConnectError as error:
            raise StreamConnectError(error.endpoint, error.timeout,
                                     f"{error.reason}; the detector was not armed") from error
        series = self.detector.arm()
        self._armed_series = series
        self._receiver.arm(series)
        self._message = f"series {series}: armed"
        received_before = self._receiver.stats().frames_received
        # An ints trigger returns only when the series is done: trigger from a thread of its own
        # so that this one follows the series (progress, Stop/Abort, a missing header) meanwhile.
        # Triggered before the series run starts: its set-up (the UDFs built and sent to the
        # workers, with the GIL) then overlaps the exposure instead of delaying the trigger; the
        # receiver, armed already, keeps what arrives meanwhile.
        trigger_errors: list[BaseException] = []
        triggering = threading.Thread(target=self._trigger, args=(trigger_mode, nav_shape, request.images_per_trigger,
                                                                      trigger_errors),
                                      name="acquisition-trigger", daemon=True)
        triggering.start()
        run = self._process(source, request, parameters, nav_shape, series, received_before)
        self._follow(run)
        triggering.join()
        if trigger_errors:
            self.control.tell("disarm", self.detector.disarm, quiet_when_idle=True)
            self._armed_series = None
            raise trigger_errors[0]
        if not self._abort.is_set():
            self.control.tell("disarm", self.detector.disarm, quiet_when_idle=True)
        self._armed_series = None

    def _run_passive(self, request: AcquisitionRequest) -> None:
        source = self._prepare_pipeline()
        self._mark_errors()
        self._receiver.listen()
        try:
            while not (self._stop.is_set() or self._abort.is_set()):
                self._message = "listening: waiting for a series armed by someone else"
                self._trigger_mode = self.control.trigger_mode()
                self._frame_time = self.control.frame_time()
                # passive: the bound on the silence between frames, from the DCU's settings now
                self._receiver.timeout = self.frame_timeout(self._trigger_mode, self._frame_time,
                                                            self.control.image_count())
                parameters = self.control.with_beam_centre(request.parameters)
                run = self._process(source, request, parameters, request.nav_shape, None)
                self._follow(run)
        finally:
            if self._receiver is not None and self._receiver.running:
                self._receiver.cancel()

    def _process(self, source: ReceiverFrameSource, request: AcquisitionRequest, parameters: AnalysisParameters,
                 nav_shape: tuple[int, ...] | None, series: int | None,
                 received_before: int | None = None) -> SeriesRun:
        settings = self._resolved_settings
        self._received_at_start = self._receiver.stats().frames_received if received_before is None \
            else received_before
        self._process_meter.reset()
        self._series_started_at = time.monotonic()
        self._published_processed = -1  # before the run: the publisher may look at any moment
        self._partial_processed = -1
        source.on_error = self._wakeup.set
        self._run = self._runner.process(source, request.analyses, parameters, nav_shape, series,
                                         frames_per_partition=settings.frames_per_partition,
                                         on_change=self._wakeup.set, saving=self.saving,
                                         detector_config=self.detector.known_config,
                                         compact=self._mode == AcquisitionMode.NODE)
        return self._run

    def _follow(self, run: SeriesRun) -> None:
        """Wait for ``run`` to end (acting on Stop/Abort), then publish its final result."""
        stop_seen_at: float | None = None
        receiver_cancelled = False
        series_seen = False
        errors_before = self._source.errors_seen
        blocked_at, quiet_since = 0.0, time.monotonic()  # NodeFinish: last time the receiver had no free slot
        while True:
            self._wakeup.clear()  # before looking: what happens from here on wakes the wait below
            if run.ended:
                break
            if not series_seen and self._mode == AcquisitionMode.ACTIVE and run.series is None:
                header_error = self._missing_header_error(errors_before)
                if header_error is not None:
                    # the receiver gave up waiting for the armed series' header and went idle
                    received = self._receiver.stats().messages_received - self._messages_at_arm
                    header_error = (f"{header_error}; {received} stream message(s) received since the "
                                    f"arm, {self._rejected_text()}")
                    self._last_error = header_error
                    self._message = f"no data: {header_error}"
                    run.stop()
            elif not series_seen and run.series is not None and self._mode == AcquisitionMode.ACTIVE \
                    and self._trigger_mode in ("exts", "exte"):
                self._message = f"series {run.series}: armed, waiting for the external triggers"
            if not series_seen and run.series is not None:
                series_seen = True
                self.detector.note_stream("series_started", run.series)
                if self._mode == AcquisitionMode.PASSIVE:
                    self._series_started_at = time.monotonic()  # active: from the arm on
                else:
                    # the header came: from now on the bound is on the silence between frames
                    expected, _ = run.counters()
                    self._receiver.timeout = self.frame_timeout(self._trigger_mode, self._frame_time, expected)
                self._message = f"series {run.series}: receiving and processing"
            if self._abort.is_set() and not receiver_cancelled:
                run.abort()
                self._receiver.cancel()
                receiver_cancelled = True
            elif self._drain.is_set() and not receiver_cancelled and not self._stop.is_set():
                # node role, NodeFinish: end once the stream has been quiet for the time asked
                # quiet: no message came and a free slot was there to take one (a receiver
                # waiting for a slot leaves its messages queued: not drained)
                stats = self._receiver.stats()
                now = time.monotonic()
                if stats.slots_in_use >= stats.slots_total:
                    blocked_at = now
                quiet_since = max(self._receiver.last_message_at, blocked_at)
                if now - quiet_since >= self._drain_quiet:
                    if run.series is None:
                        # passive: nothing of the series came here; the run waits on for the next
                        self._publish_empty_final(self._drain_series)
                        self._drain.clear()
                    else:
                        self._receiver.cancel()
                        receiver_cancelled = True
            elif self._stop.is_set() and not receiver_cancelled:
                now = time.monotonic()
                stop_seen_at = now if stop_seen_at is None else stop_seen_at
                if run.series is None:
                    run.stop()  # no series has started: nothing to finish
                elif self._mode in (AcquisitionMode.PASSIVE, AcquisitionMode.NODE) or \
                        now - stop_seen_at > _CANCEL_GRACE:
                    # passive: nobody cancels the detector; active: the DCU's end of series did
                    # not come in time. End the series here with what arrived.
                    self._receiver.cancel()
                    receiver_cancelled = True
            # until something happens; after a Stop, at the latest when the grace is over
            grace_left = None if stop_seen_at is None or receiver_cancelled else \
                max(0.0, _CANCEL_GRACE - (time.monotonic() - stop_seen_at))
            if self._drain.is_set() and not receiver_cancelled:
                grace_left = min(grace_left if grace_left is not None else _SAFETY_WAKE,
                                 max(0.01, self._drain_quiet - (time.monotonic() - quiet_since)))
            self._wakeup.wait(_SAFETY_WAKE if grace_left is None else min(grace_left, _SAFETY_WAKE))
        final = run.wait()
        if final.series is None:
            return
        summary = self._source.last_summary
        self.saving.end(final.buffers, final.done, summary.end_reason if summary is not None and
                        summary.series == final.series else final.state.value)
        self.detector.note_stream("series_ended", final.series)
        stats = self._receiver.stats()
        self._final_received = max(0, stats.frames_received - self._received_at_start)
        self._last_final = final
        self._series_completed += 1
        self._message = self._final_message(final)
        if summary is not None and summary.series == final.series and summary.end_reason == "timeout":
            self._last_error = (f"series {final.series}: no frame for {self._receiver.timeout:g} s "
                                f"(series_timeout), ended with {self._final_received} of "
                                f"{final.frames_expected} frames received; {self._rejected_text()}")
            self._message = f"no data: {self._last_error}"
        self._request_publish(final, self.node_partial(run, final) if self._mode == AcquisitionMode.NODE else None)
        if self._mode == AcquisitionMode.PASSIVE:
            self._mark_errors()  # the next series' rejected messages count from here

    def _missing_header_error(self, errors_before: int) -> str | None:
        source = self._source
        new = min(source.errors_seen - errors_before, len(source.receiver_errors))
        for kind, message in source.receiver_errors[len(source.receiver_errors) - new:]:
            if kind == "no_header":
                return message
        return None

    def _final_message(self, final: ResultSnapshot) -> str:
        elapsed = max(1e-9, time.monotonic() - self._series_started_at)
        what = {RunState.FINISHED: "done", RunState.STOPPED: "stopped", RunState.ABORTED: "aborted",
                RunState.FAILED: "failed"}.get(final.state, final.state.value)
        if final.state == RunState.FINISHED and self._stop.is_set():
            what = "stopped"
        text = (f"series {final.series} {what}: {final.frames_processed} of {final.frames_expected} frames "
                f"processed in {elapsed:.2f} s ({final.frames_processed / elapsed:,.0f} frames/s)")
        if final.frames_missing:
            text += f", {final.frames_missing} missing"
        if final.scan_shape_note:
            text += f"; {final.scan_shape_note}"
        if final.error:
            text += f"; error: {final.error}"
        return text

    def _trigger(self, trigger_mode: str, nav_shape: tuple[int, ...], images_per_trigger: int,
                 errors: list[BaseException]) -> None:
        """The trigger thread of an active series: a refused trigger ends the series (reported by
        the session thread once it ended); under a Stop/Abort it is expected."""
        stopped = lambda: self._stop.is_set() or self._abort.is_set()  # noqa: E731
        try:
            self.control.trigger(trigger_mode, nav_shape, stopped, self._frame_time, images_per_trigger)
        except SimplonError as error:
            if not stopped():
                errors.append(error)
                self._abort.set()
                self._wakeup.set()  # the session thread ends the series now

    # ---- pipeline ---------------------------------------------------------------------------------

    def stream_geometry(self) -> StreamGeometry:
        """Stream version, frame shape and pixel type, as the DCU is configured now."""
        return self.control.stream_geometry()

    def _prepare_pipeline(self, enable_stream: bool = True) -> ReceiverFrameSource:
        if enable_stream:  # a node leaves the DCU to the merging device
            self.control.enable_stream()
        geometry = self._start_geometry or self.control.stream_geometry()
        settings = self.settings.resolved(geometry.frame_shape, geometry.dtype)
        self._resolved_settings = settings
        with self._lock:
            self._ensure_runner(settings.workers)
            key = (geometry, settings.num_slots, settings.bytes_per_frame, settings.frame_stack_size,
                   self._connection)
            if self._receiver is None or self._receiver_key != key or not self._receiver.running:
                if self._receiver is not None:
                    self._receiver.stop()
                self._receiver = self.pipeline_factory.receiver(
                    geometry, num_slots=settings.num_slots, frame_stack_size=settings.frame_stack_size,
                    bytes_per_frame=settings.bytes_per_frame, timeout=self.header_timeout(),
                    transport=self.transport, connection=self._connection)
                self._receiver_key = key
                self._source = self.pipeline_factory.source(self._receiver)
            return self._source

    def _ensure_runner(self, workers: int) -> LiveRunner:
        runner = self._runner
        if runner is not None and runner.pool.size == workers and not runner.pool.closed:
            try:
                runner.pool.check_alive()
                return runner
            except RuntimeError:
                log.warning("a worker process died; starting a new pool")
        self._runner = None  # a pool that fails to start must not leave a closed one behind
        if runner is not None:
            runner.close()
        self._runner = self.pipeline_factory.runner(workers, self.registry)
        return self._runner

    # ---- publishing: one thread, the publisher ---------------------------------------------------

    def _request_publish(self, final: ResultSnapshot | None = None, partial: PartialResults | None = None) -> None:
        """From the session thread: have the publisher publish ``final`` (None: the progress,
        forced) and, node role, its ``partial``, and wait until it did, so that :meth:`wait`
        returns after the last update."""
        request = _PublishRequest(final, partial)
        self._publish_requests.put(request)
        while not request.done.wait(0.5):
            if not self._publisher.is_alive():
                return  # closed meanwhile: nobody is told any more

    def _publish_loop(self) -> None:
        """Intermediate results at most ``event_rate`` times per second while a series runs,
        progress when it changed, and the session's final updates when it asks."""
        while not self._closing.is_set():
            try:
                request = self._publish_requests.get(timeout=1.0 / self._event_rate)
            except queue.Empty:
                request = None
            try:
                if request is None:
                    self._publish_intermediate()
                elif request.final is None and request.partial is not None:
                    self._publish(AcquisitionUpdate(self.progress(), None, final=False, partial=request.partial))
                elif request.final is not None:
                    self._publish(AcquisitionUpdate(self.progress(), request.final, final=True, partial=request.partial))
                    self._published_processed = request.final.frames_processed
                else:
                    self._publish_progress(force=True)
            except Exception:  # noqa: BLE001 - a failing client callback must not end publishing
                log.exception("publishing live results failed")
            finally:
                if request is not None:
                    request.done.set()

    def _publish_intermediate(self) -> None:
        run = self._run
        if run is None or run.ended:
            self._publish_progress(force=False)
            return
        _, processed = run.counters()
        if self._mode == AcquisitionMode.NODE:
            self._publish_partial_when_due(run, processed)
        if processed == self._published_processed:
            self._publish_progress(force=False)
            return
        snapshot = run.snapshot()
        if run.ended:
            return  # the final result comes as the session's request
        self.saving.write_results(snapshot.buffers, snapshot.done)
        self._published_processed = snapshot.frames_processed
        self._publish(AcquisitionUpdate(self.progress(), snapshot, final=False))

    def _publish_partial_when_due(self, run: SeriesRun, processed: int) -> None:
        """Node role: the partial results, when they changed, at most PARTIAL_RATE times a second
        while frames flow, and as soon as the stream pauses with every frame processed -- the
        latest state always goes out (the merging device ends a series as soon as the nodes'
        partials cover it)."""
        now = time.monotonic()
        if processed == self._partial_processed:
            return
        if now - self._partial_sent_at < 1.0 / PARTIAL_RATE:
            # sooner only once the stream paused and every frame received is processed: at a
            # series' end the merging device then sees the nodes' last state at once
            received = self._receiver.stats().frames_received - self._received_at_start
            if now - self._receiver.last_message_at < STREAM_PAUSE or processed < received:
                return
        partial = self.node_partial(run)
        if partial is None or run.ended:
            return  # before the series is set up, or the final partial comes with the final result
        self._partial_sent_at = now
        self._partial_processed = partial.frames_processed
        self._publish(AcquisitionUpdate(self.progress(), None, final=False, partial=partial))

    def _publish_progress(self, force: bool) -> None:
        progress = self.progress()
        if force or progress != self._published_progress:
            self._publish(AcquisitionUpdate(progress, None, final=False))

    def _publish(self, update: AcquisitionUpdate) -> None:
        self._published_progress = update.progress
        if self.on_update is not None:
            self.on_update(update)


@dataclass
class _PublishRequest:
    """A final result (or, None, a forced progress update) for the publisher thread."""

    final: ResultSnapshot | None
    partial: PartialResults | None = None
    done: threading.Event = field(default_factory=threading.Event)
