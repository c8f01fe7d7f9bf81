"""The Tango-free detector component: the DCU client, its supervision and the live acquisition of
one detector, its validated settings, and the device's condition (see ``detector.py``)."""
from .catalogue import CORE_KEYS, ParameterCatalogue
from .detector import (CommandRefused, DetectorAddress, DetectorListener, DeviceCondition, DeviceState,
                       LiveDetector)
from .settings import LiveSettings, SettingsContext

__all__ = ["CORE_KEYS", "CommandRefused", "DetectorAddress", "DetectorListener", "DeviceCondition", "DeviceState",
           "LiveDetector", "LiveSettings", "ParameterCatalogue", "SettingsContext"]
