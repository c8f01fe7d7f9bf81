"""One ``DectrisLive`` device as the Sardana controllers of one Pool share it.

A measurement group may hold channels of both controllers of a device (the 2D detector image and
the virtual counters). Sardana loads every controller of the group, then starts them one after
the other; the device must run **one** acquisition for all of them. The rule: a controller's
start joins the acquisition started since its own last load, or starts one. Loads and starts of
one acquisition all happen before the next acquisition's loads, so two controllers in one group
share each acquisition, and a controller used alone never joins an old one.

The device is driven over Tango only, as any client would: the settings an acquisition needs are
read in one call and only those that differ are written; ``Start``; the end is when the device's
``acquisitions_ended`` counter grows (whatever the outcome: a failed Start has no final result to
wait on); the outcome is read from ``series_id`` and ``acquisition_status``.
"""
from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import tango

log = logging.getLogger(__name__)

# How each Sardana synchronisation maps onto the detector: trigger mode and images per trigger
# (0: the device's automatic choice). Names are those of sardana.pool.AcqSynch.
SOFTWARE_TRIGGER = "SoftwareTrigger"
SOFTWARE_START = "SoftwareStart"
SOFTWARE_GATE = "SoftwareGate"
HARDWARE_TRIGGER = "HardwareTrigger"
HARDWARE_GATE = "HardwareGate"
HARDWARE_START = "HardwareStart"
_TRIGGERING = {
    SOFTWARE_TRIGGER: ("ints", 0),  # one acquisition per point, all its repetitions in one trigger
    SOFTWARE_START: ("ints", 0),
    SOFTWARE_GATE: ("ints", 0),
    HARDWARE_TRIGGER: ("exts", 1),  # one external trigger per point, one image each
    HARDWARE_GATE: ("exte", 1),  # the gate's width is the exposure
    HARDWARE_START: ("exts", 0),  # one external trigger starts the whole series
}
HARDWARE = frozenset({HARDWARE_TRIGGER, HARDWARE_GATE, HARDWARE_START})
SAVING_ORDER = ("off", "results", "results_and_frames")


class LinkError(RuntimeError):
    """Something a scan user can act on: the device refused, is in FAULT, or the acquisition failed."""


@dataclass(frozen=True)
class Plan:
    """What one acquisition takes: Sardana's integration time, repetitions, latency and
    synchronisation (an :class:`AcqSynch` name)."""

    integration_time: float
    repetitions: int = 1
    latency: float = 0.0
    synchronization: str = SOFTWARE_TRIGGER

    @property
    def hardware(self) -> bool:
        return self.synchronization in HARDWARE


@dataclass
class Acquisition:
    """One Start of the device, shared by the controllers that joined it."""

    seq: int
    plan: Plan
    series_before: int
    ended_before: int
    ended: bool = False
    series: int | None = None
    outcome: str = ""  # the device's acquisition_status once ended
    problem: str | None = None  # why its results cannot be used (None: they can)
    frames_missing: int = 0
    saved_file: str = ""
    device_problem: str | None = None  # the device went FAULT/UNKNOWN while this acquisition ran
    stop_sent: bool = False
    _final: dict[str, np.ndarray] = field(default_factory=dict)


