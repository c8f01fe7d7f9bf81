"""The ``DectrisLive`` Tango device: a DECTRIS detector (SIMPLON API) in the control system.

Thin by design: the DCU client (:mod:`tango_dectris_live.simplon`) does the talking and the
:class:`~tango_dectris_live.simplon.supervision.DetectorSupervisor` decides the health; this class
only translates them into Tango attributes, commands, State/Status and events.
"""
from __future__ import annotations

import logging
import math
import os
import threading
import time
from typing import Any, Callable

import numpy as np
import tango
from tango import AttrQuality, AttrWriteType, DevState
from tango.server import Device, attribute, command, device_property

from ..processing.acquisition import (AcquisitionBusyError, AcquisitionMode, AcquisitionProgress,
                                      AcquisitionRequest, AcquisitionUpdate, LiveAcquisition, PipelineSettings)
from ..processing.analyses import AnalysisParameters, AnalysisRegistry, InvalidAnalysisParameters, UnknownAnalysisError
from ..processing.limits import (MachineLimits, SettingRefused, check_beam_center, check_nav_shape, check_radii,
                                 check_tuning, check_workers)
from ..processing.snapshot import ResultSnapshot
from ..receiver import CONNECTIONS, TRANSPORTS
from ..simplon.client import DetectorClient
from ..simplon.errors import DetectorNotInitializedError, SimplonError, UnknownParameterError
from ..simplon.supervision import DetectorCondition, DetectorHealth, DetectorSupervisor
from .simplon_attributes import (
    CORE_KEYS,
    UNLISTED_KEYS,
    SimplonAttribute,
    attribute_name,
    describe_attribute,
    tango_attribute_kwargs,
)

log = logging.getLogger(__name__)

_STATE_OF_CONDITION = {
    DetectorCondition.UNREACHABLE: DevState.UNKNOWN,
    DetectorCondition.NOT_INITIALIZED: DevState.OFF,
    DetectorCondition.INITIALIZING: DevState.INIT,
    DetectorCondition.IDLE: DevState.ON,
    DetectorCondition.BUSY: DevState.RUNNING,
    DetectorCondition.ERROR: DevState.FAULT,
}

# (module, task) pairs whose parameters become attributes, in creation order.
_PARAMETER_GROUPS = (
    ("detector", "config"), ("detector", "status"),
    ("stream", "config"), ("stream", "status"),
    ("filewriter", "config"), ("filewriter", "status"),
    ("monitor", "config"), ("monitor", "status"),
)

# Progress scalars: attribute name -> (Tango type, unit, AcquisitionProgress field, description).
_PROGRESS_ATTRIBUTES = {
    "series_id": (tango.DevLong64, "", "series_id", "series being processed (or the last one); -1 none yet"),
    "frames_expected": (tango.DevLong64, "", "frames_expected", "scan positions of the series"),
    "frames_received": (tango.DevLong64, "", "frames_received", "frames of the series received"),
    "frames_processed": (tango.DevLong64, "", "frames_processed", "frames of the series processed"),
    "frames_missing": (tango.DevLong64, "", "frames_missing",
                       "scan positions without a frame once the series ended (NaN in the results)"),
    "progress": (tango.DevDouble, "%", "progress", "share of the scan processed"),
    "receive_rate": (tango.DevDouble, "frames/s", "receive_rate", "frames received per second"),
    "process_rate": (tango.DevDouble, "frames/s", "process_rate", "frames processed per second"),
    "backlog": (tango.DevLong, "slots", "backlog", "frame-stack slots filled and not processed yet"),
    "acquisition_status": (tango.DevString, "", "message", "what the live processing is doing, in words"),
    "pipeline_hint": (tango.DevString, "", "hint",
                      "where the pipeline's bottleneck is, read from its telemetry (empty: none)"),
    "stream_transport": (tango.DevString, "", "transport",
                         "how the stream is read: zmtp (the receiver's own ZeroMQ reader) or libzmq; "
                         "empty before the first acquisition"),
    "messages_rejected": (tango.DevLong64, "", "messages_rejected",
                          "stream messages the receiver rejected since the series was armed (or, "
                          "listening, since the last series ended): see rejected_by_reason"),
    "rejected_by_reason": ((tango.DevString,), "", "rejected_by_reason",
                           "'reason: count' for each kind of rejected stream message (no_header, "
                           "stale, wrong_series, part_count, truncated, ...)"),
}
_TUNING = ("workers", "num_slots", "bytes_per_frame", "frame_stack_size", "frames_per_partition")
# Result images are pushed as float64: exact for the integer sums, and one type for every client.
_MAX_IMAGE_SIDE = 16384

# Fallbacks for a device started with -nodb (no properties): set by ``--dcu HOST:PORT``.
ENV_DCU_HOST = "DECTRIS_LIVE_DCU_HOST"
ENV_DCU_PORT = "DECTRIS_LIVE_DCU_PORT"


