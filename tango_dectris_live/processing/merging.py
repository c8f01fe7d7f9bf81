"""The merging role: one detector stream received by several node devices, one merged result.

:class:`MergedAcquisition` is a :class:`~.acquisition.LiveAcquisition` without a receiver or
workers of its own. For an active series it configures the DCU as a single device does, tells
every node the series (:class:`~.announcement.SeriesAnnouncement`: geometry and encoding from the
DCU's configuration, analyses, parameters) and waits until each is connected to the stream, only
then arms the DCU, hands every node the series id and triggers. The nodes take the frames the
DCU deals them and send their partial results (:mod:`.partials`) a few times per second; a
:class:`MergedRun` keeps the latest of each and merges them when results are published.

The end of a series is found by frame number: it is complete when the union of the nodes'
processed frames covers the scan, or once its end is known -- the DCU's end message reached a
node, the DCU's trigger returned (internal triggers), Stop, or no node got anything for the
series timeout -- and every node has drained what it still had queued (``NodeFinish``) and sent
its final partial. A node that stops answering is marked failed: its frames not merged yet are
missing (NaN, quality WARNING), the other nodes' results stand, Status names it, and the next
series runs on the nodes that are left.

Tango-free: the nodes are reached through a :class:`NodeSet` (the device gives it one built on
``tango.Group`` and change events, ``device/node_links.py``; tests may give another).
"""
from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import replace
from typing import Any, Callable, Protocol

import numpy as np

from tango_dectris_live.saving import SeriesFileSpec

from .acquisition import AcquisitionMode, AcquisitionProgress, AcquisitionRequest, LiveAcquisition
from .announcement import SeriesAnnouncement
from .live_dataset import resolve_scan_shape
from .partials import PartialResults, PartialResultsError, ResultMerger
from .series_control import StreamGeometry
from .snapshot import ResultSnapshot, RunState, empty_snapshot

log = logging.getLogger(__name__)

# A node drains (NodeFinish) until its stream has been quiet this long with a slot free
DRAIN_QUIET = 0.5
# after NodeFinish, how long a node may take to send its final partial results
FINAL_TIMEOUT = 20.0
# how often the nodes of a running series are pinged (a dead node answers nothing)
PING_PERIOD = 0.5
# a node that reports more progress than its partial results showed for this long is read directly
EVENT_GRACE = 1.0
_WAKE = 0.25
_SAFETY_WAKE = 2.0  # waits on events are bounded by this, should one ever be missed


class NodeError(RuntimeError):
    """Nodes that could not take a command (the message names each and why)."""

    def __init__(self, failures: dict[str, str], what: str) -> None:
        self.failures = dict(failures)
        super().__init__(f"{what}: " + "; ".join(f"{name}: {reason}" for name, reason in failures.items()))


class NodeSet(Protocol):
    """The node devices of a merging device (see ``device/node_links.py``)."""

    names: list[str]
    # set by the acquisition: called with (node name, partial results) from any thread, and
    # with (node name, error text) when a node's message could not be taken
    on_partial: Callable[[str, PartialResults], None] | None
    on_problem: Callable[[str, str], None] | None

    def connect(self) -> None: ...

    def alive(self, name: str) -> str:
        """"" when ``name`` answers, else why not."""

    def progress(self, name: str) -> tuple[int, int] | str:
        """(series id, frames processed) that ``name`` reports now, or why it does not answer."""

    def read_partial(self, name: str) -> PartialResults | None:
        """``name``'s partial results, read (not waited for as an event)."""

    def command(self, names: list[str], command: str, argument: Any = None) -> dict[str, str]:
        """Run ``command`` on every node of ``names`` at once; {name: error} of those that failed."""

    def close(self) -> None: ...


