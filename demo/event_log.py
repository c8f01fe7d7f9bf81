"""A Tango event subscriber that counts what the demo's client receives, acquisition by acquisition."""
from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

import tango

_PEAK_ATTRIBUTES = ("receive_rate", "process_rate", "backlog")

@dataclass
class PhaseEvents:
    """The events received during one phase of the demo (subscription, active scan, passive series)."""

    change: Counter = field(default_factory=Counter)  # attribute -> change events
    data_ready: Counter = field(default_factory=Counter)  # attribute -> data-ready events
    errors: Counter = field(default_factory=Counter)  # attribute -> error events
    changing: Counter = field(default_factory=Counter)  # attribute -> events with quality CHANGING
    processed_samples: list[int] = field(default_factory=list)  # frames_processed, in arrival order
    peak: dict[str, float] = field(default_factory=dict)  # rate/backlog attribute -> highest value seen


class EventLog:
    """Callback for ``DeviceProxy.subscribe_event``: counts per phase, keeps each attribute's last value.

    Tango calls :meth:`push_event` from its own thread; :meth:`wait_until` lets the main thread wait
    for a condition on what arrived (a final result, a status text) with a deadline, not a sleep.
    """

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self.phases: dict[str, PhaseEvents] = {}
        self.phase = "subscribe"
        self.phases[self.phase] = PhaseEvents()
        self.last_value: dict[str, Any] = {}
        self.last_quality: dict[str, tango.AttrQuality] = {}
        self.statuses: list[str] = []

    def begin_phase(self, name: str) -> None:
        with self._changed:
            self.phase = name
            self.phases[name] = PhaseEvents()

    @property
    def current(self) -> PhaseEvents:
        return self.phases[self.phase]

    def push_event(self, event: Any) -> None:
        with self._changed:
            events = self.phases[self.phase]
            name = event.attr_name.rsplit("/", 1)[-1].lower()
            if event.err:
                events.errors[name] += 1
            elif isinstance(event, tango.DataReadyEventData):
                events.data_ready[name] += 1
            else:
                value = event.attr_value
                events.change[name] += 1
                self.last_value[name] = value.value
                self.last_quality[name] = value.quality
                if value.quality == tango.AttrQuality.ATTR_CHANGING:
                    events.changing[name] += 1
                if name == "frames_processed":
                    events.processed_samples.append(int(value.value))
                elif name in _PEAK_ATTRIBUTES:
                    events.peak[name] = max(events.peak.get(name, 0.0), float(value.value))
                elif name == "acquisition_status":
                    self.statuses.append(str(value.value))
            self._changed.notify_all()

    def wait_until(self, condition: Callable[["EventLog"], bool], timeout: float, what: str) -> None:
        """Return once ``condition(self)`` holds; raise TimeoutError naming ``what`` after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not condition(self):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no {what} within {timeout:g} s")
                self._changed.wait(left)