def _throw(exc: Exception, origin: str) -> None:
    """Re-raise a client-side error as the DevFailed a Tango client sees (reason = error class)."""
    tango.Except.throw_exception(type(exc).__name__, str(exc), origin)


class DectrisLive(Device):
    """A DECTRIS detector: every SIMPLON parameter as a typed attribute, SIMPLON commands,
    State from the detector state (ON idle, RUNNING armed/acquiring, OFF needs Initialize,
    FAULT detector error, UNKNOWN DCU unreachable)."""

    DcuHost = device_property(dtype=str, default_value="",
                              doc="Host name or address of the DCU (the detector control unit)")
    DcuPort = device_property(dtype=int, default_value=80, doc="HTTP port of the SIMPLON API")
    ApiVersion = device_property(dtype=str, default_value="",
                                 doc="SIMPLON API version (1.8.0 or 1.6.0); empty: ask the DCU")
    StreamPort = device_property(dtype=int, default_value=9999, doc="Stream v1 (legacy) port")
    Stream2Port = device_property(dtype=int, default_value=31001, doc="Stream v2 (CBOR) port")
    StatePollPeriod = device_property(dtype=float, default_value=1.0,
                                      doc="Seconds between two reads of the detector state")
    StreamHost = device_property(dtype=str, default_value="",
                                 doc="Host the detector's data stream comes from; empty: the DCU host")
    Workers = device_property(dtype=int, default_value=0,
                              doc="Worker processes that decode and analyse frames (0: automatic)")
    NumSlots = device_property(dtype=int, default_value=0,
                               doc="Frame-stack slots in shared memory (0: as many as fit ~64 MiB, 4 to 16)")
    BytesPerFrame = device_property(dtype=int, default_value=0,
                                    doc="Room per compressed frame in a slot (0: a quarter of the raw frame)")
    FrameStackSize = device_property(dtype=int, default_value=0,
                                     doc="Frames per stack (0: as many as fit in ~16 MiB, at most 4096)")
    FramesPerPartition = device_property(dtype=int, default_value=0,
                                         doc="Frames a worker decodes and analyses at once (0: a whole stack)")
    StreamTransport = device_property(
        dtype=str, default_value="auto",
        doc="How the data stream is read: auto (the receiver's own ZeroMQ reader for tcp://, libzmq where "
            "the detector asks for CURVE/PLAIN security or an old protocol), zmtp (always our reader), "
            "libzmq (always pyzmq/libzmq)")
    StreamConnection = device_property(
        dtype=str, default_value="per_series",
        doc="When the device is connected to the DCU's data stream: per_series (only while a series is "
            "armed or listened for, so that other consumers -- LiberTEM-live, a second receiver -- get "
            "whole series while the device is idle) or always (stays connected: a little less per Start, "
            "but the DCU deals every series' messages between all connected consumers)")
    NavShape = device_property(dtype=(int,), default_value=[],
                               doc="Remembered nav_shape (written by the device when a client sets it)")
    Analyses = device_property(dtype=(str,), default_value=["sum", "sumsig"],
                               doc="Remembered analyses (written by the device when a client sets them)")
    Radii = device_property(dtype=(float,), default_value=[],
                            doc="Remembered [bf_radius, adf_inner_radius, adf_outer_radius] in pixels; "
                                "empty: the defaults. Kept as one value (not three memorized attributes) "
                                "so that the ring's inner < outer holds whatever order they are restored in")
    BeamCenter = device_property(dtype=(float,), default_value=[],
                                 doc="Remembered beam_center [x, y] in pixels; empty: the detector's")

    # -- life cycle -------------------------------------------------------------------------

    def init_device(self) -> None:
        super().init_device()
        for name in ("State", "Status"):
            self.set_change_event(name, True, False)
        self._acquisition: LiveAcquisition | None = None
        self._init_live_settings()
        self._attributes: dict[str, SimplonAttribute] = {}
        self._attribute_lock = threading.Lock()
        self._attribute_builder: threading.Thread | None = None
        self._builder_lock = threading.Lock()
        self._config_attributes_built = False
        self._missing_parameters: list[str] = []
        host = self.DcuHost or os.environ.get(ENV_DCU_HOST, "")
        port = self.DcuPort if self.DcuHost else int(os.environ.get(ENV_DCU_PORT, self.DcuPort))
        self._supervisor = None
        if not host:
            self._set_health(DevState.FAULT, "the DcuHost property is not set: set it to the DCU's "
                                             "address (or start the server with --dcu HOST:PORT)")
            return
        if self.StreamConnection not in CONNECTIONS:
            self._set_health(DevState.FAULT, f"the StreamConnection property is {self.StreamConnection!r}: "
                                             f"set it to one of {', '.join(CONNECTIONS)}")
            return
        if self.StreamTransport not in TRANSPORTS:
            self._set_health(DevState.FAULT, f"the StreamTransport property is {self.StreamTransport!r}: "
                                             f"set it to one of {', '.join(TRANSPORTS)}")
            return
        self._client = DetectorClient(host, port, api_version=self.ApiVersion or None,
                                      on_changed=self._on_dcu_changed)
        self._supervisor = DetectorSupervisor(self._client, poll_period=self.StatePollPeriod,
                                              on_change=self._on_health,
                                              on_reconnect=self._on_reconnect)
        self._set_health(DevState.UNKNOWN, f"connecting to the DCU at {host}:{port}")
        self._supervisor.refresh()  # so that a reachable DCU's attributes exist at once
        self._supervisor.start()
        self._init_live_processing(self.StreamHost or host)

    def delete_device(self) -> None:
        acquisition = getattr(self, "_acquisition", None)
        if acquisition is not None:
            acquisition.close()
        if self._supervisor is not None:
            self._supervisor.stop()
            self._client.close()
        super().delete_device()

    # -- health → State/Status ----------------------------------------------------------------

    def dev_state(self) -> DevState:
        """The state the device set, without Tango's default turn to ALARM whenever an attribute
        reads with WARNING quality: a result with missing frames is not a detector alarm."""
        return self.get_state()

    def _set_health(self, state: DevState, status: str) -> None:
        state_changed = state != self.get_state()
        self.set_state(state)
        self.set_status(status)
        if state_changed:
            self.push_change_event("State", state)
        self.push_change_event("Status", status)

    def _on_health(self, health: DetectorHealth) -> None:
        if health.dcu_state not in (None, "na") and not self._config_attributes_built:
            # Reading ~100 parameters takes longer than a Tango client waits for a command, and
            # this may run in one (Initialize): build in the background, State INIT meanwhile.
            self._start_attribute_build()
            self._set_health(DevState.INIT, "reading the detector's parameters from the DCU")
            return
        status = health.message
        if self._missing_parameters:
            status += ("\nThe DCU does not provide: " + ", ".join(self._missing_parameters))
        state = _STATE_OF_CONDITION[health.condition]
        acquisition = getattr(self, "_acquisition", None)
        if acquisition is not None:
            if acquisition.mode == AcquisitionMode.ACTIVE and state == DevState.ON:
                state = DevState.RUNNING  # between series and triggers the DCU is idle: we are not
            status += f"\nLive processing ({acquisition.mode.value}): {self._progress.message}"
            if self._progress.hint:
                status += f"\nPipeline: {self._progress.hint}"
            if acquisition.last_error:
                status += f"\nLast acquisition error: {acquisition.last_error}"
        self._set_health(state, status)

    def _start_attribute_build(self) -> None:
        with self._builder_lock:
            if self._attribute_builder is not None and self._attribute_builder.is_alive():
                return
            self._attribute_builder = threading.Thread(target=self._build_then_publish,
                                                       name="simplon-attributes", daemon=True)
            self._attribute_builder.start()

    def _build_then_publish(self) -> None:
        try:
            self._build_simplon_attributes()
        except SimplonError as exc:
            # Retried at the next change of the DCU's health (e.g. once it answers again).
            self._set_health(DevState.FAULT, f"reading the detector's parameters failed: {exc}")
            return
        self._on_health(self._supervisor.health)

    def _on_reconnect(self) -> None:
        if not self.ApiVersion:
            self._client.discover_version()
        self._build_simplon_attributes()

    # -- SIMPLON parameters as dynamic attributes -------------------------------------------

    def _build_simplon_attributes(self) -> None:
        """Create an attribute for every parameter the DCU lists (plus the core set and the
        unlisted quirks). Before Initialize (``na``) a DCU answers only its state, so the rest is
        built when it leaves ``na``; existing attributes are kept."""
        try:
            dcu_state = self._client.state()
        except UnknownParameterError:
            dcu_state = "idle"  # a DCU that reports no state: taken as initialized (see the supervisor)
        with self._attribute_lock:
            missing = []
            for module, task in _PARAMETER_GROUPS:
                if dcu_state == "na" and (module, task) != ("detector", "status"):
                    continue
                keys = ["state"] if dcu_state == "na" else self._keys_of(module, task, missing)
                for key in keys:
                    name = attribute_name(module, task, key)
                    if name in self._attributes:
                        continue
                    try:
                        info = self._client.describe(module, task, key)
                    except (UnknownParameterError, DetectorNotInitializedError):
                        if key in CORE_KEYS.get((module, task), ()):
                            missing.append(f"{module}/{task}/{key}")
                        continue
                    spec = describe_attribute(info)
                    if spec is not None:
                        self._add_simplon_attribute(spec)
            if dcu_state != "na":
                self._config_attributes_built = True
            self._missing_parameters = missing

    def _keys_of(self, module: str, task: str, missing: list[str]) -> list[str]:
        try:
            keys = list(self._client.list_keys(module, task))
        except UnknownParameterError:
            # No listing (older firmware, minimal simulators): fall back to the core keys.
            missing.append(f"{module}/{task}/keys")
            keys = list(CORE_KEYS.get((module, task), ()))
        for key in UNLISTED_KEYS.get((module, task), ()):
            if key not in keys:
                keys.append(key)
        return keys

    def _add_simplon_attribute(self, spec: SimplonAttribute) -> None:
        kwargs = tango_attribute_kwargs(spec)
        attr = tango.Attr(spec.name, spec.dtype, spec.access) if spec.dformat == tango.AttrDataFormat.SCALAR \
            else tango.SpectrumAttr(spec.name, spec.dtype, spec.access, kwargs["max_dim_x"])
        props = tango.UserDefaultAttrProp()
        props.set_description(kwargs["doc"])
        if "unit" in kwargs:
            props.set_unit(kwargs["unit"])
            props.set_display_unit(kwargs["unit"])
        if "enum_labels" in kwargs:
            props.set_enum_labels(kwargs["enum_labels"])
        attr.set_default_properties(props)
        writer = self._write_simplon if spec.access == tango.AttrWriteType.READ_WRITE else None
        self.add_attribute(attr, r_meth=self._read_simplon, w_meth=writer)
        self.set_change_event(spec.name, True, False)
        self._attributes[spec.name] = spec

    def _read_simplon(self, attr: tango.Attribute) -> None:
        spec = self._attributes[attr.get_name()]
        try:
            value = self._client.get_value(spec.module, spec.info.task, spec.key)
        except SimplonError as exc:
            _throw(exc, f"DectrisLive.read({spec.name})")
        try:
            attr.set_value(spec.to_tango(value))
        except ValueError as exc:
            _throw(exc, f"DectrisLive.read({spec.name})")

    def _write_simplon(self, attr: tango.WAttribute) -> None:
        spec = self._attributes[attr.get_name()]
        value = spec.from_tango(attr.get_write_value())
        try:
            self._client.write(spec.module, spec.key, value)
        except SimplonError as exc:
            _throw(exc, f"DectrisLive.write({spec.name})")

    def _on_dcu_changed(self, module: str, key: str, value: Any) -> None:
        """The DCU reported ``key`` as changed by a write: push it to subscribers."""
        spec = self._attributes.get(attribute_name(module, "config", key))
        if spec is None or spec.info.task != "config":
            return
        try:
            self.push_change_event(spec.name, spec.to_tango(value))
        except ValueError as exc:
            log.warning("cannot publish the change of %s: %s", spec.name, exc)

    # -- SIMPLON commands -------------------------------------------------------------------

    def _require(self, condition: bool, name: str, reason: str) -> None:
        if not condition:
            tango.Except.throw_exception("CommandNotAllowed", f"{name} refused in State "
                                         f"{self.get_state()}: {reason}", f"DectrisLive.{name}")

    def _call(self, name: str, action: Callable[[], Any]) -> Any:
        if self._supervisor is None:
            tango.Except.throw_exception("NotConfigured", self.get_status(), f"DectrisLive.{name}")
        # Cleared before, not after: a background command (Trigger) may fail before action() returns.
        self._supervisor.clear_command_error()
        try:
            result = action()
        except SimplonError as exc:
            _throw(exc, f"DectrisLive.{name}")
        self._supervisor.refresh()
        return result

    @command(doc_in="Initialize the detector (runs in the background, up to minutes on real "
                    "hardware: State is INIT meanwhile, then ON)")
    def Initialize(self) -> None:
        self._call("Initialize",
                   lambda: self._supervisor.run_in_background("initialize", self._client.initialize))

    @command(dtype_out=int, doc_out="the series id of the armed series")
    def Arm(self) -> int:
        self._require(self.get_state() in (DevState.ON, DevState.FAULT), "Arm",
                      "the detector must be idle (State ON) to arm")
        return self._call("Arm", self._client.arm)

    @command(doc_in="Software trigger (ints/inte). Returns at once; in ints the series runs in the "
                    "background and State is RUNNING until it is done")
    def Trigger(self) -> None:
        self._require(self.get_state() == DevState.RUNNING and self._supervisor.running_command is None,
                      "Trigger", "the detector must be armed (State RUNNING, no trigger in progress)")
        def trigger_in_background() -> None:
            # The timeout needs three reads: do them now, so the trigger reaches the DCU as soon as
            # possible after this command returns (a client may Cancel right after).
            timeout = self._client.trigger_timeout()
            self._supervisor.run_in_background(
                "trigger", lambda: self._client.trigger(timeout=timeout))

        self._call("Trigger", trigger_in_background)

    @command(dtype_out=int, doc_out="the series id")
    def Disarm(self) -> int:
        return self._call("Disarm", self._client.disarm)

    @command(dtype_out=int, doc_out="the series id")
    def Cancel(self) -> int:
        return self._call("Cancel", self._client.cancel)

    @command(dtype_out=int, doc_out="the series id")
    def Abort(self) -> int:
        """Abort the detector and the live processing (pending frames are dropped)."""
        if getattr(self, "_acquisition", None) is not None:
            self._acquisition.abort()
        return self._call("Abort", self._client.abort)

    # -- live processing: settings ------------------------------------------------------------

    def _init_live_settings(self) -> None:
        """Analyses, their result attributes and parameters, tuning: everything that does not
        need the DCU (so that a misconfigured device still shows what it would compute)."""
        self._registry = AnalysisRegistry.discover()
        self._analysis_problems: list[str] = []
        self._result_names: dict[str, list[str]] = {}
        for name in self._registry.available():
            try:
                self._result_names[name] = self._registry.result_names(name)
            except Exception as exc:  # noqa: BLE001 - a facility analysis that cannot even run on blank frames
                log.error("analysis %s left out: %s", name, exc)
                self._analysis_problems.append(f"analysis {name} left out: {type(exc).__name__}: {exc}")
        self._results: dict[str, tuple[np.ndarray, AttrQuality, float]] = {}
        for names in self._result_names.values():
            for result in names:
                self._add_result_attribute(result)
        self._nav_shape: tuple[int, ...] | None = tuple(int(n) for n in self.NavShape) or None
        remembered = [a for a in self.Analyses if a in self._result_names]
        self._analyses: list[str] = remembered or ["sum", "sumsig"]
        self._beam_center: tuple[float, float] | None = \
            (float(self.BeamCenter[0]), float(self.BeamCenter[1])) if len(self.BeamCenter) == 2 else None
        defaults = AnalysisParameters()
        self._radii = {"bf_radius": defaults.bf_radius, "adf_inner_radius": defaults.adf_inner_radius,
                       "adf_outer_radius": defaults.adf_outer_radius}
        if len(self.Radii) == 3:
            try:
                check_radii(*self.Radii)
                self._radii = dict(zip(("bf_radius", "adf_inner_radius", "adf_outer_radius"),
                                       (float(r) for r in self.Radii)))
            except SettingRefused as exc:
                log.error("remembered radii %s not used: %s", list(self.Radii), exc)
        self._tuning = {"workers": self.Workers, "num_slots": self.NumSlots, "bytes_per_frame": self.BytesPerFrame,
                        "frame_stack_size": self.FrameStackSize, "frames_per_partition": self.FramesPerPartition}
        self._event_rate = 10.0
        self._series_timeout = 0.0
        self._progress = AcquisitionProgress(mode=AcquisitionMode.IDLE, message="idle")
        self._progress_lock = threading.Lock()
        for name, (dtype, unit, _field, doc) in _PROGRESS_ATTRIBUTES.items():
            attr = tango.SpectrumAttr(name, dtype[0], AttrWriteType.READ, 64) if isinstance(dtype, tuple) \
                else tango.Attr(name, dtype, AttrWriteType.READ)
            props = tango.UserDefaultAttrProp()
            props.set_description(doc)
            if unit:
                props.set_unit(unit)
            attr.set_default_properties(props)
            self.add_attribute(attr, r_meth=self._read_progress)
            self.set_change_event(name, True, False)

    def _init_live_processing(self, stream_host: str) -> None:
        self._acquisition = LiveAcquisition(
            self._client, stream_host, {1: self.StreamPort, 2: self.Stream2Port}, registry=self._registry,
            settings=PipelineSettings(**self._tuning), event_rate=self._event_rate,
            on_update=self._on_acquisition_update, transport=self.StreamTransport,
            connection=self.StreamConnection)
        # Worker processes take seconds to start: now, not in the first Start.
        threading.Thread(target=self._prepare_workers, name="start-workers", daemon=True).start()

    def _prepare_workers(self) -> None:
        try:
            self._acquisition.prepare()
        except (OSError, RuntimeError, ValueError) as exc:
            log.error("worker processes could not start: %s", exc)

    def _add_result_attribute(self, name: str) -> None:
        attr = tango.ImageAttr(name, tango.DevDouble, AttrWriteType.READ, _MAX_IMAGE_SIDE, _MAX_IMAGE_SIDE)
        props = tango.UserDefaultAttrProp()
        props.set_description(f"live result {name}: change events while a series is processed "
                              f"(quality CHANGING), a final one (VALID, or WARNING when frames are "
                              f"missing: their scan positions are NaN), then a data-ready event")
        attr.set_default_properties(props)
        self.add_attribute(attr, r_meth=self._read_result)
        self.set_change_event(name, True, False)
        self.set_data_ready_event(name, True)

    def _remember(self, prop: str, value: list) -> None:
        """Keep a spectrum setting in the device's properties (Tango memorizes only scalars)."""
        if not tango.Util._UseDb:
            return
        try:
            tango.Util.instance().get_database().put_device_property(self.get_name(), {prop: value})
        except tango.DevFailed as exc:
            log.warning("could not remember %s in the Tango database: %s", prop, exc)

    def _analysis_parameters(self) -> AnalysisParameters:
        centre = None if self._beam_center is None else (self._beam_center[1], self._beam_center[0])
        return AnalysisParameters(beam_centre=centre, **self._radii)

    # -- live processing: attributes -----------------------------------------------------------

    @attribute(dtype=(int,), max_dim_x=3, access=AttrWriteType.READ_WRITE,
               doc="Scan shape [rows, columns] (or [positions]); Start sets the detector's image count "
                   "from it; in passive mode used when it fits the series. Empty: from the detector "
                   "(active) or inferred (passive)")
    def nav_shape(self) -> list[int]:
        return list(self._nav_shape or [])

    @nav_shape.write
    def nav_shape(self, value: Any) -> None:
        shape = [int(n) for n in np.atleast_1d(value)]
        results = sum(len(self._result_names.get(name, ())) for name in self._analyses)
        try:
            self._nav_shape = check_nav_shape(shape, results, MachineLimits.of_this_machine())
        except SettingRefused as exc:
            _throw(exc, "DectrisLive.nav_shape")
        self._remember("NavShape", list(self._nav_shape or ()))

    @attribute(dtype=(str,), max_dim_x=64, access=AttrWriteType.READ_WRITE,
               doc="Analyses to run, by name (see available_analyses)")
    def analyses(self) -> list[str]:
        return list(self._analyses)

    @analyses.write
    def analyses(self, value: Any) -> None:
        try:
            names = self._registry.validate(list(value))
        except ValueError as exc:
            _throw(exc, "DectrisLive.analyses")
        left_out = [n for n in names if n not in self._result_names]
        if left_out:
            tango.Except.throw_exception("AnalysisUnavailable", "; ".join(self._analysis_problems),
                                         "DectrisLive.analyses")
        self._analyses = names
        self._remember("Analyses", names)

    @attribute(dtype=(str,), max_dim_x=256, doc="Names of the analyses that can be selected")
    def available_analyses(self) -> list[str]:
        return [name for name in self._registry.available() if name in self._result_names]

    @attribute(dtype=(str,), max_dim_x=1024,
               doc="'analysis: result attribute, ...' for every available analysis")
    def result_attributes(self) -> list[str]:
        return [f"{name}: {', '.join(results)}" for name, results in self._result_names.items()]

    def _frame_shape(self) -> tuple[int, int] | None:
        """(height, width) of the detector's frames, None when the DCU cannot tell now."""
        if self._supervisor is None:
            return None
        try:
            return (int(self._client.get_value("detector", "config", "y_pixels_in_detector")),
                    int(self._client.get_value("detector", "config", "x_pixels_in_detector")))
        except (SimplonError, TypeError, ValueError):
            return None  # checked again against the frame at Start

    def _radius(self, name: str, value: float) -> None:
        radii = {**self._radii, name: float(value)}
        try:
            check_radii(radii["bf_radius"], radii["adf_inner_radius"], radii["adf_outer_radius"],
                        self._frame_shape())
        except SettingRefused as exc:
            if "must be smaller than" in str(exc):
                exc = SettingRefused(f"{exc}: to move the annulus outwards write adf_outer_radius first, "
                                     f"inwards adf_inner_radius first")
            _throw(exc, f"DectrisLive.{name}")
        self._radii = radii
        self._remember("Radii", [radii["bf_radius"], radii["adf_inner_radius"], radii["adf_outer_radius"]])

    @attribute(dtype=float, unit="px", access=AttrWriteType.READ_WRITE,
               doc="Radius of the virtual bright-field disk (analysis bf); remembered")
    def bf_radius(self) -> float:
        return self._radii["bf_radius"]

    @bf_radius.write
    def bf_radius(self, value: float) -> None:
        self._radius("bf_radius", value)

    @attribute(dtype=float, unit="px", access=AttrWriteType.READ_WRITE,
               doc="Inner radius of the virtual annular dark field (analysis adf), below adf_outer_radius; "
                   "remembered")
    def adf_inner_radius(self) -> float:
        return self._radii["adf_inner_radius"]

    @adf_inner_radius.write
    def adf_inner_radius(self, value: float) -> None:
        self._radius("adf_inner_radius", value)

    @attribute(dtype=float, unit="px", access=AttrWriteType.READ_WRITE,
               doc="Outer radius of the virtual annular dark field (analysis adf); remembered")
    def adf_outer_radius(self) -> float:
        return self._radii["adf_outer_radius"]

    @adf_outer_radius.write
    def adf_outer_radius(self, value: float) -> None:
        self._radius("adf_outer_radius", value)

    @attribute(dtype=(float,), max_dim_x=2, unit="px", access=AttrWriteType.READ_WRITE,
               doc="Beam centre [x, y] for bf/adf/com; empty: the detector's beam_center_x/y")
    def beam_center(self) -> list[float]:
        return list(self._beam_center or [])

    @beam_center.write
    def beam_center(self, value: Any) -> None:
        centre = [float(v) for v in np.atleast_1d(value)]
        try:
            self._beam_center = check_beam_center(centre, self._frame_shape() if centre else None)
        except SettingRefused as exc:
            _throw(exc, "DectrisLive.beam_center")
        self._remember("BeamCenter", centre)

    @attribute(dtype=str, access=AttrWriteType.READ_WRITE,
               doc="When the device is connected to the DCU's stream: per_series (only while a series is "
                   "armed or listened for; default: other consumers get whole series while the device is "
                   "idle) or always. Applies from the next Start/Listen; the StreamConnection property "
                   "sets it at start-up")
    def stream_connection(self) -> str:
        return self._acquisition.connection if self._acquisition is not None else self.StreamConnection

    @stream_connection.write
    def stream_connection(self, value: str) -> None:
        if self._acquisition is None:
            tango.Except.throw_exception("NotConfigured", self.get_status(), "DectrisLive.stream_connection")
        try:
            self._acquisition.connection = value
        except ValueError as exc:
            _throw(exc, "DectrisLive.stream_connection")

    @attribute(dtype=float, unit="s", memorized=True, hw_memorized=True, access=AttrWriteType.READ_WRITE,
               doc="How long an armed series may wait for its header, then for each next frame, before it "
                   "ends with a 'no data' error naming what was received and rejected (State back to ON). "
                   "0: automatic (10 s for the header; between frames 10 s + 10 frame times, or with "
                   "external triggers 60 s + the series' duration at the frame time)")
    def series_timeout(self) -> float:
        return self._series_timeout

    @series_timeout.write
    def series_timeout(self, value: float) -> None:
        if self._acquisition is not None:
            try:
                self._acquisition.series_timeout = float(value)
            except ValueError as exc:
                _throw(exc, "DectrisLive.series_timeout")
        self._series_timeout = float(value)

    @attribute(dtype=float, unit="Hz", memorized=True, hw_memorized=True, access=AttrWriteType.READ_WRITE,
               doc="Most change events per second of each result attribute while data arrives (the final "
                   "result is always pushed)")
    def result_event_rate(self) -> float:
        return self._event_rate

    @result_event_rate.write
    def result_event_rate(self, value: float) -> None:
        if not (math.isfinite(value) and 0.1 <= value <= 100.0):
            tango.Except.throw_exception("InvalidRate", f"result_event_rate must be between 0.1 and 100 Hz, "
                                         f"got {value}", "DectrisLive.result_event_rate")
        self._event_rate = float(value)
        if self._acquisition is not None:
            self._acquisition.event_rate = self._event_rate

    def _tuning_value(self, name: str) -> int:
        return int(self._tuning[name])

    def _set_tuning(self, name: str, value: int) -> None:
        tuning = {**self._tuning, name: int(value)}
        try:
            limits = MachineLimits.of_this_machine()
            check_workers(tuning["workers"], limits)
            check_tuning(tuning["num_slots"], tuning["bytes_per_frame"], tuning["frame_stack_size"],
                         tuning["frames_per_partition"], limits=limits)
        except SettingRefused as exc:
            _throw(exc, f"DectrisLive.{name}")
        self._tuning = tuning  # used from the next Start/Listen (checked against the frame there)

    @attribute(dtype=int, memorized=True, hw_memorized=True, access=AttrWriteType.READ_WRITE,
               doc="Worker processes (0: automatic); applies from the next Start/Listen")
    def workers(self) -> int:
        return self._tuning_value("workers")

    @workers.write
    def workers(self, value: int) -> None:
        self._set_tuning("workers", value)

    @attribute(dtype=int, memorized=True, hw_memorized=True, access=AttrWriteType.READ_WRITE,
               doc="Frame-stack slots in shared memory (0: automatic); applies from the next Start/Listen")
    def num_slots(self) -> int:
        return self._tuning_value("num_slots")

    @num_slots.write
    def num_slots(self, value: int) -> None:
        self._set_tuning("num_slots", value)

    @attribute(dtype=int, unit="B", memorized=True, hw_memorized=True, access=AttrWriteType.READ_WRITE,
               doc="Room per compressed frame in a slot (0: automatic); applies from the next Start/Listen")
    def bytes_per_frame(self) -> int:
        return self._tuning_value("bytes_per_frame")

    @bytes_per_frame.write
    def bytes_per_frame(self, value: int) -> None:
        self._set_tuning("bytes_per_frame", value)

    @attribute(dtype=int, memorized=True, hw_memorized=True, access=AttrWriteType.READ_WRITE,
               doc="Frames per stack (0: automatic); applies from the next Start/Listen")
    def frame_stack_size(self) -> int:
        return self._tuning_value("frame_stack_size")

    @frame_stack_size.write
    def frame_stack_size(self, value: int) -> None:
        self._set_tuning("frame_stack_size", value)

    @attribute(dtype=int, memorized=True, hw_memorized=True, access=AttrWriteType.READ_WRITE,
               doc="Frames a worker decodes and analyses at once (0: a whole stack)")
    def frames_per_partition(self) -> int:
        return self._tuning_value("frames_per_partition")

    @frames_per_partition.write
    def frames_per_partition(self, value: int) -> None:
        self._set_tuning("frames_per_partition", value)

    # -- live processing: results and progress -------------------------------------------------

    def _read_progress(self, attr: tango.Attribute) -> None:
        name = attr.get_name()
        attr.set_value(getattr(self._progress, _PROGRESS_ATTRIBUTES[name][2]))

    def _read_result(self, attr: tango.Attribute) -> None:
        entry = self._results.get(attr.get_name())
        if entry is None:
            attr.set_value_date_quality(np.zeros((0, 0)), time.time(), AttrQuality.ATTR_INVALID)
            return
        value, quality, stamp = entry
        attr.set_value_date_quality(value, stamp, quality)

    def _on_acquisition_update(self, update: AcquisitionUpdate) -> None:
        """From the acquisition's threads: publish progress, results, State/Status."""
        with self._progress_lock:
            previous, self._progress = self._progress, update.progress
            for name, (_dtype, _unit, field, _doc) in _PROGRESS_ATTRIBUTES.items():
                value = getattr(update.progress, field)
                if value != getattr(previous, field):
                    self.push_change_event(name, value)
            if update.snapshot is not None and update.snapshot.buffers:
                self._publish_results(update.snapshot, update.final)
        if (previous.mode, previous.message, previous.hint) != \
                (update.progress.mode, update.progress.message, update.progress.hint) \
                and self._supervisor is not None:
            self._on_health(self._supervisor.health)

    def _publish_results(self, snapshot: ResultSnapshot, final: bool) -> None:
        if not final:
            quality = AttrQuality.ATTR_CHANGING
        elif snapshot.frames_missing or snapshot.error:
            quality = AttrQuality.ATTR_WARNING
        else:
            quality = AttrQuality.ATTR_VALID
        stamp = time.time()
        for name, value in snapshot.buffers.items():
            if name not in self._results and not self._is_result_attribute(name):
                continue
            image = _as_image(value)
            self._results[name] = (image, quality, stamp)
            self.push_change_event(name, image, stamp, quality)
        if final:
            for name in snapshot.buffers:
                if name in self._results:
                    self.push_data_ready_event(name, int(snapshot.frames_processed))

    def _is_result_attribute(self, name: str) -> bool:
        return any(name in results for results in self._result_names.values())

    # -- live processing: commands -------------------------------------------------------------

    def _live(self, name: str) -> LiveAcquisition:
        if self._acquisition is None:
            tango.Except.throw_exception("NotConfigured", self.get_status(), f"DectrisLive.{name}")
        return self._acquisition

    def _begin(self, name: str, begin: Callable[[AcquisitionRequest], None]) -> None:
        acquisition = self._live(name)
        try:
            acquisition.settings = PipelineSettings(**self._tuning)
            request = AcquisitionRequest(tuple(self._analyses), self._analysis_parameters(), self._nav_shape)
            begin(request)
        except (UnknownAnalysisError, InvalidAnalysisParameters, AcquisitionBusyError, ValueError,
                SimplonError) as exc:
            _throw(exc, f"DectrisLive.{name}")
        self._on_health(self._supervisor.health)

    @command(doc_in="Active acquisition with live processing: sets the image count from nav_shape, arms, "
                    "receives, processes, triggers (ints/inte; exts/exte wait for the hardware triggers). "
                    "Returns at once; progress and results arrive as events")
    def Start(self) -> None:
        self._require(self.get_state() == DevState.ON, "Start", "the detector must be idle (State ON)")
        self._begin("Start", self._live("Start").start)

    @command(doc_in="Passive live processing: every series armed by someone else is processed and "
                    "published, one after the other, until Stop")
    def Listen(self) -> None:
        self._begin("Listen", self._live("Listen").listen)

    @command(doc_in="Stop live processing gracefully: the detector cancels (active mode), what arrived "
                    "is processed and published")
    def Stop(self) -> None:
        self._live("Stop").stop()

    # -- helpers for clients ----------------------------------------------------------------

    @command(dtype_out=[str], doc_out="attribute name → SIMPLON module/task/key, one per line")
    def ListSimplonAttributes(self) -> list[str]:
        return [f"{name} {spec.module}/{spec.info.task}/{spec.key}"
                for name, spec in sorted(self._attributes.items())]



def _as_image(value: np.ndarray) -> np.ndarray:
    """A result as a 2-D float64 image: a line scan becomes one row, extra axes are stacked."""
    array = np.asarray(value, dtype=np.float64)
    if array.ndim == 0:
        array = array.reshape(1, 1)
    elif array.ndim == 1:
        array = array.reshape(1, -1)
    elif array.ndim > 2:
        array = array.reshape(-1, array.shape[-1])
    return np.ascontiguousarray(array)
