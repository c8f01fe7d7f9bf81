"""The simulated DCU: detector configuration rules and the acquisition state machine.

:class:`DetectorConfiguration` applies SIMPLON's interdependencies (timing, energy, ROI) to a
written value and reports the keys that changed. :class:`SimulatedDetector` is the state machine
(na → idle → ready → acquire → ... → idle) behind the REST layer; it decides when a series starts,
which frames each trigger produces and when the series ends, and hands the sending to a
:class:`~sim.series.StreamSink`. One lock guards the state; frames are never sent under it.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sim.models import (HC_EV_ANGSTROM, K_ALPHA1_EV, MAX_IMAGES, DetectorModel, Geometry,
                        detector_config, detector_status, filewriter_config, filewriter_status,
                        monitor_config, monitor_status, stream_config, stream_status, system_status)
from sim.parameters import InvalidParameterValue, ParameterNotFound, ParameterStore, format_value, now_iso
from sim.series import SeriesInfo, StreamSink

log = logging.getLogger(__name__)

MODULES = ("detector", "stream", "filewriter", "monitor", "system")
SUPPORTED_API_VERSIONS = ("1.8.0", "1.6.0")
EXTERNAL_TRIGGER_MODES = ("exts", "exte")
ONE_IMAGE_PER_TRIGGER_MODES = ("inte", "exte")
MAX_SERIES_DURATION_S = 7 * 24 * 3600.0  # firmware 2020.2.2 refuses longer series at arm

DETECTOR_COMMANDS = ("initialize", "arm", "trigger", "disarm", "cancel", "abort")
LEGACY_DETECTOR_COMMANDS = ("status_update",)  # API 1.6.0 only
MODULE_COMMANDS = {"stream": ("initialize",), "filewriter": ("clear", "initialize"),
                   "monitor": ("clear", "initialize"), "system": ()}

_TIMING_KEYS = ("bit_depth_image", "bit_depth_readout", "count_time", "countrate_correction_count_cutoff",
                "frame_count_time", "frame_time")
_ENERGY_KEYS = ("element", "incident_energy", "photon_energy", "threshold/1/energy", "threshold/2/energy",
                "threshold_energy", "wavelength")
_GEOMETRY_KEYS = (*_TIMING_KEYS, "x_pixels_in_detector", "y_pixels_in_detector")

# What a PUT reports as "changed, or may have changed" (SIMPLON.md §1.5, after a real DCU); the
# flatfield keys of the real lists are left out because this simulator has no flatfield.
CHANGE_LISTS: dict[str, tuple[str, ...]] = {
    "auto_summation": ("auto_summation", "bit_depth_image", "frame_count_time"),
    "count_time": _TIMING_KEYS,
    "frame_time": _TIMING_KEYS,
    "photon_energy": _ENERGY_KEYS,
    "incident_energy": _ENERGY_KEYS,
    "element": _ENERGY_KEYS,
    "wavelength": _ENERGY_KEYS,
    "threshold_energy": ("threshold/1/energy", "threshold_energy"),
    "threshold/1/energy": ("threshold/1/energy", "threshold_energy"),
    "threshold/1/mode": ("threshold/1/mode", "threshold/difference/mode"),
    "threshold/2/mode": ("threshold/2/mode", "threshold/difference/mode"),
    "roi_mode": ("roi_mode", *_GEOMETRY_KEYS),
    "binning_mode": ("binning_mode", *_GEOMETRY_KEYS),
    "roi_y_size": ("roi_y_size", "y_pixels_in_detector"),
    "trigger_mode": ("nimages", "trigger_mode"),
    "pixel_format": ("bit_depth_image", "pixel_format"),
}

_CROCKFORD32 = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


class CommandRejected(RuntimeError):
    """A command or write the detector cannot carry out in its current state (HTTP 400)."""


class WriteRefusedByServer(RuntimeError):
    """A write refused the way LiberTEM-live's simulator refuses it: HTTP 500 with a JSON
    ``{"error": ...}`` body (the sim setting ``writes: same_value_only``)."""


#: Sim setting ``writes``: ``any`` (a DCU: every valid value is taken) or ``same_value_only``
#: (LiberTEM-live's replaying simulator: only the value a key already has; others get HTTP 500).
WRITE_POLICIES = ("any", "same_value_only")


class UnknownCommand(LookupError):
    """No such command on that module (HTTP 404)."""

    def __str__(self) -> str:
        return str(self.args[0])


def new_ulid() -> str:
    """A 26-character ULID (48-bit millisecond time + 80 random bits, Crockford base32)."""
    number = (int(time.time() * 1000) << 80) | int.from_bytes(os.urandom(10), "big")
    return "".join(_CROCKFORD32[(number >> (5 * shift)) & 31] for shift in range(25, -1, -1))


class DetectorConfiguration:
    """The detector config values of one model, kept consistent with each other."""

    def __init__(self, model: DetectorModel) -> None:
        self.model = model
        self.store = detector_config(model)
        self._rules: dict[str, Callable[[Any], None]] = {
            "count_time": self._set_count_time,
            "frame_time": self._set_frame_time,
            "auto_summation": self._set_and_retime("auto_summation"),
            "pixel_format": self._set_and_retime("pixel_format"),
            "photon_energy": self._set_energy,
            "incident_energy": self._set_energy,
            "element": self._set_element,
            "wavelength": self._set_wavelength,
            "threshold_energy": self._set_threshold_1,
            "threshold/1/energy": self._set_threshold_1,
            "threshold/1/mode": self._set_threshold_mode("threshold/1/mode"),
            "threshold/2/mode": self._set_threshold_mode("threshold/2/mode"),
            "threshold/difference/mode": self._set_difference_mode,
            "roi_mode": self._set_geometry_key("roi_mode"),
            "binning_mode": self._set_geometry_key("binning_mode"),
            "roi_y_size": self._set_roi_y_size,
            "trigger_mode": self._set_trigger_mode,
            "nimages": self._set_nimages,
        }
        self._apply_geometry(reset_timing=False)

    def value(self, key: str) -> Any:
        return self.store.value(key)

    def geometry(self) -> Geometry:
        store = self.store
        return self.model.geometry(
            store.value("roi_mode"),
            store.value("binning_mode") if "binning_mode" in store else "disabled",
            store.value("roi_y_size") if "roi_y_size" in store else 0)

    def write(self, key: str, raw: Any) -> list[str]:
        """Validate and apply a client's write; return the sorted keys that (may) have changed."""
        value = self.store[key].check_write(raw)
        rule = self._rules.get(key)
        if rule is None:
            self.store.set(key, value)
        else:
            rule(value)
        changed = {key, *CHANGE_LISTS.get(key, ())}
        return sorted(name for name in changed if name in self.store)

    # timing -----------------------------------------------------------------------------------
    def _set_count_time(self, count_time: float) -> None:
        readout = self.model.readout_time_s
        self.store.set("count_time", count_time)
        if count_time + readout > self.value("frame_time"):
            self.store.set("frame_time", count_time + readout)
        self._derive_timing()

    def _set_frame_time(self, frame_time: float) -> None:
        readout = self.model.readout_time_s
        self.store.set("frame_time", frame_time)
        if self.value("count_time") + readout > frame_time:
            self.store.set("count_time", frame_time - readout)
        self._derive_timing()

    def _set_and_retime(self, key: str) -> Callable[[Any], None]:
        def rule(value: Any) -> None:
            self.store.set(key, value)
            self._derive_timing()
        return rule

    def _derive_timing(self) -> None:
        """bit_depth_image, frame_count_time and the count-rate cutoff follow from the timing."""
        rates = self.geometry().rates
        count_time = self.value("count_time")
        auto_summation = self.value("auto_summation")
        bit_depth = rates.bit_depth(self.value("frame_time"), auto_summation)
        if "pixel_format" in self.store and self.value("pixel_format") != "auto":
            bit_depth = int(self.value("pixel_format").removeprefix("uint"))
        subframes = 1
        if auto_summation and count_time > rates.max_subframe_time:
            subframes = math.ceil(count_time / rates.max_subframe_time)
        self.store.set("bit_depth_image", bit_depth)
        self.store.set("frame_count_time", count_time / subframes)
        cutoff = min(2 ** bit_depth - 2, int(self.model.max_count_rate_cps * count_time))
        self.store.set("countrate_correction_count_cutoff", cutoff)

    # geometry ---------------------------------------------------------------------------------
    def _set_geometry_key(self, key: str) -> Callable[[Any], None]:
        def rule(value: Any) -> None:
            self.store.set(key, value)
            # SIMPLON.md §1.5: roi_mode resets count_time and frame_time
            self._apply_geometry(reset_timing=True)
        return rule

    def _set_roi_y_size(self, rows: int) -> None:
        if rows % 2:
            raise InvalidParameterValue(f"roi_y_size: {rows} is odd; the lines ROI height must be even")
        self.store.set("roi_y_size", rows)
        self._apply_geometry(reset_timing=False)

    def _apply_geometry(self, reset_timing: bool) -> None:
        geometry = self.geometry()
        readout = self.model.readout_time_s
        min_frame_time = geometry.rates.min_frame_time
        self.store.set("x_pixels_in_detector", geometry.width)
        self.store.set("y_pixels_in_detector", geometry.height)
        self.store["frame_time"].min = min_frame_time
        self.store["count_time"].min = min_frame_time - readout
        frame_time = self.value("frame_time")
        if reset_timing or frame_time < min_frame_time:
            frame_time = max(self.model.default_frame_time_s, min_frame_time)
            self.store.set("frame_time", frame_time)
            self.store.set("count_time", frame_time - readout)
        self._derive_timing()

    # energies ---------------------------------------------------------------------------------
    def _set_energy(self, energy: float, element: str = "") -> None:
        self.store.set("element", element)
        self.store.set("photon_energy", energy)
        self.store.set("incident_energy", energy)
        self.store.set("wavelength", HC_EV_ANGSTROM / energy)
        self._set_threshold_1(0.5 * energy)
        self.store.set("threshold/2/energy", 1.4 * energy)

    def _set_element(self, element: str) -> None:
        if element:
            self._set_energy(K_ALPHA1_EV[element], element)
        else:
            self.store.set("element", "")

    def _set_wavelength(self, wavelength: float) -> None:
        low, high = self.model.energy_range_ev
        # the wavelength limits are the energy limits; clamp the last-digit rounding at the ends
        self._set_energy(min(max(HC_EV_ANGSTROM / wavelength, low), high))
        self.store.set("wavelength", wavelength)

    def _set_threshold_1(self, energy: float) -> None:
        self.store.set("threshold/1/energy", energy)
        self.store.set("threshold_energy", energy)

    def _set_threshold_mode(self, key: str) -> Callable[[str], None]:
        def rule(mode: str) -> None:
            self.store.set(key, mode)
            if mode == "disabled":
                self.store.set("threshold/difference/mode", "disabled")
        return rule

    def _set_difference_mode(self, mode: str) -> None:
        if mode == "enabled" and not (self.value("threshold/1/mode") == self.value("threshold/2/mode")
                                      == "enabled"):
            raise InvalidParameterValue(
                'threshold/difference/mode: "enabled" needs threshold/1/mode and threshold/2/mode '
                '"enabled" first')
        self.store.set("threshold/difference/mode", mode)

    # frame counts -----------------------------------------------------------------------------
    def _set_trigger_mode(self, mode: str) -> None:
        self.store.set("trigger_mode", mode)
        if mode in ONE_IMAGE_PER_TRIGGER_MODES:
            self.store.set("nimages", 1)

    def _set_nimages(self, nimages: int) -> None:
        mode = self.value("trigger_mode")
        if mode in ONE_IMAGE_PER_TRIGGER_MODES and nimages != 1:
            raise InvalidParameterValue(
                f"nimages: {nimages} is not allowed in trigger mode {mode}: each trigger makes one "
                "image there, set ntrigger instead")
        self.store.set("nimages", nimages)


