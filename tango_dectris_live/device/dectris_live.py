"""The ``DectrisLive`` Tango device: a DECTRIS detector (SIMPLON API) in the control system.

A translator: :class:`~tango_dectris_live.component.detector.LiveDetector` owns the DCU client,
the supervision and the live acquisition, holds the validated settings and decides State and
Status; this class turns Tango attributes and commands into calls on it and what it reports into
Tango state, attributes and events. The live settings and progress attributes are declared from
tables.
"""
from __future__ import annotations

import logging
import functools
import os
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import tango
from tango import AttrQuality, AttrWriteType, DevState
from tango.server import Device, command, device_property

from ..component.catalogue import ParameterCatalogue
from ..component.detector import CommandRefused, DetectorAddress, DeviceCondition, DeviceState, LiveDetector
from ..component.settings import RADII, LiveSettings
from ..processing.acquisition import (AcquisitionBusyError, AcquisitionMode, AcquisitionProgress, AcquisitionUpdate,
                                      LiveAcquisition, PipelineSettings)
from ..processing.analyses import UnknownAnalysisError
from ..processing.announcement import AnnouncementError, SeriesAnnouncement
from ..processing.merging import MergedAcquisition, NodeError
from ..processing.limits import SettingRefused
from ..processing.snapshot import ResultSnapshot
from ..simplon.errors import SimplonError
from .node_links import PARTIAL_RESULTS, TangoNodes
from .simplon_attributes import SimplonAttribute, attribute_name, describe_attribute, tango_attribute_kwargs

log = logging.getLogger(__name__)

_DEV_STATE = {state: getattr(DevState, state.value) for state in DeviceState}
_UNSET = object()


@dataclass(frozen=True)
class LiveAttribute:
    """A read-write live-processing setting: attribute name -> a LiveSettings field."""

    field: str
    dtype: Any  # a Tango type, or a one-element tuple of it for a spectrum
    doc: str
    unit: str = ""
    max_length: int = 1
    remembered: str = ""  # the device property that keeps it ("": a memorized attribute)