class MergedRun:
    """One series merged from its nodes' partial results; the interface of a
    :class:`~.runner.SeriesRun` that the publisher and the device use."""

    def __init__(self, series: int, nodes: list[str], merger: ResultMerger,
                 on_change: Callable[[], None]) -> None:
        self.series = series
        self.nodes = list(nodes)
        self.merger = merger
        self._on_change = on_change
        self._lock = threading.Lock()
        self._latest: dict[str, PartialResults] = {}
        self._failed: dict[str, str] = {}
        self._rejected: dict[str, int] = {}
        self._state = RunState.RUNNING
        self._error: str | None = None
        self._ended = threading.Event()
        self._cache: tuple[tuple, ResultSnapshot] | None = None
        self._behind_since: dict[str, float] = {}  # node -> when it first reported more than it sent
        self.last_arrival = time.monotonic()

    # -- what the nodes send ------------------------------------------------------------------

    def offer(self, node: str, partial: PartialResults) -> None:
        if partial.series != self.series or node not in self.nodes or self._ended.is_set():
            return  # another series' (late or early), or a node not of this series
        try:
            self.merger.check(partial)
        except PartialResultsError as error:
            self.reject(node, str(error))
            return
        with self._lock:
            latest = self._latest.get(node)
            if latest is not None and (latest.final or latest.sequence >= partial.sequence):
                return
            self._latest[node] = partial
            self.last_arrival = time.monotonic()
        self._on_change()

    def behind(self, node: str, state: tuple[int, int], now: float) -> bool:
        """Whether ``node`` reports (series, frames processed) ``state`` that its latest partial
        results do not show, for longer than a partial result takes to come."""
        with self._lock:
            latest = self._latest.get(node)
            shown = (latest.series, latest.frames_processed) if latest is not None else None
            if state[0] != self.series or state == shown:
                self._behind_since.pop(node, None)
                return False
            since = self._behind_since.setdefault(node, now)
        return now - since >= EVENT_GRACE

    def reject(self, node: str, reason: str) -> None:
        with self._lock:
            self._rejected[node] = self._rejected.get(node, 0) + 1
        log.warning("partial results of node %s refused: %s", node, reason)

    def fail(self, node: str, reason: str) -> None:
        """``node`` is gone: what it sent stands, what it did not is missing."""
        with self._lock:
            if node in self._failed or (node in self._latest and self._latest[node].final):
                return
            self._failed[node] = reason
        log.warning("node %s failed during series %s: %s", node, self.series, reason)
        self._on_change()

    # -- state ---------------------------------------------------------------------------------

    @property
    def failed(self) -> dict[str, str]:
        with self._lock:
            return dict(self._failed)

    def pending(self) -> list[str]:
        """Nodes whose final partial has not come (and that have not failed)."""
        with self._lock:
            return [n for n in self.nodes if n not in self._failed and not (n in self._latest and self._latest[n].final)]

    def end_seen(self) -> bool:
        with self._lock:
            return any(p.end_seen for p in self._latest.values())

    def union_done(self) -> np.ndarray:
        with self._lock:
            partials = list(self._latest.values())
        done = np.zeros(self.merger.size, bool)
        for partial in partials:
            done |= partial.done
        return done

    def frames_received(self) -> int:
        with self._lock:
            return sum(p.frames_received for p in self._latest.values())

    def node_lines(self) -> list[str]:
        """Per node: what it did for this series, in words."""
        with self._lock:
            lines = []
            for name in self.nodes:
                partial = self._latest.get(name)
                got = (f"{partial.frames_received} frames received, {partial.frames_processed} processed, "
                       f"{partial.state}{', had the end' if partial.end_seen else ''}") if partial else "nothing yet"
                if name in self._failed:
                    lines.append(f"{name}: FAILED ({self._failed[name]}); {got}")
                else:
                    refused = self._rejected.get(name, 0)
                    stream = partial.extra.get("rejected", {}) if partial is not None else {}
                    lines.append(f"{name}: {got}" + (f"; {refused} partial results refused" if refused else "")
                                 + ("; stream messages rejected: " + ", ".join(f"{k} {v}" for k, v in stream.items())
                                    if stream else ""))
            return lines

    def counters(self) -> tuple[int, int]:
        return self.merger.size, int(np.count_nonzero(self.union_done()))

    @property
    def state(self) -> RunState:
        return self._state

    @property
    def ended(self) -> bool:
        return self._ended.is_set()

    def end(self, state: RunState, error: str | None = None) -> None:
        self._error = self._error or error
        self._state = state
        self._ended.set()
        self._on_change()

    def stop(self) -> None:
        self.end(RunState.STOPPED)

    def abort(self) -> None:
        self.end(RunState.ABORTED)

    def wait(self, timeout: float | None = None) -> ResultSnapshot:
        if not self._ended.wait(timeout):
            raise TimeoutError(f"merged series {self.series} still running after {timeout} s")
        return self.snapshot()

    def snapshot(self) -> ResultSnapshot:
        """The nodes' latest partials merged (computed again only when one of them changed)."""
        with self._lock:
            partials = [self._latest[n] for n in self.nodes if n in self._latest]
            state, error = self._state, self._error
            failed = dict(self._failed)
        if failed and state.is_final:
            error = error or "node(s) failed: " + "; ".join(f"{n}: {why}" for n, why in failed.items())
        key = (tuple((id(p), p.sequence) for p in partials), state, error)
        cache = self._cache
        if cache is not None and cache[0] == key:
            return cache[1]
        try:
            snapshot = self.merger.merge(partials, self.series, state, frames_missing_final=state.is_final,
                                         error=error)
        except PartialResultsError as problem:
            log.error("merging series %s failed: %s", self.series, problem)
            return empty_snapshot(RunState.FAILED, self.series, str(problem))
        self._cache = (key, snapshot)
        return snapshot


