"""Sardana controllers of a ``DectrisLive`` device: its detector image (2D) and its live virtual
detectors as counters (bright field, dark field, centre of mass, ... of every scan point).

Both take the device's Tango name as the controller property ``Device``; in one measurement group
they share each acquisition (see ``tango_dectris_live.sardana.link``). Synchronisation:

* software (``ct``, ``ascan``, ``mesh``): one live acquisition per point, ``repetitions`` frames
  in one ``ints`` trigger; the 2D value is the detector-shaped ``sum_image`` of the point's frames,
  a counter's value its scan-shaped result for the point.
* hardware (``ascanct``, ``meshct``): one series for the whole scan; ``exts`` with one trigger
  per point (HardwareTrigger), ``exte`` (HardwareGate) or one trigger for all (HardwareStart);
  the counters' values reach Sardana as the points are processed (value buffers); the 2D value
  of each point is its frame, read from the series file once it is closed.

A point whose frame never came is recorded with NaN (the device's results carry NaN for scan
positions without a frame) and the channel's status says how many frames were missing.
"""
from __future__ import annotations

import math

import numpy as np
from sardana import State
from sardana.pool import AcqSynch
from sardana.pool.controller import (CounterTimerController, Description, FGet, FSet, Memorize,
                                     Memorized, Referable, TwoDController, Type)

from tango_dectris_live.sardana.link import SAVING_ORDER, Acquisition, LinkError, Plan, link_for

_DEVICE_PROPERTY = {"Device": {Type: str, Description: "Tango name of the DectrisLive device, e.g. "
                                                       "bl/det/arina or tango://host:10000/bl/det/arina"}}
_RESULT_DOC = ("Result attribute of the device this channel shows (one of its result_attributes, e.g. "
               "sumsig_image, bf_image, com_x_image; empty: the axis' default); the device runs the analysis "
               "that publishes it")


