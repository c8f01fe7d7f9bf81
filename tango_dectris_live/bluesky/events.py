"""What the device pushes while the detector acquires: change events of a few signals and the
data-ready events of a result attribute, counted, so that "since the Start" can be asked."""
from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import tango
from ophyd_async.core import DEFAULT_TIMEOUT, SignalR

from .driver import DectrisLiveDriver

log = logging.getLogger(__name__)
T = TypeVar("T")

#: the driver signals followed: the end of an acquisition (acquisitions_ended, State), progress
#: (heartbeats), the saved file
FOLLOWED = ("acquisitions_ended", "state", "acquisition_status", "frames_processed", "saving_status",
            "last_saved_file", "frames_saved")
DATA_READY = "data_ready"


@dataclass(frozen=True)
class Mark:
    """The event counts at one moment: what arrived later is "since the mark"."""

    counts: dict[str, int]


class DeviceEvents:
    """Counts and latest values of the device's events, with an asyncio wake-up per arrival.

    Change events come through the ophyd-async signals, the data-ready events of one result
    attribute through the driver's ``DeviceProxy``; PyTango runs both callbacks in the event loop,
    in the order the device pushed the events."""

    def __init__(self, driver: DectrisLiveDriver) -> None:
        self._driver = driver
        self._counts: Counter[str] = Counter()
        self._latest: dict[str, Any] = {}
        self._changed: asyncio.Event | None = None
        self._callbacks: dict[str, Callable[[dict], None]] = {}
        self._data_ready_attribute = ""
        self._data_ready_id: int | None = None

    # ---- subscriptions ---------------------------------------------------------------------

    async def follow(self, data_ready_attribute: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Subscribe (once) the followed signals, and the data-ready events of
        ``data_ready_attribute``; returns when every signal has delivered its current value, so
        that a mark taken now is after them."""
        if self._changed is None:
            self._changed = asyncio.Event()
        for name in FOLLOWED:
            if name not in self._callbacks:
                self._callbacks[name] = self._change_callback(name)
                self._signal(name).subscribe_reading(self._callbacks[name])
        if data_ready_attribute != self._data_ready_attribute:
            self._unsubscribe_data_ready()
            proxy = self._driver.get_proxy()
            if proxy is None:
                raise RuntimeError(f"{self._driver.name} is not connected")
            self._data_ready_id = await proxy.subscribe_event(
                data_ready_attribute, tango.EventType.DATA_READY_EVENT, self._data_ready_callback)
            self._data_ready_attribute = data_ready_attribute
        await asyncio.wait_for(self.until(lambda: all(self._counts[name] for name in FOLLOWED)), timeout)

    async def close(self) -> None:
        for name, callback in self._callbacks.items():
            self._signal(name).clear_sub(callback)
        self._callbacks.clear()
        self._unsubscribe_data_ready()
        # what was seen is stale from now on: the next follow() waits for fresh values
        self._counts.clear()
        self._latest.clear()

    def _signal(self, name: str) -> SignalR:
        return getattr(self._driver, name)

    def _unsubscribe_data_ready(self) -> None:
        proxy = self._driver.get_proxy()
        if self._data_ready_id is not None and proxy is not None:
            try:
                # synchronously: this also runs while a plan is being cancelled
                proxy.unsubscribe_event(self._data_ready_id, green_mode=tango.GreenMode.Synchronous)
            except tango.DevFailed as error:
                log.warning("could not unsubscribe the data-ready events of %s: %s", self._data_ready_attribute,
                            error.args[0].desc)
        self._data_ready_id = None
        self._data_ready_attribute = ""

    def _change_callback(self, name: str) -> Callable[[dict], None]:
        def changed(readings: dict) -> None:
            (reading,) = readings.values()
            value = reading["value"]
            self._latest[name] = value
            self._counts[name] += 1
            self._wake()
        return changed

    async def _data_ready_callback(self, event: tango.DataReadyEventData) -> None:
        # A coroutine: PyTango runs it in the event loop in the order the events came, like the
        # signals' change events (the device pushes a series' data-ready event before the
        # acquisitions_ended that ends it; a hop of its own through the loop could put it after)
        if event.err:
            # e.g. the device server went away: the series' end is then seen through State
            log.warning("data-ready event error on %s: %s", self._data_ready_attribute, event.errors[0].desc)
        else:
            self._counts[DATA_READY] += 1
        self._wake()

    def _wake(self) -> None:
        if self._changed is not None:
            self._changed.set()

    # ---- what arrived ----------------------------------------------------------------------

    def mark(self) -> Mark:
        return Mark(dict(self._counts))

    def since(self, mark: Mark, name: str) -> int:
        """How many events of ``name`` (a followed signal or DATA_READY) came after ``mark``."""
        return self._counts[name] - mark.counts.get(name, 0)

    def latest(self, name: str) -> Any:
        return self._latest.get(name)

    async def until(self, condition: Callable[[], T | None], on_arrival: Callable[[], None] | None = None) -> T:
        """The first truthy value of ``condition()``, evaluated now and after each batch of events
        (``on_arrival`` is called before each evaluation); ``condition`` may raise to give up."""
        if self._changed is None:
            raise RuntimeError("DeviceEvents.follow() was not called")
        while True:
            self._changed.clear()  # before looking: what arrives from now on wakes the wait below
            if on_arrival is not None:
                on_arrival()
            result = condition()
            if result:
                return result
            await self._changed.wait()
