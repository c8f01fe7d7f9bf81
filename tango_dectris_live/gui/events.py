"""Taurus components that take the device's change events at a rate the Qt thread can draw.

Taurus calls a component's ``fireEvent`` from the Tango event thread for every event; the stock
components then queue each one to the Qt thread. :class:`CoalescedEvents` replaces that step: the
newest event of each type is kept (:class:`~.coalesce.LatestEvents`) and one queued wake-up hands
it to ``handleEvent`` at most ``max_rate`` times per second. Nothing here reads an attribute: the
values come from the events Taurus subscribed to (and from the one read Tango makes when it
subscribes).
"""
from __future__ import annotations

import math
from typing import Any

from taurus.core.taurusbasetypes import TaurusEventType
from taurus.external.qt import Qt
from taurus.qt.qtgui.base import TaurusBaseComponent
from taurus.qt.qtgui.display import TaurusLabel

from .coalesce import LatestEvents

DEFAULT_MAX_RATE = 10.0  # draws per second of one widget: smooth to the eye, cheap for the Qt thread


class _Delivery(Qt.QObject):
    """Lives in the Qt thread: a wake-up signal (emitted from any thread) and a one-shot timer.
    A child of its component, so that it goes (and its timer stops) with it."""

    wake = Qt.pyqtSignal()

    def __init__(self, parent: Qt.QObject) -> None:
        super().__init__(parent)
        self.timer = Qt.QTimer(self)
        self.timer.setSingleShot(True)


class CoalescedEvents:
    """Mixin placed before a :class:`TaurusBaseComponent` class that is also a QObject:
    ``handleEvent`` gets the newest event of each type, at most ``max_rate`` times per second, in
    the Qt thread."""

    def _init_coalescing(self, max_rate: float = DEFAULT_MAX_RATE) -> None:
        if not max_rate > 0:
            raise ValueError(f"the redraw rate must be > 0 per second, got {max_rate!r}")
        self.events = LatestEvents(1.0 / max_rate)
        self._delivery = _Delivery(self)
        self._delivery.wake.connect(self._schedule_delivery, Qt.Qt.QueuedConnection)
        self._delivery.timer.timeout.connect(self._deliver)

    def fireEvent(self, evt_src: Any = None, evt_type: Any = None, evt_value: Any = None) -> None:
        """Replaces TaurusBaseComponent.fireEvent (any thread): keep, and wake the Qt thread once."""
        if self.events.put(evt_type, (evt_src, evt_type, evt_value)):
            self._delivery.wake.emit()

    def _schedule_delivery(self) -> None:
        self._delivery.timer.start(math.ceil(self.events.delay() * 1000))

    def _deliver(self) -> None:
        for event in self.events.take():
            self.filterEvent(*event)


class AttributeWatcher(CoalescedEvents, Qt.QObject, TaurusBaseComponent):
    """A widget-less listener of one attribute: ``valueChanged(value, quality)`` with the plain
    value (numbers without their unit), ``failed(message)`` on an error event."""

    valueChanged = Qt.pyqtSignal(object, object)
    failed = Qt.pyqtSignal(str)

    def __init__(self, model: str, parent: Qt.QObject | None = None, max_rate: float = DEFAULT_MAX_RATE) -> None:
        # PyQt5's cooperative __init__ hands ``name`` on to TaurusBaseComponent.__init__ (calling
        # that one as well would initialise it twice: two connections, each event handled twice)
        Qt.QObject.__init__(self, parent, name=type(self).__name__)
        self._init_coalescing(max_rate)
        self.value: Any = None
        self.quality: Any = None
        self.setModel(model)

    def handleEvent(self, evt_src: Any, evt_type: Any, evt_value: Any) -> None:
        if evt_type == TaurusEventType.Error:
            self.failed.emit(_error_text(evt_value))
            return
        if evt_type not in (TaurusEventType.Change, TaurusEventType.Periodic) or evt_value is None:
            return
        self.value = plain_value(evt_value.rvalue)
        self.quality = evt_value.quality
        self.valueChanged.emit(self.value, self.quality)


class CoalescedLabel(CoalescedEvents, TaurusLabel):
    """A TaurusLabel (value, unit) redrawn at most ``max_rate`` times per second. ``bg_role``:
    Taurus' background role; "none" by default (a green "valid" behind every counter is noise),
    "value" for State (the state's colour), "quality" where the quality says something."""

    def __init__(self, model: str, parent: Qt.QWidget | None = None, max_rate: float = DEFAULT_MAX_RATE,
                 bg_role: str = "none") -> None:
        TaurusLabel.__init__(self, parent)
        self._init_coalescing(max_rate)
        self.setBgRole(bg_role)
        self.setModel(model)


class EventProgressBar(Qt.QProgressBar):
    """The ``progress`` attribute (percent) as a bar, from its change events.

    A bar that owns a watcher rather than a Taurus component itself: QProgressBar and
    TaurusBaseComponent both define ``setFormat``."""

    def __init__(self, model: str, parent: Qt.QWidget | None = None, max_rate: float = DEFAULT_MAX_RATE) -> None:
        super().__init__(parent)
        self.setRange(0, 1000)
        self.setValue(0)
        self.setFormat("—")
        self.watcher = AttributeWatcher(model, self, max_rate)
        self.watcher.valueChanged.connect(self._show)
        self.watcher.failed.connect(self._failed)
        self._show(self.watcher.value)

    def _show(self, percent: Any, _quality: Any = None) -> None:
        if percent is None or not math.isfinite(percent):
            self.setFormat("—")
            return
        self.setValue(round(max(0.0, min(100.0, percent)) * 10))
        self.setFormat(f"{percent:.1f} %")

    def _failed(self, message: str) -> None:
        self.setFormat("error")
        self.setToolTip(message)


def plain_value(rvalue: Any) -> Any:
    """A Taurus read value without its unit (Taurus wraps numbers in pint quantities)."""
    return getattr(rvalue, "magnitude", rvalue)


def _error_text(error: Any) -> str:
    args = getattr(error, "args", None)
    if args and hasattr(args[0], "desc"):
        return str(args[0].desc)
    return str(error)