class _DeviceChannels:
    """What both controllers share: the link to the device, the result each axis shows, the
    acquisition they started or joined and its state."""

    DEFAULT_RESULTS: dict[int, str] = {}

    def _init_channels(self) -> None:
        if not self.Device:
            raise LinkError("the controller property Device (the DectrisLive device's Tango name) is not set")
        self._link = link_for(self.Device)
        self._owner = f"{type(self).__name__}/{id(self):x}"
        self._results: dict[int, str] = {}
        self._plan: Plan | None = None
        self._mark = -1
        self._acquisition: Acquisition | None = None
        self._started: list[int] = []
        self._delivered: dict[int, int] = {}
        self._state = (State.On, "no acquisition yet")
        self._values: dict[str, np.ndarray] = {}

    # -- axes -------------------------------------------------------------------------------------

    def AddDevice(self, axis: int) -> None:
        self._results[axis] = self.DEFAULT_RESULTS.get(axis, "")
        self._update_requirement()

    def DeleteDevice(self, axis: int) -> None:
        self._results.pop(axis, None)
        self._update_requirement()

    def getResult(self, axis: int) -> str:
        return self._results.get(axis, "")

    def setResult(self, axis: int, value: str) -> None:
        value = str(value).strip() or self.DEFAULT_RESULTS.get(axis, "")  # empty: the axis' default
        if value:
            self._link.analysis_of(value)  # refused with what the device offers
        self._results[axis] = value
        self._update_requirement()

    def _update_requirement(self) -> None:
        try:
            known = self._link.result_analyses()
        except Exception as error:  # noqa: BLE001 - the device may be down when the Pool starts
            self._log.warning("%s: result attributes not readable now (%s); analyses are checked at the "
                              "first acquisition", self.Device, error)
            return
        self._link.require(self._owner, {known[name] for name in self._results.values() if name in known})

    def _result(self, axis: int) -> str:
        name = self._results.get(axis, "")
        if not name:
            raise LinkError(f"axis {axis} shows no result: set its Result attribute to one of the device's "
                            f"result attributes")
        return name

    # -- acquisition ---------------------------------------------------------------------------------

    def _load(self, value: float, repetitions: int, latency: float) -> None:
        synchronization = getattr(self, "_synchronization", AcqSynch.SoftwareTrigger)
        self._plan = Plan(float(value), int(repetitions), float(latency or 0.0), synchronization.name)
        self._update_requirement()
        self._mark = self._link.load()

    def PreStartAll(self) -> None:
        self._started = []

    def PreStartOne(self, axis: int, value: float | None = None) -> bool:
        self._started.append(axis)
        return True

    def StartOne(self, axis: int, value: float | None = None) -> None:
        pass

    def StartAll(self) -> None:
        if self._plan is None:
            raise LinkError("started before it was loaded with an integration time")
        self._values = {}
        self._delivered = {axis: 0 for axis in self._started}
        self._acquisition = self._link.start(self._mark, self._plan)
        self._state = (State.Moving, f"{self.Device}: acquiring")

    def StateAll(self) -> None:
        acquisition = self._acquisition
        if acquisition is None:
            problem = self._link.state_problem()
            self._state = (State.Fault, problem) if problem else (State.On, "idle")
            return
        if not self._link.ended(acquisition):
            problem = acquisition.device_problem
            self._state = (State.Fault, problem) if problem else (State.Moving, f"{self.Device}: acquiring")
            return
        self._state = self._ended_state(acquisition)

    def _ended_state(self, acquisition: Acquisition) -> tuple[State, str]:
        if acquisition.problem is not None:
            return State.Fault, acquisition.problem
        text = f"series {acquisition.series}: {acquisition.outcome}"
        if acquisition.frames_missing:
            text += f"; {acquisition.frames_missing} frame(s) missing: their values are NaN"
        return State.On, text

    def StateOne(self, axis: int) -> tuple[State, str]:
        return self._state

    def ReadAll(self) -> None:
        acquisition = self._acquisition
        if acquisition is None:
            return
        names = sorted({self._result(axis) for axis in self._started})
        self._values = self._link.results(acquisition, names)

    def StopOne(self, axis: int) -> None:
        if self._acquisition is not None:
            self._link.stop(self._acquisition)

    def AbortOne(self, axis: int) -> None:
        if self._acquisition is not None:
            self._link.stop(self._acquisition, abort=True)

    def _per_point(self) -> bool:
        """Whether each start is one point with one value (else values arrive as buffers)."""
        plan = self._plan
        return plan is not None and not plan.hardware and plan.repetitions == 1

    def _new_values(self, axis: int, values: np.ndarray) -> list[float]:
        """The values of scan points not yet handed to Sardana: while the series runs, the
        processed ones in order (a point not processed yet is NaN and ends the run of values);
        once it ended, all the rest (NaN: the point's frame is missing)."""
        flat = np.asarray(values, dtype=np.float64).ravel()
        start = self._delivered.get(axis, 0)
        if self._acquisition is not None and self._acquisition.ended:
            end = flat.size
        else:
            pending = np.flatnonzero(~np.isfinite(flat[start:]))
            end = start + (int(pending[0]) if pending.size else flat.size - start)
        self._delivered[axis] = end
        return [float(v) for v in flat[start:end]]


