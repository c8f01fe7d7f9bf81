"""Moved to :mod:`tango_dectris_live.testing` (``EventRecorder``, formerly ``LiveEventLog``); kept so
that tests written before the move still import."""
from tango_dectris_live.testing import ChangeEvent, EventRecorder

LiveEventLog = EventRecorder

__all__ = ["ChangeEvent", "EventRecorder", "LiveEventLog"]
