"""Bluesky/ophyd-async access to a ``DectrisLive`` device (optional extra ``bluesky``).

A client of the device over Tango, like any other: it imports nothing of the server side.
See docs/bluesky.md.
"""
from .data import SeriesFileError
from .detector import DectrisLiveDetector
from .driver import DectrisLiveDriver
from .logic import AcquisitionError

__all__ = ["AcquisitionError", "DectrisLiveDetector", "DectrisLiveDriver", "SeriesFileError"]