LIVE_SETTINGS = {
    "analyses": LiveAttribute("analyses", (tango.DevString,), "Analyses to run, by name (see available_analyses)",
                              max_length=64, remembered="Analyses"),
    "nav_shape": LiveAttribute(
        "nav_shape", (tango.DevLong64,), "Scan shape [rows, columns] (or [positions]); Start sets the detector's "
        "image count from it; in passive mode used when it fits the series. Empty: from the detector (active) or "
        "inferred (passive)", max_length=3, remembered="NavShape"),
    "beam_center": LiveAttribute("beam_center", (tango.DevDouble,), "Beam centre [x, y] for bf/adf/com; empty: the "
                                 "detector's beam_center_x/y", unit="px", max_length=2, remembered="BeamCenter"),
    "bf_radius": LiveAttribute("bf_radius", tango.DevDouble, "Radius of the virtual bright-field disk (analysis bf)",
                               unit="px", remembered="Radii"),
    "adf_inner_radius": LiveAttribute("adf_inner_radius", tango.DevDouble, "Inner radius of the virtual annular "
                                      "dark field (analysis adf), below adf_outer_radius", unit="px",
                                      remembered="Radii"),
    "adf_outer_radius": LiveAttribute("adf_outer_radius", tango.DevDouble, "Outer radius of the virtual annular "
                                      "dark field (analysis adf)", unit="px", remembered="Radii"),
    "result_event_rate": LiveAttribute("event_rate", tango.DevDouble, "Most change events per second of each result "
                                       "attribute while data arrives (the final result is always pushed)", unit="Hz"),
    "series_timeout": LiveAttribute(
        "series_timeout", tango.DevDouble, "How long an armed series may wait for its header, then for each next "
        "frame, before it ends with a 'no data' error naming what was received and rejected (State back to ON). "
        "0: automatic (10 s for the header; between frames 10 s + 10 frame times, or with external triggers "
        "60 s + the series' duration at the frame time)", unit="s"),
    "config_reuse": LiveAttribute(
        "config_reuse", tango.DevDouble, "Seconds a DCU setting read for one Start may serve the next Starts "
        "instead of being read again (a step scan then reads them once: ~10 GETs fewer per point). A change "
        "through this device is always seen; one made by another client only once the value is older than "
        "this. 0 (default): read at every Start. Passive mode always reads", unit="s"),
    "images_per_trigger": LiveAttribute(
        "images_per_trigger", tango.DevLong64, "Images each trigger takes in ints/exts: 0 (automatic) the whole "
        "scan in one trigger; 1 a trigger per scan position (exts: one hardware trigger per point of a continuous "
        "scan, ntrigger = the positions); inte/exte always take one image per trigger. Must divide the scan"),
    "saving_mode": LiveAttribute(
        "saving_mode", tango.DevString, "What each series saves in its NeXus/HDF5 file: off, results, or "
        "results_and_frames (the compressed frames as received, and the results); from the next series"),
    "saving_directory": LiveAttribute(
        "saving_directory", tango.DevString, "Folder of the series files, relative to the SavingBaseDirectory "
        "property (created when missing; '..', absolute paths and links out of the base are refused)"),
    "saving_name_pattern": LiveAttribute(
        "saving_name_pattern", tango.DevString, "File name of a series: {series_id}, {date}, {time}, {counter} "
        "(e.g. scan_{counter:05d}.h5); an existing file is never overwritten: the next free name "
        "(name_1.h5, ...) is taken"),
    "stream_connection": LiveAttribute(
        "connection", tango.DevString, "When the device is connected to the DCU's stream: per_series (only while a "
        "series is armed or listened for; other consumers get whole series while the device is idle) or always. "
        "Applies from the next Start/Listen"),
    "workers": LiveAttribute("workers", tango.DevLong64, "Worker processes (0: automatic); applies from the next "
                             "Start/Listen"),
    "num_slots": LiveAttribute("num_slots", tango.DevLong64, "Frame-stack slots in shared memory (0: automatic); "
                               "applies from the next Start/Listen"),
    "bytes_per_frame": LiveAttribute("bytes_per_frame", tango.DevLong64, "Room per compressed frame in a slot (0: "
                                     "automatic); applies from the next Start/Listen", unit="B"),
    "frame_stack_size": LiveAttribute("frame_stack_size", tango.DevLong64, "Frames per stack (0: automatic); applies "
                                      "from the next Start/Listen"),
    "frames_per_partition": LiveAttribute("frames_per_partition", tango.DevLong64, "Frames a worker decodes and "
                                          "analyses at once (0: a whole stack)"),
}

