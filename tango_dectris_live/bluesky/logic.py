"""How the detector drives the device: what ``prepare`` sets (trigger logic) and what one
acquisition is (acquire logic): ``Start``; its end, when the device's ``acquisitions_ended`` grows
and State is no longer RUNNING; success when the series' data-ready event came before that; and,
when saving, the series' file closed."""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from contextlib import suppress

import numpy as np
from ophyd_async.core import DEFAULT_TIMEOUT, DetectorAcquireLogic, DetectorTriggerLogic, TriggerInfo
from ophyd_async.tango.core import DevStateEnum

from .driver import DectrisLiveDriver
from .events import DATA_READY, DeviceEvents, Mark
from .series import AcquiredSeries, SeriesLayout, SeriesRecord, read_layout

log = logging.getLogger(__name__)

# Start's software trigger (ints/inte) is the INTERNAL trigger; exts/exte wait for hardware
INTERNAL_TRIGGER_MODES = ("ints", "inte")


class AcquisitionError(RuntimeError):
    """A series did not end with a result (or its file was not saved); the message is the device's."""


class LiveTriggerLogic(DetectorTriggerLogic):
    """``prepare``: the detector's analyses and scan shape (when given), software triggering, the
    exposure (``livetime`` -> ``count_time``, + ``deadtime`` -> ``frame_time``); then the layout
    of the series is read back from the device."""

    def __init__(self, driver: DectrisLiveDriver, record: SeriesRecord, analyses: Sequence[str] | None = None,
                 nav_shape: Sequence[int] | None = None) -> None:
        self._driver = driver
        self._record = record
        self._analyses = None if analyses is None else [str(name) for name in analyses]
        self._nav_shape = None if nav_shape is None else np.array([int(n) for n in nav_shape], dtype=np.int64)

    async def prepare_internal(self, num: int, livetime: float, deadtime: float) -> None:
        if num != 1:
            raise ValueError(f"{self._driver.get_trl()}: one acquisition is one series of nav_shape frames, so the "
                             f"detector is prepared for one collection at a time (number_of_events=1, "
                             f"collections_per_event=1), not {num}")
        if self._analyses is not None:
            await self._driver.analyses.set(self._analyses)
        if self._nav_shape is not None:
            await self._driver.nav_shape.set(self._nav_shape)
        await self._software_triggering()
        if livetime > 0:
            readout = await self._driver.simplon("detector_readout_time").get_value(cached=False) \
                if self._driver.detector_readout_time is not None else 0.0
            # frame_time first: the DCU shortens count_time to fit a shorter frame
            await self._driver.simplon("frame_time").set(livetime + max(deadtime, readout))
            await self._driver.simplon("count_time").set(livetime)
        self._record.layout = await read_layout(self._driver)

    async def default_trigger_info(self) -> TriggerInfo:
        return TriggerInfo()

    async def _software_triggering(self) -> None:
        # trigger_mode is a DevEnum whose labels the DCU orders: written by index through the proxy
        proxy = self._driver.get_proxy()
        if proxy is None:
            raise RuntimeError(f"{self._driver.name} is not connected")
        if "trigger_mode" not in proxy.get_attribute_list():
            raise RuntimeError(f"the DectrisLive device {self._driver.get_trl()} has no trigger_mode: initialize "
                               f"the detector first (Initialize)")
        labels = list((await proxy.get_attribute_config("trigger_mode")).enum_labels)
        current = labels[(await proxy.read_attribute("trigger_mode")).value]
        if current not in INTERNAL_TRIGGER_MODES:
            log.info("%s: trigger_mode %s -> ints", self._driver.get_trl(), current)
            await proxy.write_attribute("trigger_mode", labels.index("ints"))


