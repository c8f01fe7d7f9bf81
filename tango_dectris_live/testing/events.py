"""What a Tango client subscribed to a device's attributes receives: change events (value, quality,
time of arrival) and data-ready events (the counter), per attribute."""
from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import tango


@dataclass(frozen=True)
class ChangeEvent:
    value: Any
    quality: tango.AttrQuality
    received_at: float  # time.perf_counter() when the callback ran


class EventRecorder:
    """Subscribes ``proxy``'s attributes on entering, unsubscribes on leaving.

    ``changes``: attributes followed by change events; ``data_ready``: attributes followed by
    data-ready events. ``keep``: how many change events to keep per attribute (None: all; 1 keeps
    the latest only, for large images pushed often); :meth:`change_count` counts every one.
    The subscription's initial change event is recorded like any other: wait for it and call
    :meth:`clear` to keep only what happens afterwards. Tango calls back from its own threads;
    every reader gets a copy. Wait on what arrived with :func:`~tango_dectris_live.testing.wait_for`.
    """

    def __init__(self, proxy: tango.DeviceProxy, changes: tuple[str, ...] = (),
                 data_ready: tuple[str, ...] = (), *, keep: int | None = None) -> None:
        self.proxy = proxy
        self._change_names = tuple(changes)
        self._data_ready_names = tuple(data_ready)
        self._lock = threading.Lock()
        self._changes: dict[str, deque[ChangeEvent]] = {name: deque(maxlen=keep) for name in changes}
        self._change_counts: dict[str, int] = dict.fromkeys(changes, 0)
        self._data_ready: dict[str, list[int]] = {name: [] for name in data_ready}
        self._errors: list[str] = []
        self._subscriptions: list[int] = []

    def __enter__(self) -> EventRecorder:
        try:
            for name in self._change_names:
                self._subscriptions.append(self.proxy.subscribe_event(
                    name, tango.EventType.CHANGE_EVENT, self._change_callback(name)))
            for name in self._data_ready_names:
                self._subscriptions.append(self.proxy.subscribe_event(
                    name, tango.EventType.DATA_READY_EVENT, self._data_ready_callback(name)))
        except tango.DevFailed:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        while self._subscriptions:
            self.proxy.unsubscribe_event(self._subscriptions.pop())

    def _change_callback(self, name: str):
        def push_event(event: tango.EventData) -> None:
            received_at = time.perf_counter()
            with self._lock:
                if event.err:
                    self._errors.append(f"{name}: {event.errors[0].desc}")
                else:
                    value = event.attr_value
                    self._changes[name].append(ChangeEvent(value.value, value.quality, received_at))
                    self._change_counts[name] += 1
        return push_event

    def _data_ready_callback(self, name: str):
        def push_event(event: tango.DataReadyEventData) -> None:
            with self._lock:
                if event.err:
                    self._errors.append(f"{name}: {event.errors[0].desc}")
                else:
                    self._data_ready[name].append(int(event.ctr))
        return push_event

    def changes(self, name: str) -> list[ChangeEvent]:
        """The change events of ``name`` kept since the last :meth:`clear`, oldest first."""
        with self._lock:
            return list(self._changes[name])

    def values(self, name: str) -> list[Any]:
        return [event.value for event in self.changes(name)]

    def latest(self, name: str) -> ChangeEvent | None:
        """The last change event of ``name`` since the last :meth:`clear`; None before one came."""
        with self._lock:
            events = self._changes[name]
            return events[-1] if events else None

    def change_count(self, name: str) -> int:
        """Change events of ``name`` received since the last :meth:`clear`, also those not kept."""
        with self._lock:
            return self._change_counts[name]

    def data_ready(self, name: str) -> list[int]:
        """The counters of the data-ready events of ``name`` since the last :meth:`clear`."""
        with self._lock:
            return list(self._data_ready[name])

    @property
    def errors(self) -> list[str]:
        """Error events since the last :meth:`clear`, each ``"attribute: description"``."""
        with self._lock:
            return list(self._errors)

    def clear(self) -> None:
        """Forget everything received so far (the subscriptions stay)."""
        with self._lock:
            for events in (*self._changes.values(), *self._data_ready.values()):
                events.clear()
            self._change_counts = dict.fromkeys(self._change_counts, 0)
            self._errors.clear()
