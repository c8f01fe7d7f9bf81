"""The SIMPLON side of a live series: what the DCU is set to (trigger mode, scan size, frame time,
stream geometry), setting the scan, enabling the stream, triggering, and the detector's beam
centre. One object per detector, Tango-free, used by the acquisition session."""
from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from tango_dectris_live.simplon.client import DetectorClient
from tango_dectris_live.simplon.errors import SimplonError, UnknownParameterError

from .analyses import AnalysisParameters
from .limits import ONE_IMAGE_PER_TRIGGER_MODES, check_images_per_trigger

log = logging.getLogger(__name__)

_BIT_DEPTH_DTYPES = {8: "uint8", 16: "uint16", 32: "uint32"}
_STREAM_FORMAT_VERSIONS = {"legacy": 1, "cbor": 2}
EXTERNAL_TRIGGER_MODES = ("exts", "exte")


def scan_triggers(nav_shape: tuple[int, ...], trigger_mode: str, images_per_trigger: int = 0) -> tuple[int, int]:
    """(nimages, ntrigger) of a scan: inte/exte one image per trigger; ints/exts all images in one
    trigger, or ``images_per_trigger`` each (checked by :func:`check_images_per_trigger`)."""
    count = int(np.prod(nav_shape))
    check_images_per_trigger(images_per_trigger, nav_shape, trigger_mode)
    if trigger_mode in ONE_IMAGE_PER_TRIGGER_MODES:
        return 1, count
    images = images_per_trigger or count
    return images, count // images


@dataclass(frozen=True)
class StreamGeometry:
    """What the receiver must be built for: stream version, frame shape, pixel type."""

    version: int
    frame_shape: tuple[int, int]
    dtype: str


class SeriesControl:
    """The DCU as a series needs it; ``detector`` is the DCU client (or a fake in tests)."""

    def __init__(self, detector: DetectorClient, reuse_for: float = 0.0) -> None:
        self.detector = detector
        # config values read at most this many seconds ago are not read again (0: always read);
        # the acquisition sets it per mode (see LiveAcquisition.CONFIG_REUSE_S)
        self.reuse_for = reuse_for

    def _value(self, module: str, key: str) -> Any:
        return self.detector.recent_value(module, key, self.reuse_for)

    def trigger_mode(self) -> str:
        try:
            return str(self._value("detector", "trigger_mode"))
        except UnknownParameterError:
            return "ints"

    def frame_time(self) -> float:
        try:
            return float(self._value("detector", "frame_time"))
        except (UnknownParameterError, TypeError, ValueError):
            return 0.0

    def scan_shape(self) -> tuple[int, ...]:
        """The scan the DCU is set for: (ntrigger, nimages), or one line."""
        nimages = int(self._value("detector", "nimages"))
        ntrigger = int(self._value("detector", "ntrigger"))
        return (ntrigger, nimages) if ntrigger > 1 and nimages > 1 else (max(1, nimages * ntrigger),)

    def image_count(self) -> int:
        try:
            return int(np.prod(self.scan_shape()))
        except (UnknownParameterError, TypeError, ValueError):
            return 0

    def configure_scan(self, nav_shape: tuple[int, ...], trigger_mode: str, images_per_trigger: int = 0) -> None:
        """One image per scan position: inte/exte one per trigger; ints/exts all in one trigger, or
        ``images_per_trigger`` per trigger (exts with 1: a trigger per scan point, as a hardware-
        synchronised continuous scan sends them)."""
        nimages, ntrigger = scan_triggers(nav_shape, trigger_mode, images_per_trigger)
        # Written only when they differ: a DCU that refuses writes (a replay of a recording
        # accepts only the recorded values) still runs a scan of the size it already has.
        for key, value in (("ntrigger", ntrigger), ("nimages", nimages)):
            try:
                current = int(self._value("detector", key))
            except (UnknownParameterError, TypeError, ValueError):
                current = None
            if current != value:
                try:
                    self.detector.write("detector", key, value)
                except SimplonError as error:
                    raise SimplonError(f"cannot set the scan of {list(nav_shape)} positions "
                                       f"({key} = {value}, the DCU has {current}): {error}") from error

    def trigger(self, trigger_mode: str, nav_shape: tuple[int, ...], stopped: Callable[[], bool],
                frame_time: float = 0.0, images_per_trigger: int = 0) -> None:
        """The software triggers of a series (none with external triggers); an ints trigger
        returns when its images are taken. ``stopped``: whether to give up (Stop/Abort);
        ``frame_time``: as read for this series (0: not known, read again)."""
        if trigger_mode == "ints":
            # the series' own figures: the timeout needs no second reading of them
            try:
                start_delay = float(self._value("detector", "trigger_start_delay") or 0.0)
            except UnknownParameterError:  # older firmware has no trigger_start_delay
                start_delay = 0.0
            nimages, ntrigger = scan_triggers(nav_shape, trigger_mode, images_per_trigger)
            timeout = self.detector.trigger_timeout(frame_time=frame_time or None, nimages=nimages,
                                                    start_delay=start_delay)
            for index in range(ntrigger):
                if index and stopped():
                    return
                self.detector.trigger(timeout=timeout)
        elif trigger_mode == "inte":
            count_time = float(self._value("detector", "count_time"))
            for _ in range(int(np.prod(nav_shape))):
                if stopped():
                    return
                self.detector.trigger(count_time=count_time)

    def tell(self, what: str, call: Callable[[], Any], quiet_when_idle: bool = False) -> None:
        """A command that may find the series already over (the DCU refuses cancel/disarm when
        idle): not a failure, logged unless ``quiet_when_idle``."""
        try:
            call()
        except SimplonError as error:
            if not quiet_when_idle:
                log.info("detector %s during the acquisition: %s", what, error)

    def with_beam_centre(self, parameters: AnalysisParameters) -> AnalysisParameters:
        """The beam centre defaults to the detector's beam_center_x/y (when it has them)."""
        if parameters.beam_centre is not None:
            return parameters
        try:
            x = float(self._value("detector", "beam_center_x"))
            y = float(self._value("detector", "beam_center_y"))
        except (UnknownParameterError, TypeError, ValueError):
            return parameters
        if not (math.isfinite(x) and math.isfinite(y)) or (x == 0 and y == 0):
            return parameters  # unset on the DCU: the frame centre is the better guess
        return parameters.with_beam_center_xy((x, y))

    def stream_geometry(self) -> StreamGeometry:
        """Stream version, frame shape and pixel type, as the DCU is configured now."""
        try:
            stream_format = str(self._value("stream", "format"))
        except UnknownParameterError:
            stream_format = "legacy"  # SIMPLON 1.6 and older firmware: stream v1 only
        version = _STREAM_FORMAT_VERSIONS.get(stream_format)
        if version is None:
            raise ValueError(f"stream/config/format is {stream_format!r}; the receiver knows "
                             f"{', '.join(_STREAM_FORMAT_VERSIONS)}")
        width = int(self._value("detector", "x_pixels_in_detector"))
        height = int(self._value("detector", "y_pixels_in_detector"))
        try:
            bit_depth = int(self._value("detector", "bit_depth_image"))
        except UnknownParameterError:
            bit_depth = 16
        return StreamGeometry(version, (height, width), _BIT_DEPTH_DTYPES.get(bit_depth, "uint32"))

    def enable_stream(self) -> None:
        try:
            mode = str(self._value("stream", "mode"))
        except UnknownParameterError:
            return  # a DCU without a stream mode key streams always
        if mode != "enabled":
            self.detector.write("stream", "mode", "enabled")