@dataclass(eq=False)
class _ArmedSeries:
    """Book-keeping of the series between arm and its end."""

    info: SeriesInfo
    stop: threading.Event = field(default_factory=threading.Event)
    # set whenever no thread is sending frames of this series
    sender_idle: threading.Event = field(default_factory=threading.Event)
    next_frame: int = 0
    triggers_done: int = 0
    ended: bool = False  # someone has claimed the end of this series (end_series exactly once)
    ended_by_sender: bool = False  # the claim is the sending thread's: it calls end_series
    external_triggers: threading.Thread | None = None
    finished: threading.Event = field(default_factory=threading.Event)  # end sent, detector idle

    def __post_init__(self) -> None:
        self.sender_idle.set()


class SimulatedDetector:
    """The DCU's modules (detector, stream, filewriter, monitor, system) and the state machine."""

    def __init__(self, model: DetectorModel, sink: StreamSink) -> None:
        self.model = model
        self.sink = sink
        self._lock = threading.Lock()
        self._configuration = DetectorConfiguration(model)
        self._config: dict[str, ParameterStore] = {
            "detector": self._configuration.store, "stream": stream_config(),
            "filewriter": filewriter_config(), "monitor": monitor_config(), "system": ParameterStore([])}
        self._status: dict[str, ParameterStore] = {
            "detector": detector_status(), "stream": stream_status(), "filewriter": filewriter_status(),
            "monitor": monitor_status(), "system": system_status()}
        self._initialized = False
        self._series_id = 0
        self._series: _ArmedSeries | None = None
        self._ext_trigger_delay_s = 0.0
        self._ext_trigger_period_s: float | None = None  # None: nimages * frame_time
        self._write_policy = "any"
        self._started = time.monotonic()

    # read side ------------------------------------------------------------------------------
    @property
    def state(self) -> str:
        with self._lock:
            return self._status["detector"].value("state")

    @property
    def series_id(self) -> int:
        with self._lock:
            return self._series_id

    def get_config(self, module: str, key: str) -> dict[str, Any]:
        """The JSON of ``GET /<module>/api/<v>/config/<key>``."""
        with self._lock:
            store = self._module_store(self._config, module, key)
            if not self._initialized:
                raise ParameterNotFound(key)
            return store[key].config_json()

    def get_status(self, module: str, key: str) -> dict[str, Any]:
        """The JSON of ``GET /<module>/api/<v>/status/<key>``; before initialize only the detector
        state exists."""
        with self._lock:
            store = self._module_store(self._status, module, key)
            if not self._initialized and (module, key) != ("detector", "state"):
                raise ParameterNotFound(key)
            self._refresh_clock_status()
            return store[key].status_json()

    def config_keys(self, module: str) -> list[str]:
        return self._module_store(self._config, module, "keys").listed_keys()

    def status_keys(self, module: str) -> list[str]:
        return self._module_store(self._status, module, "keys").listed_keys()

    def command_keys(self, module: str, api_version: str = "1.8.0") -> list[str]:
        self._module_store(self._config, module, "keys")
        if module == "detector":
            legacy = LEGACY_DETECTOR_COMMANDS if api_version == "1.6.0" else ()
            return sorted((*DETECTOR_COMMANDS, *legacy))
        return sorted(MODULE_COMMANDS[module])

    @staticmethod
    def _module_store(stores: dict[str, ParameterStore], module: str, key: str) -> ParameterStore:
        if module not in stores:
            raise ParameterNotFound(f"{module}/{key}")
        return stores[module]

    def _refresh_clock_status(self) -> None:
        stamp = now_iso()
        self._status["detector"].set("time", stamp)
        self._status["system"].set("time", stamp)
        self._status["system"].set("uptime", round(time.monotonic() - self._started, 3))

    # writes ---------------------------------------------------------------------------------
    def put_config(self, module: str, key: str, value: Any) -> list[str]:
        """Apply ``PUT /<module>/api/<v>/config/<key>``; return the sorted changed keys."""
        with self._lock:
            store = self._module_store(self._config, module, key)
            if not self._initialized:
                raise CommandRejected("detector is not initialized")
            if self._write_policy == "same_value_only":
                self._refuse_other_value(store, key, value)
            if module == "detector":
                state = self._status["detector"].value("state")
                if state != "idle":
                    raise CommandRejected(
                        f"{key}: cannot be changed while the detector is {state}; disarm first")
                return self._configuration.write(key, value)
            store.set(key, store[key].check_write(value))
            self._follow_module_config(module)
            return [key]

    @staticmethod
    def _refuse_other_value(store: ParameterStore, key: str, raw: Any) -> None:
        current = store.value(key)
        try:
            same = store[key].check_write(raw) == current
        except InvalidParameterValue:
            return  # refused as a DCU refuses it (HTTP 400)
        if not same:
            raise WriteRefusedByServer(
                f"Value {format_value(raw)} for parameter {key} does not match the current value "
                f"{format_value(current)}.")

    def _follow_module_config(self, module: str) -> None:
        """Module status that mirrors its config (stream/filewriter state, monitor buffer)."""
        if module == "stream" and self._series is None:
            self._status["stream"].set("state", self._stream_idle_state())
        elif module == "filewriter":
            enabled = self._config["filewriter"].value("mode") == "enabled"
            self._status["filewriter"].set("state", "ready" if enabled else "disabled")
        elif module == "monitor":
            self._status["monitor"].set("buffer_free", self._config["monitor"].value("buffer_size"))

    def _stream_idle_state(self) -> str:
        return "ready" if self._config["stream"].value("mode") == "enabled" else "disabled"

    # commands -------------------------------------------------------------------------------
    def command(self, module: str, name: str, body: dict[str, Any] | None = None,
                api_version: str = "1.8.0") -> dict[str, Any]:
        """Run ``PUT /<module>/api/<v>/command/<name>``; returns the JSON answer."""
        if module not in MODULE_COMMANDS and module != "detector":
            raise UnknownCommand(f"unknown module {module!r}")
        if name not in self.command_keys(module, api_version):
            raise UnknownCommand(f"{module} has no command {name!r} in API {api_version}")
        if module != "detector":
            self._module_command(module, name)
            return {}
        if name == "initialize":
            return self.initialize()
        if name == "arm":
            return self.arm()
        if name == "trigger":
            return self.trigger((body or {}).get("value"))
        if name == "status_update":
            with self._lock:
                self._refresh_clock_status()
            return {}
        return self.end_series_now(name)

    def _module_command(self, module: str, name: str) -> None:
        with self._lock:
            status = self._status[module]
            if module == "stream":
                # SIMPLON: resets dropped and errors and sets the mode to disabled
                self._config["stream"].set("mode", "disabled")
                status.set("dropped", 0)
                status.set("error", [])
                if self._series is None:
                    status.set("state", "disabled")
            elif module == "filewriter":
                status.set("files", [])
                if name == "initialize":
                    status.set("error", [])
            elif module == "monitor":
                status.set("buffer_free", self._config["monitor"].value("buffer_size"))
                status.set("dropped", 0)
                if name == "initialize":
                    status.set("error", [])

    def initialize(self) -> dict[str, Any]:
        """`na`/any → `idle`; ends a running series and resets the series id to 0."""
        self._stop_series()
        with self._lock:
            self._initialized = True
            self._series_id = 0
            self._status["detector"].set("state", "idle")
            self._status["detector"].set("series_unique_id", "")
            self._status["stream"].set("state", self._stream_idle_state())
            self._follow_module_config("filewriter")
        return {}

    def arm(self) -> dict[str, Any]:
        """`idle` → `ready`: new series id and unique id, stream start message, external trigger
        source for exts/exte. Returns ``{"sequence id": N}``."""
        with self._lock:
            state = self._require_initialized("arm")
            if state != "idle":
                raise CommandRejected(f"arm: the detector is {state}, not idle; disarm first")
            config = self._configuration
            self._check_series_size()
            self._series_id += 1
            unique_id = new_ulid()
            arm_date = now_iso()
            config.store.set("data_collection_date", arm_date)
            status = self._status["detector"]
            status.set("series_unique_id", unique_id)
            status.set("state", "configure")
            stream_status_store = self._status["stream"]
            stream_status_store.set("dropped", 0)
            if self._config["stream"].value("mode") == "enabled":
                stream_status_store.set("state", "acquire")
            geometry = config.geometry()
            info = SeriesInfo(
                series_id=self._series_id, series_unique_id=unique_id, arm_date=arm_date,
                trigger_mode=config.value("trigger_mode"), nimages=config.value("nimages"),
                ntrigger=config.value("ntrigger"), count_time=config.value("count_time"),
                frame_time=config.value("frame_time"), width=geometry.width, height=geometry.height,
                bit_depth=config.value("bit_depth_image"), compression=config.value("compression"),
                detector_config=config.store.snapshot(), stream_config=self._config["stream"].snapshot())
            series = _ArmedSeries(info)
            self._series = series
            delay, period = self._ext_trigger_delay_s, self._ext_trigger_period_s
        try:
            self.sink.start_series(info)
        except BaseException as exc:
            with self._lock:
                series.ended = True
            self._finish(series)
            if isinstance(exc, ValueError):  # a setting the scientist can change (e.g. replay format)
                raise CommandRejected(f"arm: {exc}") from exc
            if isinstance(exc, MemoryError):
                raise CommandRejected(
                    f"arm: the simulator has not enough memory to prepare this series ({exc}); lower "
                    "the simulator's pool_size or nav_shape, or choose a smaller detector model or "
                    "ROI") from exc
            raise
        with self._lock:
            status.set("state", "ready")
            if info.trigger_mode in EXTERNAL_TRIGGER_MODES:
                series.sender_idle.clear()
                series.external_triggers = threading.Thread(
                    target=self._run_external_triggers, name=f"sim-external-triggers-{info.series_id}",
                    args=(series, delay, info.nimages * info.frame_time if period is None else period),
                    daemon=True)
                series.external_triggers.start()
        return {"sequence id": info.series_id}

    def _require_initialized(self, command: str) -> str:
        state = self._status["detector"].value("state")
        if not self._initialized:
            raise CommandRejected(f"{command}: detector is not initialized (send initialize first)")
        return state

    def _check_series_size(self) -> None:
        config = self._configuration
        total = config.value("nimages") * config.value("ntrigger")
        if total > MAX_IMAGES:
            raise CommandRejected(f"arm: nimages x ntrigger = {total} is above the maximum {MAX_IMAGES} images")
        duration = total * config.value("frame_time")
        if duration > MAX_SERIES_DURATION_S:
            raise CommandRejected(
                f"arm: the series would take {duration / 86400:.1f} days (nimages x ntrigger x frame_time),"
                " more than the 7-day limit")

    def trigger(self, count_time: Any = None) -> dict[str, Any]:
        """One software trigger (ints: nimages frames, inte: one frame of ``count_time``);
        blocks until its frames are sent."""
        with self._lock:
            state = self._require_initialized("trigger")
            series = self._series
            if series is None or state not in ("ready", "acquire"):
                raise CommandRejected(f"trigger: the detector is {state}, not armed; arm first")
            info = series.info
            if info.trigger_mode in EXTERNAL_TRIGGER_MODES:
                raise CommandRejected(
                    f"trigger: not allowed in trigger mode {info.trigger_mode}; the external trigger "
                    "input starts the images")
            if not series.sender_idle.is_set():
                raise CommandRejected("trigger: the images of the previous trigger are still being taken")
            frames_info, period = info, info.frame_time
            if count_time is not None:
                if info.trigger_mode != "inte":
                    raise CommandRejected(
                        f"trigger: a count time value is only accepted in trigger mode inte, not "
                        f"{info.trigger_mode}")
                exposure = self._configuration.store["count_time"].check_write(count_time)
                frames_info = dataclasses.replace(info, count_time=exposure)
                period = exposure + self.model.readout_time_s
            series.sender_idle.clear()
            self._status["detector"].set("state", "acquire")
            first = series.next_frame
            delay = self._configuration.value("trigger_start_delay") if info.trigger_mode == "ints" else 0.0
        try:
            self._expose(series, frames_info, first, info.nimages, period, delay)
        finally:
            if series.ended_by_sender:
                self._finish(series)
            series.sender_idle.set()
        return {}

    def _run_external_triggers(self, series: _ArmedSeries, delay: float, period: float) -> None:
        """The simulated external trigger input: ntrigger edges, the first after ``delay``, then
        one every ``period`` seconds (at once if the previous images took longer)."""
        info = series.info
        start_delay = self._configuration.value("trigger_start_delay")
        try:
            first_edge = time.monotonic() + delay
            for index in range(info.ntrigger):
                wait = first_edge + index * period - time.monotonic()
                if series.stop.wait(wait) if wait > 0 else series.stop.is_set():
                    break
                with self._lock:
                    if series.stop.is_set():
                        break
                    self._status["detector"].set("state", "acquire")
                if self._expose(series, info, series.next_frame, info.nimages, info.frame_time,
                                start_delay):
                    break
        except Exception:
            # a failing sink must not leave the detector armed forever with nobody to end it
            log.exception("external trigger source of series %d failed", info.series_id)
            with self._lock:
                if not series.ended:
                    series.ended = series.ended_by_sender = True
        finally:
            if series.ended_by_sender:
                self._finish(series)
            series.sender_idle.set()

    def _expose(self, series: _ArmedSeries, info: SeriesInfo, first: int, count: int, period: float,
                delay: float) -> bool:
        """Send one trigger's frames; True when they completed the series (then
        ``series.ended_by_sender`` is set and the caller ends it)."""
        try:
            if not (delay > 0 and series.stop.wait(delay)):
                self.sink.send_frames(info, first, count, period, series.stop)
        finally:
            with self._lock:
                self._status["stream"].set("dropped", self.sink.dropped_frames())
                series.next_frame = first + count
                series.triggers_done += 1
                completes = False
                if not series.stop.is_set() and not series.ended:
                    if series.triggers_done >= info.ntrigger:
                        series.ended = series.ended_by_sender = completes = True
                    else:
                        self._status["detector"].set("state", "ready")
        return completes

    def end_series_now(self, command: str = "disarm") -> dict[str, Any]:
        """disarm / cancel / abort: stop sending, end the series, `idle`. ``{"sequence id": N}``."""
        with self._lock:
            self._require_initialized(command)
        self._stop_series()
        with self._lock:
            return {"sequence id": self._series_id}

    def _stop_series(self) -> None:
        """Stop the running series (if any), wait for its sender, send the end exactly once."""
        with self._lock:
            series = self._series
            if series is None:
                return
            series.stop.set()
        series.sender_idle.wait()
        thread = series.external_triggers
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        with self._lock:
            claimed = not series.ended
            series.ended = True
        if claimed:
            self._finish(series)
        # a concurrent stop (or the sender) may hold the claim: answer only once the end is sent
        series.finished.wait()

    def _finish(self, series: _ArmedSeries) -> None:
        """Send the end of series, then go `idle` (only then may the next arm start a series)."""
        try:
            self.sink.end_series(series.info)
        finally:
            with self._lock:
                self._status["stream"].set("dropped", self.sink.dropped_frames())
                if self._series is series:
                    self._series = None
                    self._status["detector"].set("state", "idle")
                    self._status["stream"].set("state", self._stream_idle_state())
            series.finished.set()

    def shutdown(self) -> None:
        """End a running series (the server is stopping)."""
        self._stop_series()

    # simulator-only settings ------------------------------------------------------------------
    def get_sim_config(self) -> dict[str, Any]:
        """The sink's settings merged with the state machine's own."""
        settings = dict(self.sink.get_sim_config())
        with self._lock:
            settings.update(ext_trigger_delay_s=self._ext_trigger_delay_s,
                            ext_trigger_period_s=self._ext_trigger_period_s,
                            writes=self._write_policy)
        return settings

    def update_sim_config(self, changes: dict[str, Any]) -> dict[str, Any]:
        """Apply simulator settings: the external-trigger timing here, the rest in the sink.
        Raises ValueError with a readable message; nothing is applied then."""
        if not isinstance(changes, dict):
            raise ValueError(f"simulator settings must be a JSON object, not {format_value(changes)}")
        own = {key: changes[key] for key in ("ext_trigger_delay_s", "ext_trigger_period_s", "writes")
               if key in changes}
        for key, value in own.items():
            if key == "writes":
                if value not in WRITE_POLICIES:
                    raise ValueError(f"writes must be one of {', '.join(WRITE_POLICIES)}, got "
                                     f"{format_value(value)}")
                continue
            allow_null = key == "ext_trigger_period_s"
            if value is None and allow_null:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value < 0:
                hint = " or null (nimages x frame_time)" if allow_null else ""
                raise ValueError(f"{key}: {format_value(value)} is not a number of seconds >= 0{hint}")
        rest = {key: value for key, value in changes.items() if key not in own}
        applied = dict(self.sink.update_sim_config(rest)) if rest else {}
        with self._lock:
            if "ext_trigger_delay_s" in own:
                self._ext_trigger_delay_s = float(own["ext_trigger_delay_s"])
            if "ext_trigger_period_s" in own:
                period = own["ext_trigger_period_s"]
                self._ext_trigger_period_s = None if period is None else float(period)
            if "writes" in own:
                self._write_policy = own["writes"]
        applied.update(own)
        return applied