class LiveAcquireLogic(DetectorAcquireLogic):
    """One acquisition is one ``Start`` of the device: one active series of ``nav_shape`` frames,
    processed live, saved when ``saving_mode`` says so. It is over when the device's
    ``acquisitions_ended`` has grown (whatever the outcome) and State is no longer RUNNING (the
    next Start is accepted); it succeeded when the series' data-ready event came (the device
    pushes it after the final results, before ``acquisitions_ended``); when saving, it is done
    once ``saving_status`` says the series' file is closed (``saved <path>: ...``)."""

    def __init__(self, driver: DectrisLiveDriver, record: SeriesRecord) -> None:
        self._driver = driver
        self._record = record
        self._events = DeviceEvents(driver)
        self._task: asyncio.Task[None] | None = None

    async def start_acquiring(self) -> None:
        if self._task is not None and not self._task.done():
            raise RuntimeError(f"{self._driver.get_trl()}: an acquisition of this detector is still running")
        layout = self._record.require_layout()
        await self._check_unchanged(layout)
        await self._events.follow(next(iter(layout.results)))
        mark = self._events.mark()
        ended_before, path_before = await asyncio.gather(self._driver.acquisitions_ended.get_value(cached=False),
                                                         self._driver.last_saved_file.get_value(cached=False))
        await self._driver.start.trigger()
        self._task = asyncio.create_task(self._acquire(layout, mark, ended_before, path_before))

    async def wait_for_idle(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            await task

    async def ensure_stopped(self) -> None:
        task, self._task = self._task, None
        if task is not None and not task.done():
            # a plan that ends early (an error, Ctrl-C): the device ends the series gracefully,
            # what arrived is processed, published and saved
            with suppress(RuntimeError):
                await self._driver.stop_.trigger()
            try:
                await asyncio.wait_for(asyncio.shield(task), DEFAULT_TIMEOUT * 3)
            except Exception as error:  # noqa: BLE001 - unstage goes on: the error was (or is) reported
                log.warning("%s: the stopped acquisition did not end cleanly: %s", self._driver.get_trl(), error)
                task.cancel()
        await self._events.close()

    # ---- one acquisition ---------------------------------------------------------------------

    async def _check_unchanged(self, layout: SeriesLayout) -> None:
        analyses, nav_shape, saving_mode = await asyncio.gather(
            self._driver.analyses.get_value(cached=False), self._driver.nav_shape.get_value(cached=False),
            self._driver.saving_mode.get_value(cached=False))
        changed = layout.changes(analyses, nav_shape, saving_mode)
        if changed:
            raise RuntimeError(f"{self._driver.get_trl()}: {', '.join(changed)} since the detector was prepared: "
                               f"prepare (or stage) it again")

    async def _acquire(self, layout: SeriesLayout, mark: Mark, ended_before: int, path_before: str) -> None:
        series = AcquiredSeries(series_id=-1)
        try:
            await self._series_end(mark, ended_before)
            series = AcquiredSeries(series_id=await self._driver.series_id.get_value(cached=False))
            missing = await self._driver.frames_missing.get_value(cached=False)
            if missing:
                log.warning("%s: series %d has %d missing frames (NaN in its scan-shaped results)",
                            self._driver.get_trl(), series.series_id, missing)
            if layout.saved:
                path = await self._saved_file(mark, path_before)
                series = AcquiredSeries(series_id=series.series_id, path=path)
        except BaseException as error:  # cancelled too: the series is then recorded as not acquired
            series = AcquiredSeries(series_id=series.series_id, error=str(error) or type(error).__name__)
            raise
        finally:
            # failed ones count too: the detector waiting for this series wakes up and reports it
            self._record.add(series)

    async def _series_end(self, mark: Mark, ended_before: int) -> None:
        events = self._events
        await events.until(lambda: events.latest("acquisitions_ended") > ended_before
                           and events.latest("state") != DevStateEnum.RUNNING, on_arrival=self._record.heartbeat)
        if not events.since(mark, DATA_READY):
            status = await self._driver.acquisition_status.get_value(cached=False)
            raise AcquisitionError(f"{self._driver.get_trl()}: the acquisition ended without a result: {status}")

    async def _saved_file(self, mark: Mark, path_before: str) -> str:
        """The series' file once the device's writer closed it."""
        events = self._events

        def saved() -> str | None:
            status = events.latest("saving_status") or ""
            path = events.latest("last_saved_file") or ""
            if path and path != path_before and status.startswith(f"saved {path}:"):
                return path
            if events.since(mark, "saving_status") and (
                    status.startswith(("saving stopped", "saving failed")) or " not saved" in status):
                raise AcquisitionError(f"{self._driver.get_trl()}: the series was not saved: {status}")
            return None
        return await events.until(saved, on_arrival=self._record.heartbeat)