class DeviceLink:
    """The device as the controllers of one Pool use it; one per device (:func:`link_for`)."""

    def __init__(self, name: str, proxy_factory: Callable[[str], Any] = tango.DeviceProxy) -> None:
        self.name = name
        self._proxy_factory = proxy_factory
        self._proxy: Any = None
        self._lock = threading.RLock()
        self._seq = 0
        self._acquisition: Acquisition | None = None
        self._required: dict[str, frozenset[str]] = {}  # owner -> analyses its channels need
        # owner -> (least mode, "dir/pattern" or None, the load mark it was asked at): a want counts
        # for the next acquisition only, so a controller left out of the next group asks for nothing
        self._saving: dict[str, tuple[str, str | None, int]] = {}
        self._enum_labels: dict[str, list[str]] = {}
        self._result_analyses: dict[str, str] | None = None  # read once: see result_analyses
        self._role: str | None = None  # read once: see saves_frames
        # (the device's saving mode before the link raised it, the mode the link set) or None
        self._raised: tuple[str, str] | None = None

    @property
    def proxy(self) -> Any:
        if self._proxy is None:
            self._proxy = self._proxy_factory(self.name)
        return self._proxy

    # -- what the controllers need --------------------------------------------------------------

    def require(self, owner: str, analyses: set[str] | frozenset[str]) -> None:
        """``owner``'s channels need these analyses (the device runs the union of all owners')."""
        with self._lock:
            self._required[owner] = frozenset(analyses)

    def want_saving(self, owner: str, mode: str, location: str | None = None) -> None:
        """``owner`` needs series files of at least ``mode`` for the next acquisition (asked at each
        load); ``location`` is ``directory/name_pattern`` below the device's SavingBaseDirectory
        (None: the device's own)."""
        if mode not in SAVING_ORDER:
            raise LinkError(f"saving mode {mode!r} is not one of {', '.join(SAVING_ORDER)}")
        with self._lock:
            self._saving[owner] = (mode, location, self._seq)

    def result_analyses(self, refresh: bool = False) -> dict[str, str]:
        """Result attribute -> the analysis that publishes it, as the device lists them: read once
        (the list is fixed while the server runs) and again with ``refresh`` (a name not found)."""
        with self._lock:
            if self._result_analyses is None or refresh:
                out: dict[str, str] = {}
                for line in self.proxy.result_attributes or ():
                    analysis, _, names = line.partition(":")
                    for name in names.split(","):
                        if name.strip():
                            out[name.strip()] = analysis.strip()
                self._result_analyses = out
            return dict(self._result_analyses)

    def saves_frames(self) -> bool:
        """Whether the device's series files can hold the frames: not a merging device's (Role
        merger: its nodes receive and save the frames); read once."""
        with self._lock:
            if self._role is None:
                try:
                    self._role = str(self.proxy.role)
                except (tango.DevFailed, AttributeError):
                    self._role = "single"  # a device of a version before roles
            return self._role != "merger"

    def analysis_of(self, result: str) -> str:
        """The analysis that publishes ``result`` (LinkError when the device has none)."""
        known = self.result_analyses()
        if result not in known:
            known = self.result_analyses(refresh=True)
        if result not in known:
            raise LinkError(f"{self.name} has no result {result!r}; it offers {', '.join(sorted(known))}")
        return known[result]

    def frame_shape(self) -> tuple[int, int]:
        """(height, width) of the frames as the stream delivers them (binning and ROI applied)."""
        for pair in (("frame_height", "frame_width"), ("y_pixels_in_detector", "x_pixels_in_detector")):
            try:
                values = [reply.value for reply in self.proxy.read_attributes(list(pair))]
            except tango.DevFailed:
                continue
            if all(isinstance(v, (int, np.integer)) and v > 0 for v in values):
                return int(values[0]), int(values[1])
        raise LinkError(f"{self.name}: the detector's frame size is not known (is it initialized?)")

    # -- one acquisition ------------------------------------------------------------------------

    def load(self) -> int:
        """A controller loaded its parameters: returns the mark its start compares with."""
        with self._lock:
            return self._seq

    def start(self, loaded: int, plan: Plan) -> Acquisition:
        """Join the acquisition started since ``loaded`` (the caller's load mark), or start one."""
        with self._lock:
            current = self._acquisition
            if current is not None and current.seq > loaded:
                if current.plan != plan:
                    raise LinkError(f"{self.name}: two controllers of one measurement group asked for different "
                                    f"acquisitions ({current.plan} and {plan}); give them the same timer settings")
                return current
            if current is not None and not current.ended and not self._poll(current):
                raise LinkError(f"{self.name} is still running the previous acquisition "
                                f"(series {current.series_before + 1}); stop it first")
            series_before, ended_before = self._configure(plan)
            self._seq += 1
            acquisition = Acquisition(self._seq, plan, series_before, ended_before)
            try:
                self.proxy.Start()
            except tango.DevFailed as error:
                raise LinkError(f"{self.name} refused Start: {error.args[0].desc}") from error
            self._acquisition = acquisition
            if plan.hardware:
                self._wait_armed(acquisition)
            return acquisition

    def _wait_armed(self, acquisition: Acquisition, timeout: float = 60.0) -> None:
        """With hardware triggers the scan starts the trigger generator once the detector is
        started: return only when the device armed the DCU (its series began), or a trigger
        sent before would be lost. Start returns at once; the arm follows within milliseconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            series, ended = (int(reply.value) for reply in self.proxy.read_attributes(["series_id",
                                                                                       "acquisitions_ended"]))
            if series != acquisition.series_before:
                return
            if ended > acquisition.ended_before:
                self._poll(acquisition)
                raise LinkError(acquisition.problem or f"{self.name}: the acquisition ended before it was armed")
            time.sleep(0.005)
        raise LinkError(f"{self.name} was not armed {timeout:.0f} s after Start: {self.proxy.acquisition_status}")

    def ended(self, acquisition: Acquisition) -> bool:
        with self._lock:
            return acquisition.ended or self._poll(acquisition)

    def results(self, acquisition: Acquisition, names: list[str]) -> dict[str, np.ndarray]:
        """The named results of ``acquisition``: its final ones once it ended (read once and kept),
        the device's latest intermediate ones while it runs (NaN where not processed yet)."""
        with self._lock:
            if not (acquisition.ended or self._poll(acquisition)):
                return self._read(names)
            if acquisition.problem is not None:
                raise LinkError(acquisition.problem)
            missing = [name for name in names if name not in acquisition._final]
            if missing:
                acquisition._final.update(self._read(missing))
            return {name: acquisition._final[name] for name in names}

    def stop(self, acquisition: Acquisition, abort: bool = False) -> None:
        """Stop (what arrived is processed and published) or abort the device's acquisition, once."""
        with self._lock:
            if acquisition.ended or acquisition.stop_sent:
                return
            acquisition.stop_sent = True
            try:
                self.proxy.Abort() if abort else self.proxy.Stop()
            except tango.DevFailed as error:
                log.warning("%s: %s failed: %s", self.name, "Abort" if abort else "Stop", error.args[0].desc)

    def state_problem(self) -> str | None:
        """The device's State as a scan user needs it: None when usable, else why not."""
        try:
            state, status = (reply.value for reply in self.proxy.read_attributes(["State", "Status"]))
        except tango.DevFailed as error:
            return f"{self.name} does not answer: {error.args[0].desc}"
        return _problem_of(self.name, state, status)

    # -- inside --------------------------------------------------------------------------------

    def _read_values(self, names: list[str]) -> list[Any]:
        try:
            return [reply.value for reply in self.proxy.read_attributes(names)]
        except tango.DevFailed as error:
            raise LinkError(f"{self.name} does not answer: {error.args[0].desc}") from error

    def _poll(self, acquisition: Acquisition) -> bool:
        """Whether the device's acquisition is over; when it is, its outcome is recorded. One
        read per call: the end counter, the outcome and the device's State (a device that went
        FAULT or UNKNOWN while acquiring is reported in ``acquisition.device_problem``)."""
        values = self._read_values(["acquisitions_ended", "series_id", "acquisition_status", "frames_missing",
                                    "last_saved_file", "State", "Status"])
        if int(values[0]) <= acquisition.ended_before:
            problem = _problem_of(self.name, values[5], values[6])
            acquisition.device_problem = problem if values[5] in (tango.DevState.FAULT,
                                                                  tango.DevState.UNKNOWN) else None
            return False
        acquisition.ended = True
        acquisition.device_problem = None
        acquisition.series = int(values[1])
        acquisition.outcome = str(values[2])
        acquisition.frames_missing = int(values[3])
        acquisition.saved_file = str(values[4])
        if acquisition.series == acquisition.series_before:
            acquisition.problem = f"{self.name}: no series was acquired: {acquisition.outcome}"
        elif not acquisition.outcome.startswith((f"series {acquisition.series} done",
                                                 f"series {acquisition.series} stopped")):
            acquisition.problem = f"{self.name}: {acquisition.outcome}"
        return True

    def _read(self, names: list[str]) -> dict[str, np.ndarray]:
        if not names:
            return {}
        replies = self.proxy.read_attributes(names)
        out = {}
        for name, reply in zip(names, replies):
            if reply.has_failed:
                raise LinkError(f"{self.name}/{name} cannot be read: {reply.get_err_stack()[0].desc}")
            value = reply.value
            out[name] = np.zeros((0, 0)) if value is None else np.asarray(value, dtype=np.float64)
        return out

    def _configure(self, plan: Plan) -> tuple[int, int]:
        """The device's settings for ``plan``: read in one call with its State, its series id and
        its end counter (returned), written only where they differ."""
        trigger_mode, images_per_trigger = _TRIGGERING.get(plan.synchronization, (None, None))
        if trigger_mode is None:
            raise LinkError(f"synchronisation {plan.synchronization} is not supported")
        if not plan.integration_time > 0 or not math.isfinite(plan.integration_time):
            raise LinkError(f"integration time {plan.integration_time} s: only a time (> 0) is supported, "
                            f"not a monitor count")
        # a line of ``repetitions`` positions: scan-shaped results are 2-D for every analysis
        # (LiberTEM's centre of mass takes only a 2-D scan)
        wanted: dict[str, Any] = {
            "trigger_mode": trigger_mode, "images_per_trigger": images_per_trigger,
            "nav_shape": [1, int(plan.repetitions)], "count_time": float(plan.integration_time)}
        if plan.synchronization == HARDWARE_START and plan.latency > 0:
            wanted["frame_time"] = float(plan.integration_time + plan.latency)
        analyses = frozenset().union(*self._required.values()) if self._required else frozenset()
        mode, location = self._saving_wanted()
        names = list(wanted) + ["analyses", "saving_mode", "saving_directory", "saving_name_pattern", "State",
                                "Status", "series_id", "acquisitions_ended"]
        current = dict(zip(names, self._read_values(names)))
        problem = _problem_of(self.name, current["State"], current["Status"])
        if problem is not None:
            raise LinkError(problem)
        if analyses and not analyses <= set(current["analyses"] or ()):
            merged = list(current["analyses"] or ()) + sorted(analyses - set(current["analyses"] or ()))
            self._write("analyses", merged)
        self._set_saving_mode(mode, current["saving_mode"] or "off")
        if location is not None:
            directory, _, pattern = location.rpartition("/")
            if directory != current["saving_directory"]:
                self._write("saving_directory", directory)
            if pattern and pattern != current["saving_name_pattern"]:
                self._write("saving_name_pattern", pattern)
        for name, value in wanted.items():
            now = current[name]
            if name == "trigger_mode":
                now = self._labels(name)[int(now)] if now is not None else None
                if now != value:
                    self._write(name, self._labels(name).index(value))
            elif name == "nav_shape":
                if list(now if now is not None else ()) != value:
                    self._write(name, value)
            elif isinstance(value, float):
                if now is None or not math.isclose(float(now), value, rel_tol=1e-9, abs_tol=1e-12):
                    self._write(name, value)
            elif now != value:
                self._write(name, value)
        return int(current["series_id"]), int(current["acquisitions_ended"])

    def _set_saving_mode(self, wanted: str, current: str) -> None:
        """Raise the device's saving to what the controllers need; lower it back, down to what
        it was before, once they need less -- unless a client changed it meanwhile (then it is
        that client's choice and stays)."""
        level = SAVING_ORDER.index
        if self._raised is not None and current != self._raised[1]:
            self._raised = None  # changed by someone else since we raised it
        if level(wanted) > level(current):
            self._write("saving_mode", wanted)
            self._raised = (self._raised[0] if self._raised else current, wanted)
        elif self._raised is not None and level(wanted) < level(current):
            target = max(wanted, self._raised[0], key=level)
            self._write("saving_mode", target)
            self._raised = None if target == self._raised[0] else (self._raised[0], target)

    def _saving_wanted(self) -> tuple[str, str | None]:
        mode, location = "off", None
        for owner_mode, owner_location, mark in self._saving.values():
            if mark != self._seq:
                continue
            if SAVING_ORDER.index(owner_mode) > SAVING_ORDER.index(mode):
                mode = owner_mode
            if owner_location:
                location = owner_location
        return mode, location

    def _labels(self, name: str) -> list[str]:
        if name not in self._enum_labels:
            self._enum_labels[name] = list(self.proxy.get_attribute_config(name).enum_labels)
        return self._enum_labels[name]

    def _write(self, name: str, value: Any) -> None:
        try:
            self.proxy.write_attribute(name, value)
        except tango.DevFailed as error:
            raise LinkError(f"{self.name}: {name} = {value!r} refused: {error.args[0].desc}") from error


def _problem_of(name: str, state: Any, status: str) -> str | None:
    """Why a device in ``state`` cannot take a scan (None: it can)."""
    if state in (tango.DevState.FAULT, tango.DevState.UNKNOWN, tango.DevState.OFF, tango.DevState.INIT):
        return f"{name} is {state}: {status}"
    return None


_LINKS: dict[str, DeviceLink] = {}
_LINKS_LOCK = threading.Lock()


def link_for(name: str) -> DeviceLink:
    """The one link of this process to device ``name``, shared by every controller using it."""
    key = name.strip().lower()
    with _LINKS_LOCK:
        link = _LINKS.get(key)
        if link is None:
            link = _LINKS[key] = DeviceLink(name.strip())
        return link