# Progress, read-only, pushed with change events: attribute name -> (Tango type, unit,
# AcquisitionProgress field, description); a one-element tuple type is a spectrum.
PROGRESS = {
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
    "saving_status": (tango.DevString, "", "saving_status",
                      "what the saving of series files does or did, in words (a refused path, a full disk, "
                      "a writer that falls behind)"),
    "last_saved_file": (tango.DevString, "", "last_saved_file",
                        "the file of the series being saved, or of the last one (empty: none yet)"),
    "frames_saved": (tango.DevLong64, "", "frames_saved", "frames of the series written to its file"),
    "saving_rate": (tango.DevDouble, "MB/s", "saving_rate", "how fast the series file is written"),
    "nodes_status": ((tango.DevString,), "", "nodes",
                     "merging role: per node device, what it did for the series being merged (or the last one), "
                     "or why it failed or was left out"),
    "acquisitions_ended": (tango.DevLong64, "", "acquisitions_ended",
                           "Start/Listen sessions over since the server started, whatever their outcome "
                           "(acquisition_status says which): a client that sent Start waits for this to grow, "
                           "then reads the results"),
}
ROLES = ("single", "node", "merger")
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
    SavingBaseDirectory = device_property(
        dtype=str, default_value="",
        doc="The folder below which the device writes series files (saving_directory is relative to it; "
            "nothing is written outside it). Empty: saving unavailable")
    SavingWriters = device_property(
        dtype=int, default_value=0,
        doc="Processes writing a series' frames in parallel, each to a part file beside the series file "
            "(joined there by a virtual dataset; docs/saving.md). 0: automatic (1 on up to 4 cores, 2 above)")
    Role = device_property(
        dtype=str, default_value="single",
        doc="single: receives and processes the stream itself (the default); node: one of several receivers "
            "of one detector stream, driven by a merging device (NodePrepare/NodeArm/NodeFinish) and publishing "
            "partial_results; merger: drives the DCU and the devices named in Nodes, merges their partial "
            "results into the result attributes (no receiver of its own)")
    Nodes = device_property(dtype=(str,), default_value=[],
                            doc="Role merger: the Tango names of the node devices that receive the stream")
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
        self._detector: LiveDetector | None = None
        self._attributes: dict[str, SimplonAttribute] = {}
        self._results: dict[str, tuple[np.ndarray, AttrQuality, float]] = {}
        self._progress = AcquisitionProgress(mode=AcquisitionMode.IDLE, message="idle")
        self._remembered: dict[str, list] = {}
        self._pushed_settings: dict[str, Any] = {}  # live setting -> the value of its last change event
        self._add_progress_attributes()
        self._add_information_attributes()
        host = self.DcuHost or os.environ.get(ENV_DCU_HOST, "")
        port = self.DcuPort if self.DcuHost else int(os.environ.get(ENV_DCU_PORT, self.DcuPort))
        if not host:
            self._set_condition(DeviceCondition(DeviceState.FAULT, "the DcuHost property is not set: set it to the "
                                                "DCU's address (or start the server with --dcu HOST:PORT)"))
            return
        self._role = self.Role.strip().lower()
        if self._role not in ROLES or (self._role == "merger") != bool(self.Nodes):
            self._set_condition(DeviceCondition(DeviceState.FAULT, (
                f"the Role property is {self.Role!r}: single, node or merger" if self._role not in ROLES else
                "Role merger needs the Nodes property (the node devices' names)" if self._role == "merger" else
                f"the Nodes property is set, but Role is {self._role!r}: set Role to merger")))
            return
        self._partial: tuple[str, bytes] = ("", b"")
        if self._role == "node":
            self._add_partial_results_attribute()
        factory = functools.partial(MergedAcquisition, nodes=TangoNodes(list(self.Nodes))) \
            if self._role == "merger" else LiveAcquisition
        address = DetectorAddress(host, port, api_version=self.ApiVersion or None, stream_host=self.StreamHost,
                                  stream_ports={1: self.StreamPort, 2: self.Stream2Port},
                                  poll_period=self.StatePollPeriod)
        if self.SavingWriters < 0:
            self._set_condition(DeviceCondition(DeviceState.FAULT, "a device property is refused: SavingWriters "
                                                f"must be 0 (automatic) or more, got {self.SavingWriters}"))
            return
        try:
            self._detector = LiveDetector(address, self, settings=self._settings_from_properties(),
                                          saving_base_directory=self.SavingBaseDirectory,
                                          acquisition_factory=factory)
            self._detector.saving.writers = self.SavingWriters  # from the first series on
        except SettingRefused as exc:
            self._set_condition(DeviceCondition(DeviceState.FAULT, f"a device property is refused: {exc}"))
            return
        self._add_result_attributes()
        self._add_live_setting_attributes()
        self._detector.start()

    def delete_device(self) -> None:
        if self._detector is not None:
            self._detector.close()
        super().delete_device()

    def _settings_from_properties(self) -> LiveSettings:
        defaults = LiveSettings()
        radii = dict(zip(RADII, (float(r) for r in self.Radii))) if len(self.Radii) == 3 else {}
        return LiveSettings(
            analyses=tuple(self.Analyses) or defaults.analyses,
            nav_shape=tuple(int(n) for n in self.NavShape) or None,
            beam_center=(float(self.BeamCenter[0]), float(self.BeamCenter[1])) if len(self.BeamCenter) == 2 else None,
            **radii, tuning=PipelineSettings(
                workers=self.Workers, num_slots=self.NumSlots, bytes_per_frame=self.BytesPerFrame,
                frame_stack_size=self.FrameStackSize, frames_per_partition=self.FramesPerPartition),
            transport=self.StreamTransport, connection=self.StreamConnection)

    # -- what the component reports ---------------------------------------------------------

    def dev_state(self) -> DevState:
        """The state the device set, without Tango's default turn to ALARM whenever an attribute
        reads with WARNING quality: a result with missing frames is not a detector alarm."""
        return self.get_state()

    def condition_changed(self, condition: DeviceCondition) -> None:
        self._set_condition(condition)

    def _set_condition(self, condition: DeviceCondition) -> None:
        state = _DEV_STATE[condition.state]
        state_changed = state != self.get_state()
        self.set_state(state)
        self.set_status(condition.status)
        if state_changed:
            self.push_change_event("State", state)
        self.push_change_event("Status", condition.status)

    def parameters_read(self, catalogue: ParameterCatalogue) -> None:
        """Create an attribute for every parameter the DCU offers; existing ones are kept."""
        for info in catalogue.parameters:
            if attribute_name(info.module, info.task, info.key) in self._attributes:
                continue
            spec = describe_attribute(info)
            if spec is not None:
                self._add_simplon_attribute(spec)

    def parameter_changed(self, module: str, key: str, value: Any) -> None:
        """The DCU reported ``key`` as changed by a write: push it to subscribers."""
        spec = self._attributes.get(attribute_name(module, "config", key))
        if spec is None or spec.info.task != "config":
            return
        try:
            self.push_change_event(spec.name, spec.to_tango(value))
        except ValueError as exc:
            log.warning("cannot publish the change of %s: %s", spec.name, exc)

    def settings_changed(self, settings: LiveSettings) -> None:
        """Push a change event for each live setting that changed (a GUI then needs no polling)
        and keep the spectrum settings in the device's properties (Tango memorizes only scalars)."""
        for name, setting in LIVE_SETTINGS.items():
            value = settings.value(setting.field)
            value = list(value or ()) if isinstance(setting.dtype, tuple) else value
            if self._pushed_settings.get(name, _UNSET) != value:
                self._pushed_settings[name] = value
                self.push_change_event(name, value)
        for prop, value in (("NavShape", list(settings.nav_shape or ())), ("Analyses", list(settings.analyses)),
                            ("BeamCenter", list(settings.beam_center or ())), ("Radii", list(settings.radii))):
            if self._remembered.get(prop) != value:
                self._remembered[prop] = value
                self._remember(prop, value)

    def acquisition_updated(self, update: AcquisitionUpdate) -> None:
        """Progress attributes and result images, with their events."""
        previous, self._progress = self._progress, update.progress
        for name, (_dtype, _unit, field, _doc) in PROGRESS.items():
            value = getattr(update.progress, field)
            if value != getattr(previous, field):
                self.push_change_event(name, value)
        if update.snapshot is not None and update.snapshot.buffers:
            self._publish_results(update.snapshot, update.final)
        if update.partial is not None:
            self._partial = update.partial.encode()
            self.push_change_event(PARTIAL_RESULTS, *self._partial)

    def _remember(self, prop: str, value: list) -> None:
        if not tango.Util._UseDb:
            return
        try:
            tango.Util.instance().get_database().put_device_property(self.get_name(), {prop: value})
        except tango.DevFailed as exc:
            log.warning("could not remember %s in the Tango database: %s", prop, exc)

    # -- SIMPLON parameters as dynamic attributes -------------------------------------------

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
            attr.set_value(spec.to_tango(self._detector.client.get_value(spec.module, spec.info.task, spec.key)))
        except (SimplonError, ValueError) as exc:
            _throw(exc, f"DectrisLive.read({spec.name})")

    def _write_simplon(self, attr: tango.WAttribute) -> None:
        spec = self._attributes[attr.get_name()]
        try:
            self._detector.client.write(spec.module, spec.key, spec.from_tango(attr.get_write_value()))
        except SimplonError as exc:
            _throw(exc, f"DectrisLive.write({spec.name})")

    # -- live settings, progress and results, from the tables -----------------------------------

    def _add_live_setting_attributes(self) -> None:
        for name, setting in LIVE_SETTINGS.items():
            spectrum = isinstance(setting.dtype, tuple)
            memorized = not setting.remembered
            attr = tango.SpectrumAttr(name, setting.dtype[0], AttrWriteType.READ_WRITE, setting.max_length) \
                if spectrum else tango.Attr(name, setting.dtype, AttrWriteType.READ_WRITE)
            props = tango.UserDefaultAttrProp()
            props.set_description(setting.doc + ("; remembered" if setting.remembered else ""))
            if setting.unit:
                props.set_unit(setting.unit)
            attr.set_default_properties(props)
            if memorized:
                attr.set_memorized()
                attr.set_memorized_init(True)
            self.add_attribute(attr, r_meth=self._read_setting, w_meth=self._write_setting)
            self.set_change_event(name, True, False)

    def _read_setting(self, attr: tango.Attribute) -> None:
        value = self._detector.settings.value(LIVE_SETTINGS[attr.get_name()].field)
        attr.set_value(list(value or ()) if isinstance(LIVE_SETTINGS[attr.get_name()].dtype, tuple) else value)

    def _write_setting(self, attr: tango.WAttribute) -> None:
        name = attr.get_name()
        value = attr.get_write_value()
        if isinstance(LIVE_SETTINGS[name].dtype, tuple):
            value = list(np.atleast_1d(value)) if value is not None else []
        try:
            self._detector.change_settings(**{LIVE_SETTINGS[name].field: value})
        except (SettingRefused, UnknownAnalysisError) as exc:
            _throw(exc, f"DectrisLive.{name}")

    def _add_progress_attributes(self) -> None:
        for name, (dtype, unit, _field, doc) in PROGRESS.items():
            attr = tango.SpectrumAttr(name, dtype[0], AttrWriteType.READ, 64) if isinstance(dtype, tuple) \
                else tango.Attr(name, dtype, AttrWriteType.READ)
            props = tango.UserDefaultAttrProp()
            props.set_description(doc)
            if unit:
                props.set_unit(unit)
            attr.set_default_properties(props)
            self.add_attribute(attr, r_meth=self._read_progress)
            self.set_change_event(name, True, False)

    def _read_progress(self, attr: tango.Attribute) -> None:
        attr.set_value(getattr(self._progress, PROGRESS[attr.get_name()][2]))

    def _add_result_attributes(self) -> None:
        for names in self._detector.result_names.values():
            for name in names:
                attr = tango.ImageAttr(name, tango.DevDouble, AttrWriteType.READ, _MAX_IMAGE_SIDE, _MAX_IMAGE_SIDE)
                props = tango.UserDefaultAttrProp()
                props.set_description(f"live result {name}: change events while a series is processed "
                                      f"(quality CHANGING), a final one (VALID, or WARNING when frames are "
                                      f"missing: their scan positions are NaN), then a data-ready event")
                attr.set_default_properties(props)
                self.add_attribute(attr, r_meth=self._read_result)
                self.set_change_event(name, True, False)
                self.set_data_ready_event(name, True)

    def _read_result(self, attr: tango.Attribute) -> None:
        entry = self._results.get(attr.get_name())
        if entry is None:
            attr.set_value_date_quality(np.zeros((0, 0)), time.time(), AttrQuality.ATTR_INVALID)
            return
        value, quality, stamp = entry
        attr.set_value_date_quality(value, stamp, quality)

    def _publish_results(self, snapshot: ResultSnapshot, final: bool) -> None:
        if not final:
            quality = AttrQuality.ATTR_CHANGING
        elif snapshot.frames_missing or snapshot.error:
            quality = AttrQuality.ATTR_WARNING
        else:
            quality = AttrQuality.ATTR_VALID
        stamp = time.time()
        published = [name for name in snapshot.buffers
                     if any(name in names for names in self._detector.result_names.values())]
        for name in published:
            image = _as_image(snapshot.buffers[name])
            self._results[name] = (image, quality, stamp)
            self.push_change_event(name, image, stamp, quality)
        if final:
            for name in published:
                self.push_data_ready_event(name, int(snapshot.frames_processed))

    # -- commands ---------------------------------------------------------------------------

    def _call(self, name: str, action: Callable[[], Any]) -> Any:
        if self._detector is None:
            tango.Except.throw_exception("NotConfigured", self.get_status(), f"DectrisLive.{name}")
        try:
            return action()
        except CommandRefused as exc:
            tango.Except.throw_exception("CommandNotAllowed", str(exc), f"DectrisLive.{name}")
        except (SimplonError, SettingRefused, UnknownAnalysisError, AcquisitionBusyError, NodeError, ValueError,
                OSError) as exc:
            _throw(exc, f"DectrisLive.{name}")

    @command(doc_in="Initialize the detector (runs in the background, up to minutes on real "
                    "hardware: State is INIT meanwhile, then ON)")
    def Initialize(self) -> None:
        self._call("Initialize", lambda: self._detector.initialize())

    @command(dtype_out=int, doc_out="the series id of the armed series")
    def Arm(self) -> int:
        return self._call("Arm", lambda: self._detector.arm())

    @command(doc_in="Software trigger (ints/inte). Returns at once; in ints the series runs in the "
                    "background and State is RUNNING until it is done")
    def Trigger(self) -> None:
        self._call("Trigger", lambda: self._detector.trigger())

    @command(dtype_out=int, doc_out="the series id")
    def Disarm(self) -> int:
        return self._call("Disarm", lambda: self._detector.disarm())

    @command(dtype_out=int, doc_out="the series id")
    def Cancel(self) -> int:
        return self._call("Cancel", lambda: self._detector.cancel())

    @command(dtype_out=int, doc_out="the series id")
    def Abort(self) -> int:
        """Abort the detector and the live processing (pending frames are dropped)."""
        return self._call("Abort", lambda: self._detector.abort())

    @command(doc_in="Active acquisition with live processing: sets the image count from nav_shape, arms, "
                    "receives, processes, triggers (ints/inte; exts/exte wait for the hardware triggers). "
                    "Returns at once; progress and results arrive as events")
    def Start(self) -> None:
        self._call("Start", lambda: self._detector.start_acquisition())

    @command(doc_in="Passive live processing: every series armed by someone else is processed and "
                    "published, one after the other, until Stop")
    def Listen(self) -> None:
        self._call("Listen", lambda: self._detector.listen())

    @command(doc_in="Stop live processing gracefully: the detector cancels (active mode), what arrived "
                    "is processed and published")
    def Stop(self) -> None:
        self._call("Stop", lambda: self._detector.stop())

    # -- node role: a share of the stream for a merging device ------------------------------------

    def _node_call(self, name: str, action: Callable[[], Any]) -> Any:
        if getattr(self, "_role", "") != "node":
            tango.Except.throw_exception("CommandNotAllowed", f"{name} is for a device with Role node; this one "
                                         f"is {getattr(self, '_role', 'not configured')}", f"DectrisLive.{name}")
        return self._call(name, action)

    @command(dtype_in=str, doc_in="Role node, sent by the merging device before it arms the DCU: the series "
                                  "(JSON: stream geometry, image count, analyses by name, parameters). Builds "
                                  "the receiver and workers and returns once connected to the stream")
    def NodePrepare(self, announcement: str) -> None:
        try:
            parsed = SeriesAnnouncement.from_json(announcement)
        except AnnouncementError as exc:
            _throw(exc, "DectrisLive.NodePrepare")
        self._node_call("NodePrepare", lambda: self._detector.acquisition.node_prepare(parsed))

    @command(dtype_in=int, doc_in="Role node, after the DCU's arm: the series id; take its frames that reach "
                                  "this node (without its header, which reaches one node only)")
    def NodeArm(self, series: int) -> None:
        self._node_call("NodeArm", lambda: self._detector.acquisition.node_arm(series))

    @command(dtype_in=str, doc_in="Role node, passive (the merging device listens): the series as the DCU is "
                                  "configured (JSON, as NodePrepare); every series someone else arms is taken, "
                                  "with or without its header, until Stop")
    def NodeListen(self, announcement: str) -> None:
        try:
            parsed = SeriesAnnouncement.from_json(announcement)
        except AnnouncementError as exc:
            _throw(exc, "DectrisLive.NodeListen")
        self._node_call("NodeListen", lambda: self._detector.acquisition.node_listen(parsed))

    @command(dtype_in=(float,), doc_in="Role node: [quiet seconds, series id]: the series is over elsewhere; end "
                                       "it once the stream has been quiet this long, publish the final "
                                       "partial_results (empty ones if no frame of it came here)")
    def NodeFinish(self, argument: list[float]) -> None:
        if len(argument) != 2 or argument[1] != int(argument[1]):
            tango.Except.throw_exception("ValueError", f"NodeFinish takes [quiet seconds, series id], got "
                                         f"{list(argument)}", "DectrisLive.NodeFinish")
        self._node_call("NodeFinish", lambda: self._detector.acquisition.node_finish(float(argument[0]),
                                                                                   int(argument[1])))

    @command(doc_in="Role node: drop what is pending of the series now (the merging device aborts); the DCU "
                    "is not touched (the merging device owns it)")
    def NodeAbort(self) -> None:
        self._node_call("NodeAbort", lambda: self._detector.acquisition.abort())

    def _add_partial_results_attribute(self) -> None:
        attr = tango.Attr(PARTIAL_RESULTS, tango.DevEncoded, AttrWriteType.READ)
        props = tango.UserDefaultAttrProp()
        props.set_description("Role node: the raw analysis buffers of the series' frames that reached this node "
                              "and the map of them (format tango-dectris-live/partial-results/1), for the merging "
                              "device; change events a few times per second and at the series' end")
        attr.set_default_properties(props)
        self.add_attribute(attr, r_meth=self._read_partial)
        self.set_change_event(PARTIAL_RESULTS, True, False)

    def _read_partial(self, attr: tango.Attribute) -> None:
        attr.set_value(*self._partial)

    # -- read-only information for clients ---------------------------------------------------

    @command(dtype_out=[str], doc_out="attribute name → SIMPLON module/task/key, one per line")
    def ListSimplonAttributes(self) -> list[str]:
        return [f"{name} {spec.module}/{spec.info.task}/{spec.key}"
                for name, spec in sorted(self._attributes.items())]

    def _read_available_analyses(self, attr: tango.Attribute) -> None:
        attr.set_value(self._detector.available_analyses() if self._detector is not None else [])

    def _read_result_attributes(self, attr: tango.Attribute) -> None:
        names = self._detector.result_names if self._detector is not None else {}
        attr.set_value([f"{name}: {', '.join(results)}" for name, results in names.items()])

    def _read_role(self, attr: tango.Attribute) -> None:
        attr.set_value(getattr(self, "_role", "") or self.Role.strip().lower())

    def _add_information_attributes(self) -> None:
        role = tango.Attr("role", tango.DevString, AttrWriteType.READ)
        props = tango.UserDefaultAttrProp()
        props.set_description("The Role property: single, node or merger (a merging device saves no frames: "
                              "its nodes do)")
        role.set_default_properties(props)
        self.add_attribute(role, r_meth=self._read_role)
        for name, doc, reader in (
                ("available_analyses", "Names of the analyses that can be selected", self._read_available_analyses),
                ("result_attributes", "'analysis: result attribute, ...' for every available analysis",
                 self._read_result_attributes)):
            attr = tango.SpectrumAttr(name, tango.DevString, AttrWriteType.READ, 1024)
            props = tango.UserDefaultAttrProp()
            props.set_description(doc)
            attr.set_default_properties(props)
            self.add_attribute(attr, r_meth=reader)


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