class DectrisLiveCounterTimerController(_DeviceChannels, CounterTimerController):
    """The device's live virtual detectors as counters: one value per scan point.

    Axes 1-5 are sumsig, bf, adf, com_x, com_y (results sumsig_image, bf_image, adf_image,
    com_x_image, com_y_image); any axis can show another scan-shaped result of the device (a
    facility analysis) through its Result attribute."""

    gender = "DECTRIS live"
    model = "DectrisLive virtual detectors"
    organization = "tango-dectris-live"
    MaxDevice = 64
    default_timer = 1
    ctrl_properties = dict(_DEVICE_PROPERTY)
    axis_attributes = {"Result": {Type: str, FGet: "getResult", FSet: "setResult", Description: _RESULT_DOC,
                                  Memorize: Memorized}}
    DEFAULT_RESULTS = {1: "sumsig_image", 2: "bf_image", 3: "adf_image", 4: "com_x_image", 5: "com_y_image"}

    def __init__(self, inst, props, *args, **kwargs):
        CounterTimerController.__init__(self, inst, props, *args, **kwargs)
        self._init_channels()

    def LoadOne(self, axis: int, value: float, repetitions: int, latency: float) -> None:
        if getattr(self, "_acquisition_mode", "Timer") not in ("Timer", None) and value <= 0:
            raise LinkError("only timer mode is supported: give an integration time, not a monitor count")
        self._load(value, repetitions, latency)

    def ReadOne(self, axis: int):
        values = self._values.get(self._result(axis))
        if values is None:
            return [] if not self._per_point() else math.nan
        if self._per_point():
            flat = np.asarray(values, dtype=np.float64).ravel()
            return float(flat[0]) if flat.size else math.nan
        return self._new_values(axis, values)

    def GetAxisPar(self, axis: int, parameter: str):
        if parameter == "shape":
            return []
        return super().GetAxisPar(axis, parameter)


class DectrisLiveTwoDController(_DeviceChannels, TwoDController, Referable):
    """The detector image of every point: axis 1 is ``sum_image``, the sum of the point's frames
    (one frame: the frame itself); another detector-shaped result through the Result attribute.

    Value references (``ValueRefEnabled``): the point's image in the NeXus file the device saved
    (``h5file://<file>::entry/results/<analysis>/<result>``); the controller switches the device's
    saving on (``results``) for them. ``ValueRefPattern``: empty for the device's own
    saving_directory/saving_name_pattern, or ``DIR/NAME`` relative to its SavingBaseDirectory with
    the device's placeholders ({series_id}, {date}, {time}, {counter})."""

    gender = "DECTRIS live"
    model = "DectrisLive detector image"
    organization = "tango-dectris-live"
    MaxDevice = 16
    default_timer = 1
    ctrl_properties = dict(_DEVICE_PROPERTY)
    axis_attributes = {"Result": {Type: str, FGet: "getResult", FSet: "setResult", Description: _RESULT_DOC,
                                  Memorize: Memorized}}
    DEFAULT_RESULTS = {1: "sum_image"}

    def __init__(self, inst, props, *args, **kwargs):
        TwoDController.__init__(self, inst, props, *args, **kwargs)
        self._init_channels()
        self._ref_enabled: dict[int, bool] = {}
        self._ref_pattern: dict[int, str] = {}
        self._frames: np.ndarray | None = None  # a hardware-synchronised scan's frames, once read

    def SetAxisPar(self, axis: int, parameter: str, value) -> None:
        if parameter == "value_ref_enabled":
            self._ref_enabled[axis] = bool(value)
        elif parameter == "value_ref_pattern":
            self._ref_pattern[axis] = str(value or "")
        else:
            super().SetAxisPar(axis, parameter, value)

    def GetAxisPar(self, axis: int, parameter: str):
        if parameter == "shape":
            height, width = self._link.frame_shape()
            return [width, height]
        if parameter == "value_ref_enabled":
            return self._ref_enabled.get(axis, False)
        if parameter == "value_ref_pattern":
            return self._ref_pattern.get(axis, "")
        return super().GetAxisPar(axis, parameter)

    def LoadOne(self, axis: int, value: float, repetitions: int, latency: float) -> None:
        self._load(value, repetitions, latency)
        refs = [axis for axis, enabled in self._ref_enabled.items() if enabled]
        location = next((_location(self._ref_pattern.get(axis, "")) for axis in refs
                         if self._ref_pattern.get(axis)), None)
        if self._per_point():
            self._link.want_saving(self._owner, SAVING_ORDER[1] if refs else SAVING_ORDER[0], location)
        elif refs:
            raise LinkError("value references point at one image per acquisition: in a hardware-synchronised "
                            "scan switch ValueRefEnabled off (the images come from the series file, which "
                            "Sardana's recorder cannot reference frame by frame)")
        elif not self._link.saves_frames():
            raise LinkError(f"{self.Device} is a merging device (Role merger): its series files hold the results, "
                            f"the frames are in its nodes' files; a hardware-synchronised scan's images are the "
                            f"frames: leave this image channel out of the continuous scan's measurement group "
                            f"(the counters work)")
        else:
            # one series for the whole scan: each point's image is its frame, read from the
            # series file the device saves (the Pool must see the device's SavingBaseDirectory)
            self._link.want_saving(self._owner, SAVING_ORDER[2], location)
        self._frames: np.ndarray | None = None

    def StateAll(self) -> None:
        super().StateAll()
        acquisition = self._acquisition
        if acquisition is None or self._state[0] != State.On:
            return
        if self._per_point() and not any(self._ref_enabled.get(a) for a in self._started):
            return
        # a reference is handed out, and the frames are read, once the file is closed
        saving = str(self._link.proxy.saving_status)
        if "saving failed" in saving:
            self._state = (State.Fault, f"{self.Device}: {saving}")
        elif not saving.startswith(f"saved {acquisition.saved_file}"):
            self._state = (State.Moving, f"{self.Device}: {saving}")

    def ReadAll(self) -> None:
        if self._per_point():
            super().ReadAll()
            return
        acquisition = self._acquisition
        if acquisition is None or self._state[0] != State.On or self._frames is not None:
            return  # the frames of a hardware-synchronised scan: all of them, once the file is closed
        if acquisition.problem is not None:
            raise LinkError(acquisition.problem)
        self._frames = _saved_frames(acquisition.saved_file)

    def ReadOne(self, axis: int):
        if not self._per_point():
            frames = self._frames
            if frames is None:
                return []
            start = self._delivered.get(axis, 0)
            self._delivered[axis] = len(frames)
            return [frame for frame in frames[start:]]
        values = self._values.get(self._result(axis))
        if values is None:
            raise LinkError(f"no image of axis {axis}: no acquisition ended")
        return np.asarray(values, dtype=np.float64)

    def RefOne(self, axis: int) -> str:
        acquisition = self._acquisition
        if acquisition is None or not acquisition.ended:
            raise LinkError(f"no reference of axis {axis}: no acquisition ended")
        if acquisition.problem is not None:
            raise LinkError(acquisition.problem)
        if not acquisition.saved_file:
            raise LinkError(f"{self.Device} saved no file for series {acquisition.series}: "
                            f"{self._link.proxy.saving_status}")
        name = self._result(axis)
        analysis = self._link.analysis_of(name)
        return f"h5file://{acquisition.saved_file}::entry/results/{analysis}/{name}"


