"""Keep only the newest event of each kind, and hand them over at a bounded rate.

The device pushes a result image up to ``result_event_rate`` (at most 100) times per second and
every progress counter whenever it changes. Drawing each of them would queue more work in the Qt
thread than it can do, and the panel would lag behind the scan and stop answering clicks. A widget
that draws the newest value ten times a second shows the same thing and keeps up. No event is lost
that matters: the last one of a series (the final result) is always delivered, at most one
interval late.

Qt-free, so that the rule is tested without a display; :mod:`.events` wires it to Taurus and Qt.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

E = TypeVar("E")


class LatestEvents(Generic[E]):
    """The newest event of each kind since the last delivery, and when the next may happen.

    :meth:`put` is called from the Tango event threads, :meth:`delay` and :meth:`take` from the
    Qt thread. ``put`` returns True only for the first event after a delivery: that caller
    schedules one delivery; later events replace the kept one until it happens.
    """

    def __init__(self, min_interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        if not min_interval >= 0:
            raise ValueError(f"the interval between two deliveries must be >= 0 seconds, got {min_interval!r}")
        self.min_interval = float(min_interval)
        self._clock = clock
        self._lock = threading.Lock()
        self._latest: dict[Hashable, E] = {}
        self._pending = False
        self._last_delivery: float | None = None
        self.received = 0
        self.delivered = 0
        self.deliveries = 0

    def put(self, kind: Hashable, event: E) -> bool:
        """Keep ``event`` as the newest of its ``kind``; True when a delivery must be scheduled."""
        with self._lock:
            # moved to the end, so that delivery follows the order of the newest events (an error
            # then a value shows the value, a value then an error shows the error)
            self._latest.pop(kind, None)
            self._latest[kind] = event
            self.received += 1
            if self._pending:
                return False
            self._pending = True
            return True

    def delay(self) -> float:
        """Seconds until the next delivery is allowed (0: now)."""
        with self._lock:
            if self._last_delivery is None:
                return 0.0
            return max(0.0, self._last_delivery + self.min_interval - self._clock())

    def take(self) -> list[E]:
        """The kept events, one per kind, in the order their newest arrived; clears them."""
        with self._lock:
            events = list(self._latest.values())
            self._latest.clear()
            self._pending = False
            self._last_delivery = self._clock()
            self.delivered += len(events)
            self.deliveries += 1
            return events
