"""What a Tango client subscribed to the device's live attributes receives: change events
(value + quality) and data-ready events (the processed-frame count), per attribute."""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import tango


@dataclass(frozen=True)
class ChangeEvent:
    value: Any
    quality: tango.AttrQuality


class LiveEventLog:
    """Subscribes ``proxy``'s attributes on entering, unsubscribes on leaving.

    ``changes``: attributes followed by change events; ``data_ready``: attributes followed by
    data-ready events. The subscription's initial change event is recorded like any other: call
    :meth:`clear` once it arrived to keep only what happens afterwards.
    """

    def __init__(self, proxy: tango.DeviceProxy, changes: tuple[str, ...] = (),
                 data_ready: tuple[str, ...] = ()) -> None:
        self.proxy = proxy
        self._change_names = tuple(changes)
        self._data_ready_names = tuple(data_ready)
        self._lock = threading.Lock()
        self._changes: dict[str, list[ChangeEvent]] = {name: [] for name in changes}
        self._data_ready: dict[str, list[int]] = {name: [] for name in data_ready}
        self._errors: list[str] = []
        self._subscriptions: list[int] = []

    def __enter__(self) -> LiveEventLog:
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
            with self._lock:
                if event.err:
                    self._errors.append(f"{name}: {event.errors[0].desc}")
                else:
                    self._changes[name].append(ChangeEvent(event.attr_value.value, event.attr_value.quality))
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
        with self._lock:
            return list(self._changes[name])

    def values(self, name: str) -> list[Any]:
        return [event.value for event in self.changes(name)]

    def data_ready(self, name: str) -> list[int]:
        with self._lock:
            return list(self._data_ready[name])

    @property
    def errors(self) -> list[str]:
        with self._lock:
            return list(self._errors)

    def clear(self) -> None:
        with self._lock:
            for events in (*self._changes.values(), *self._data_ready.values()):
                events.clear()
