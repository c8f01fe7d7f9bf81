"""Sardana controllers for the ``DectrisLive`` device (optional extra ``sardana``).

A Sardana Pool loads controller classes from files in the folders of its ``PoolPath`` property,
and a MacroServer macros from its ``MacroPath``: :data:`CONTROLLER_PATH` and :data:`MACRO_PATH`
are those folders of this package. The controllers talk to the device over Tango only
(:mod:`.link`); this package imports nothing from the rest of the product, so a Pool needs only
``pip install tango-dectris-live[sardana]`` on its machine, not the detector's processing.
"""
from __future__ import annotations

from pathlib import Path

CONTROLLER_PATH = str(Path(__file__).resolve().parent / "controllers")
MACRO_PATH = str(Path(__file__).resolve().parent / "macros")
