"""What one acquisition (one ``Start``: one series of ``nav_shape`` frames) produces, and the
record of the series acquired, shared by the detector's acquire and data logics."""
from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from ophyd_async.core import soft_signal_r_and_setter

from .driver import DectrisLiveDriver

SAVING_MODES = ("off", "results", "results_and_frames")
# bit_depth_image -> the frames' pixel type, as the device's receiver takes it (32 for any other depth)
_PIXEL_TYPES = {8: np.uint8, 16: np.uint16, 32: np.uint32}


def parse_result_attributes(lines: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """The device's ``result_attributes`` (``'com: com_x_image, com_y_image'``) as analysis -> attributes."""
    results: dict[str, tuple[str, ...]] = {}
    for line in lines:
        analysis, _, names = line.partition(":")
        results[analysis.strip()] = tuple(name.strip() for name in names.split(",") if name.strip())
    return results


@dataclass(frozen=True)
class SeriesLayout:
    """The device's settings a series is acquired with, read when the detector is prepared: what
    the readings and the series files hold."""

    analyses: tuple[str, ...]
    #: result attribute -> its analysis (the file's group ``/entry/results/<analysis>``)
    results: dict[str, str]
    nav_shape: tuple[int, ...]
    frame_shape: tuple[int, int]  # (height, width)
    pixel_dtype: str  # numpy's type string of the frames, e.g. '<u2'
    saving_mode: str

    @property
    def frames(self) -> int:
        return math.prod(self.nav_shape)

    @property
    def saved(self) -> bool:
        return self.saving_mode != "off"

    @property
    def saves_frames(self) -> bool:
        return self.saving_mode == "results_and_frames"

    def changes(self, analyses: Sequence[str], nav_shape: Sequence[int], saving_mode: str) -> list[str]:
        """The settings that differ on the device now (the detector was prepared with these)."""
        now = {"analyses": tuple(analyses), "nav_shape": tuple(int(n) for n in nav_shape), "saving_mode": saving_mode}
        then = {"analyses": self.analyses, "nav_shape": self.nav_shape, "saving_mode": self.saving_mode}
        return [f"{key} {then[key]!r} -> {now[key]!r}" for key in now if now[key] != then[key]]


async def read_layout(driver: DectrisLiveDriver) -> SeriesLayout:
    """The layout of the next series, from the device's current settings."""
    analyses, result_lines, nav_shape, saving_mode = await asyncio.gather(
        driver.analyses.get_value(cached=False), driver.result_attributes.get_value(cached=False),
        driver.nav_shape.get_value(cached=False), driver.saving_mode.get_value(cached=False))
    width, height, bit_depth = await asyncio.gather(
        driver.simplon("x_pixels_in_detector").get_value(cached=False),
        driver.simplon("y_pixels_in_detector").get_value(cached=False),
        driver.simplon("bit_depth_image").get_value(cached=False))
    if not analyses:
        raise ValueError(f"the DectrisLive device {driver.get_trl()} runs no analyses: select some "
                         f"(DectrisLiveDetector(..., analyses=[...]) or det.driver.analyses)")
    if len(nav_shape) == 0:
        raise ValueError(f"the DectrisLive device {driver.get_trl()} has no nav_shape: set the scan shape "
                         f"(DectrisLiveDetector(..., nav_shape=(rows, columns)) or det.driver.nav_shape)")
    if saving_mode not in SAVING_MODES:
        raise ValueError(f"saving_mode {saving_mode!r} of {driver.get_trl()} is none of {', '.join(SAVING_MODES)}")
    if saving_mode == "results_and_frames" and driver.role is not None and \
            await driver.role.get_value() == "merger":
        raise ValueError(f"{driver.get_trl()} is a merging device (Role merger): its series files hold the "
                         f"results, the frames are in its nodes' files; set its saving_mode to results (and the "
                         f"nodes' saving_mode to results_and_frames to keep the frames)")
    by_analysis = parse_result_attributes(result_lines)
    missing = [name for name in analyses if name not in by_analysis]
    if missing:
        raise ValueError(f"the device lists no result attributes for the analyses {missing} "
                         f"(result_attributes: {list(result_lines)})")
    results = {attribute: name for name in analyses for attribute in by_analysis[name]}
    return SeriesLayout(analyses=tuple(analyses), results=results, nav_shape=tuple(int(n) for n in nav_shape),
                        frame_shape=(int(height), int(width)),
                        pixel_dtype=np.dtype(_PIXEL_TYPES.get(int(bit_depth), np.uint32)).str,
                        saving_mode=saving_mode)


@dataclass(frozen=True)
class AcquiredSeries:
    """One series acquired by the detector: its id, its file (empty when not saved) and, when it
    failed, why."""

    series_id: int
    path: str = ""
    error: str = ""


class SeriesRecord:
    """The layout the detector was prepared with and every series it acquired since it was made.

    ``done`` counts the series that ended (failed ones too, so that a waiting detector wakes up
    and reports the failure); it is the data logics' ``collections_written``."""

    def __init__(self) -> None:
        self.layout: SeriesLayout | None = None
        self.series: list[AcquiredSeries] = []
        self.done, self._set_done = soft_signal_r_and_setter(int, 0)

    def require_layout(self) -> SeriesLayout:
        if self.layout is None:
            raise RuntimeError("the detector has not been prepared (stage it, or call prepare) before acquiring")
        return self.layout

    def add(self, series: AcquiredSeries) -> None:
        self.series.append(series)
        self._set_done(len(self.series))

    def heartbeat(self) -> None:
        """The device reported progress: the same count again, which restarts ophyd-async's wait
        for the next collection (its timeout is the longest silence, not the series' duration)."""
        self._set_done(len(self.series))