def _saved_frames(path: str) -> np.ndarray:
    """Every frame of a closed series file as float64, NaN for the frames it lists as missing."""
    import h5py
    import hdf5plugin  # noqa: F401 - the HDF5 filters of the compressed frames

    if not path:
        raise LinkError("the device saved no series file: its frames are the images of a hardware-synchronised scan")
    try:
        with h5py.File(path, "r") as saved:
            frames = saved["entry/data/data"][...].astype(np.float64)
            missing = saved["entry/data/missing_frames"][...]
    except OSError as error:
        raise LinkError(f"the series file {path} cannot be read from the Pool's machine ({error}): the Pool "
                        f"must see the device's SavingBaseDirectory for the images of a continuous scan") from error
    if frames.shape[0] == 0:
        raise LinkError(f"the series file {path} holds no frames (saved without them): the images of a "
                        f"hardware-synchronised scan are the frames")
    frames[missing[missing < len(frames)]] = np.nan
    return frames


def _location(pattern: str) -> str:
    """A ValueRefPattern as the device's ``saving_directory/saving_name_pattern``."""
    location = pattern.strip()
    if location.startswith("h5file://"):
        location = location[len("h5file://"):]
    if location.startswith("/") or ".." in location.split("/"):
        raise LinkError(f"ValueRefPattern {pattern!r}: give DIR/NAME relative to the device's "
                        f"SavingBaseDirectory (the device writes only below it)")
    return location
