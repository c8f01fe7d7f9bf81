"""Time a device's ``Start`` as a client sees it: until the final result (the data-ready event of
each result named) and State ON again. Shared by the benchmarks that measure command to result."""
from __future__ import annotations

import threading
import time
from typing import Any

import tango

from tango_dectris_live.testing import wait_for


class StartTimer:
    """Subscribes to the data-ready events of ``results`` and the State change events of ``proxy``."""

    def __init__(self, proxy: tango.DeviceProxy, results: tuple[str, ...] = ("sum_image",)) -> None:
        self.proxy = proxy
        self.results = tuple(results)
        self._lock = threading.Lock()
        self._t0 = float("inf")
        self._ready: dict[str, float] = {}
        self._states: list[tuple[float, Any]] = []
        self._done = threading.Event()
        self._initial_state = False
        self._ids = [proxy.subscribe_event(name, tango.EventType.DATA_READY_EVENT, self._on_data_ready(name))
                     for name in self.results]
        self._ids.append(proxy.subscribe_event("State", tango.EventType.CHANGE_EVENT, self._on_state))
        wait_for(lambda: self._initial_state, 30, "the State subscription's initial event", interval=0.01)
        # an event pushed right after subscribing may not reach the client: give the channel a moment
        time.sleep(1.0)

    def _on_data_ready(self, name: str) -> Any:
        def callback(event: Any) -> None:
            now = time.perf_counter()
            if not event.err and now > self._t0:
                with self._lock:
                    self._ready.setdefault(name, now)
                self._check()
        return callback

    def _on_state(self, event: Any) -> None:
        now = time.perf_counter()
        if event.err or event.attr_value is None:
            return
        if now <= self._t0:
            self._initial_state = True
            return
        with self._lock:
            self._states.append((now, event.attr_value.value))
        self._check()

    def _on_at(self) -> float | None:
        """The first State ON received after a RUNNING (or other non-ON) state of this Start."""
        seen_other = False
        for received, state in self._states:
            if state != tango.DevState.ON:
                seen_other = True
            elif seen_other:
                return received
        return None

    def _check(self) -> None:
        with self._lock:
            if len(self._ready) == len(self.results) and self._on_at() is not None:
                self._done.set()

    def start(self) -> float:
        """Send ``Start``; its perf_counter time."""
        with self._lock:
            self._ready.clear()
            self._states.clear()
            self._done.clear()
            self._t0 = started = time.perf_counter()
        self.proxy.Start()
        return started

    def wait(self, timeout: float) -> tuple[float, float]:
        """(the last final result received, State ON received), perf_counter; RuntimeError after
        ``timeout`` seconds, saying what was seen."""
        if not self._done.wait(timeout):
            with self._lock:
                seen = (f"data-ready of {sorted(self._ready)}, State events "
                        f"{[(round(t - self._t0, 3), str(s)) for t, s in self._states]}")
            raise RuntimeError(f"no final result and State ON within {timeout} s: {seen} "
                               f"(Status: {self.proxy.status()})")
        with self._lock:
            return max(self._ready.values()), self._on_at()

    def close(self) -> None:
        for event_id in self._ids:
            try:
                self.proxy.unsubscribe_event(event_id)
            except tango.DevFailed:
                pass
        self._ids = []