class MergedAcquisition(LiveAcquisition):
    """Live acquisitions whose frames are received and processed by node devices (module docstring)."""

    def __init__(self, *args: Any, nodes: NodeSet, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.nodes = nodes
        self._node_run: MergedRun | None = None
        self._left_out: dict[str, str] = {}  # nodes not used for the last series, and why
        # passive: partial results of series not begun yet (series -> node -> latest), the last begun
        self._early: dict[int, dict[str, PartialResults]] = {}
        self._passive_last = -1
        nodes.on_partial = self._partial_arrived
        nodes.on_problem = self._node_problem

    def prepare(self) -> None:
        """Subscribe to the nodes' partial results (a node not up yet is subscribed when it comes)."""
        self.nodes.connect()

    def _partial_arrived(self, node: str, partial: PartialResults) -> None:
        with self._lock:
            run = self._node_run
            if self._mode == AcquisitionMode.PASSIVE and partial.series > self._passive_last and \
                    (run is None or partial.series != run.series):
                # passive: a series this device has not begun yet; kept (the latest per node) until it does
                kept = self._early.setdefault(partial.series, {})
                if node not in kept or kept[node].sequence < partial.sequence:
                    kept[node] = partial
                self._wakeup.set()
                return
        if run is not None:
            run.offer(node, partial)

    def _node_problem(self, node: str, reason: str) -> None:
        run = self._node_run
        if run is not None:
            run.reject(node, reason)

    # -- the active series ------------------------------------------------------------------------

    def _run_active(self, request: AcquisitionRequest) -> None:
        nav_shape = request.nav_shape or self.control.scan_shape()
        trigger_mode = self.control.trigger_mode()
        self._trigger_mode = trigger_mode
        self.control.configure_scan(nav_shape, trigger_mode, request.images_per_trigger)
        self.control.enable_stream()
        geometry = self._start_geometry or self.control.stream_geometry()
        parameters = self.control.with_beam_centre(request.parameters)
        self._frame_time = self.control.frame_time()
        images = math.prod(nav_shape)
        announcement = SeriesAnnouncement(geometry, images, request.analyses, parameters, tuple(nav_shape),
                                          trigger_mode, self._frame_time)
        nodes = self._usable_nodes()
        if self._stop.is_set() or self._abort.is_set():
            self._message = "stopped before arming"
            return
        self._message = f"preparing {len(nodes)} node(s): receivers connected to the stream"
        failures = self.nodes.command(nodes, "NodePrepare", announcement.to_json())
        if failures:
            self.nodes.command([n for n in nodes if n not in failures], "Stop")
            raise NodeError(failures, "nodes not prepared, the detector was not armed")
        series = self.detector.arm()
        self._armed_series = series
        merger = ResultMerger(self.registry, request.analyses, parameters, resolve_scan_shape(images, tuple(nav_shape)),
                              geometry.frame_shape, geometry.dtype)
        run = MergedRun(series, nodes, merger, self._wakeup.set)
        with self._lock:
            self._node_run = run
            self._run = run
            self._passive_last = max(self._passive_last, series)
        self._series_started_at = time.monotonic()
        self._process_meter.reset()
        self._published_processed = -1
        self._begin_saving(run, geometry, parameters)
        for name, reason in self.nodes.command(nodes, "NodeArm", series).items():
            run.fail(name, f"NodeArm refused: {reason}")
        self._message = f"series {series}: armed, {len(nodes)} node(s) receiving"
        trigger_errors: list[BaseException] = []
        triggering = threading.Thread(target=self._trigger, args=(trigger_mode, tuple(nav_shape),
                                                                      request.images_per_trigger, trigger_errors),
                                      name="acquisition-trigger", daemon=True)
        triggering.start()
        dcu_done = (lambda: not triggering.is_alive()) if trigger_mode in ("ints", "inte") else (lambda: False)
        self._follow_nodes(run, dcu_done)
        triggering.join()
        self.control.tell("disarm", self.detector.disarm, quiet_when_idle=True)
        self._armed_series = None
        if trigger_errors:
            raise trigger_errors[0]

    def _run_passive(self, request: AcquisitionRequest) -> None:
        """Every series someone else arms, merged from the nodes, one after the other, until Stop.
        A series begins here when the first node sends partial results of it."""
        geometry = self._start_geometry or self.control.stream_geometry()
        self._trigger_mode = self.control.trigger_mode()
        self._frame_time = self.control.frame_time()
        images = self.control.image_count()
        parameters = self.control.with_beam_centre(request.parameters)
        announcement = SeriesAnnouncement(geometry, images, request.analyses, parameters, request.nav_shape,
                                          self._trigger_mode, self._frame_time)
        merger = ResultMerger(self.registry, request.analyses, parameters, resolve_scan_shape(images, request.nav_shape),
                              geometry.frame_shape, geometry.dtype)
        nodes = self._usable_nodes()
        # what the nodes did before (another merging device's series, an earlier Listen) is not
        # this Listen's: only series newer than any a node reports now begin here
        newest = [state[0] for state in map(self.nodes.progress, nodes) if not isinstance(state, str)]
        with self._lock:
            self._early = {}
            self._passive_last = max([self._passive_last, *newest])
        failures = self.nodes.command(nodes, "NodeListen", announcement.to_json())
        if failures:
            self.nodes.command([n for n in nodes if n not in failures], "Stop")
            raise NodeError(failures, "nodes not listening")
        try:
            while not (self._stop.is_set() or self._abort.is_set()):
                self._message = f"listening with {len(nodes)} node(s): waiting for a series armed by someone else"
                self._wakeup.clear()
                with self._lock:
                    series = min(self._early) if self._early else None
                    early = self._early.pop(series, {}) if series is not None else {}
                if series is None:
                    if not self._wakeup.wait(PING_PERIOD):
                        self._look_for_new_series(nodes)
                    continue
                run = MergedRun(series, nodes, merger, self._wakeup.set)
                with self._lock:
                    self._node_run = run
                    self._run = run
                    self._passive_last = series
                    # a series' partials that came between the pop above and now
                    early.update(self._early.pop(series, {}))
                self._series_started_at = time.monotonic()
                self._process_meter.reset()
                self._published_processed = -1
                self._begin_saving(run, geometry, parameters)
                for name, partial in early.items():
                    run.offer(name, partial)
                self._message = f"series {series}: merging from {len(nodes)} node(s)"
                self._follow_nodes(run, lambda: False)
        finally:
            self.nodes.command(nodes, "Stop")

    def _begin_saving(self, run: MergedRun, geometry: StreamGeometry, parameters: Any) -> None:
        """The series file of the merged results (the frames stay with the nodes: each saves its
        share with its own saving settings)."""
        def spec() -> SeriesFileSpec:
            layout = run.merger.layout()
            values = {name: value for name, value in vars(parameters).items()
                      if value is not None and name != "frame_shape"}
            return SeriesFileSpec(
                series_id=int(run.series), frame_shape=tuple(geometry.frame_shape), dtype=geometry.dtype,
                encoding="none", n_frames=0, scan_shape=tuple(run.merger.scan.shape),
                title=f"series {run.series}, merged from {', '.join(run.nodes)}",
                detector_config=self.detector.known_config(), result_layout=layout,
                analysis_parameters={name: values for name in layout})
        self.saving.begin(spec, lambda handle: None, frames_here=False)

    def _look_for_new_series(self, nodes: list[str]) -> None:
        """Passive, while no series is merged: a node on a series newer than any whose partial
        results came (their events lost) is read directly."""
        for name in nodes:
            state = self.nodes.progress(name)
            if isinstance(state, str) or state[0] <= self._passive_last or state[1] == 0:
                continue
            with self._lock:
                if name in self._early.get(state[0], {}):
                    continue
            partial = self.nodes.read_partial(name)
            if partial is not None:
                self._partial_arrived(name, partial)

    def _usable_nodes(self) -> list[str]:
        """The nodes that answer now; those that do not are left out, with the reason."""
        left_out = {}
        usable = []
        for name in self.nodes.names:
            problem = self.nodes.alive(name)
            if problem:
                left_out[name] = problem
            else:
                usable.append(name)
        self._left_out = left_out
        for name, problem in left_out.items():
            log.warning("node %s left out of the series: %s", name, problem)
        if not usable:
            raise NodeError(left_out, "no node answers")
        return usable

    def _follow_nodes(self, run: MergedRun, dcu_done: Callable[[], bool]) -> None:
        """Wait for the series to end (see the module docstring), then publish the merged result."""
        finish_sent_at: float | None = None
        finish_quiet = 0.0
        last_ping = 0.0
        silence = self.frame_timeout(self._trigger_mode, self._frame_time, run.merger.size)
        while not run.ended:
            self._wakeup.clear()
            now = time.monotonic()
            if now - last_ping >= PING_PERIOD:
                last_ping = now
                for name in run.pending():
                    state = self.nodes.progress(name)
                    if isinstance(state, str):
                        run.fail(name, state)
                        self._message = f"series {run.series}: node {name} failed ({state}); the others go on"
                    elif run.behind(name, state, now):
                        # the node has more than its events brought (an event lost, a node
                        # restarted since it was subscribed): read its partial results instead
                        partial = self.nodes.read_partial(name)
                        if partial is not None:
                            run.offer(name, partial)
            pending = run.pending()
            if self._abort.is_set():
                self.nodes.command(pending, "NodeAbort")
                run.abort()
                break
            complete = bool(run.union_done().all())
            if finish_sent_at is not None and complete and finish_quiet > 0:
                # every frame merged meanwhile: nothing is left to drain
                self.nodes.command(pending, "NodeFinish", [0.0, run.series])
                finish_quiet = 0.0
            if finish_sent_at is None:
                reason = ("every frame merged" if complete else "the end reached a node" if run.end_seen()
                          else "stopped" if self._stop.is_set() else "the detector's series is over" if dcu_done()
                          else "no frame for the series timeout" if now - run.last_arrival > silence else None)
                if reason is not None:
                    self._message = f"series {run.series}: {reason}; the nodes drain"
                    finish_quiet = 0.0 if complete else DRAIN_QUIET
                    for name, problem in self.nodes.command(pending, "NodeFinish", [finish_quiet, run.series]).items():
                        run.fail(name, f"NodeFinish refused: {problem}")
                    finish_sent_at = now
            if not run.pending():
                state = RunState.FINISHED if complete or run.end_seen() else RunState.STOPPED
                run.end(state)
                break
            if finish_sent_at is not None and now - finish_sent_at > FINAL_TIMEOUT + DRAIN_QUIET:
                for name in run.pending():
                    run.fail(name, f"no final partial results {FINAL_TIMEOUT:g} s after NodeFinish")
                continue
            self._wakeup.wait(_WAKE)
        if self._abort.is_set():
            # an Abort that ended the run before this loop saw it: the nodes drop their frames too
            self.nodes.command(run.pending(), "NodeAbort")
        final = run.snapshot()
        self.saving.end(final.buffers, final.done, "complete" if final.state == RunState.FINISHED else final.state.value)
        self._last_final = final
        self._series_completed += 1
        self._message = self._final_message(final)
        if run.failed:
            self._message += "; node(s) failed: " + ", ".join(run.failed)
        self._request_publish(final)

    # -- state for the device -----------------------------------------------------------------------

    def progress(self) -> AcquisitionProgress:
        progress = super().progress()
        run = self._node_run
        lines = [f"{name}: left out ({why})" for name, why in self._left_out.items()]
        if run is None:
            return replace(progress, nodes=tuple(lines))
        received = run.frames_received()
        return replace(progress, nodes=tuple(run.node_lines() + lines),
                       frames_received=received if run.series == progress.series_id else progress.frames_received)

    def _recover(self) -> None:
        run = self._node_run
        if run is not None and not run.ended:
            self.nodes.command(run.pending(), "NodeAbort")
        super()._recover()

    def close(self) -> None:
        super().close()
        self.nodes.close()

