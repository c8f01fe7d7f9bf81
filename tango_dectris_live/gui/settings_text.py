"""The live-processing settings as the panel's text fields show and accept them.

Qt-free: the rules (``6 × 8`` for a scan shape, ``sum, bf`` for analyses, empty for "the
detector's") are tested without a display.
"""
from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

_SEPARATORS = re.compile(r"[\s,×x*]+")  # 6 × 8, 6x8, 6, 8, 6 8


class SettingTextError(ValueError):
    """A text that is not a value of the setting; the message says what is expected."""


@dataclass(frozen=True)
class Setting:
    """One row of the settings form: the device attribute and how its value is written as text."""

    attribute: str
    label: str
    kind: str  # "names", "integers", "numbers" (spectra) or "number" (a scalar)
    unit: str = ""
    hint: str = ""


SETTINGS = (
    Setting("analyses", "Analyses", "names", hint="analysis names, comma-separated"),
    Setting("nav_shape", "Scan shape", "integers", hint="rows × columns (or positions); empty: from the detector"),
    Setting("beam_center", "Beam centre", "numbers", "px", "x, y; empty: the detector's beam_center_x/y"),
    Setting("bf_radius", "BF radius", "number", "px", "radius of the virtual bright-field disk"),
    Setting("adf_inner_radius", "ADF inner radius", "number", "px", "inner radius of the annular dark field"),
    Setting("adf_outer_radius", "ADF outer radius", "number", "px", "outer radius of the annular dark field"),
    Setting("result_event_rate", "Result events", "number", "Hz",
            "most change events per second of each result while a series runs"),
)


def format_setting(kind: str, value: Any) -> str:
    """The text a field shows for ``value`` (a Tango read value; None or empty: empty text)."""
    if value is None:
        return ""
    if kind == "number":
        return f"{float(value):g}"
    items = list(value)
    if kind == "names":
        return ", ".join(str(item) for item in items)
    if kind == "integers":
        return " × ".join(str(int(item)) for item in items)
    if kind == "numbers":
        return ", ".join(f"{float(item):g}" for item in items)
    raise ValueError(f"unknown setting kind {kind!r}")


def parse_setting(kind: str, text: str) -> Any:
    """The value to write for ``text``; SettingTextError names what was expected."""
    text = text.strip()
    if kind == "number":
        try:
            number = float(text)
        except ValueError:
            raise SettingTextError(f"a number is expected, got {text!r}") from None
        if not math.isfinite(number):
            raise SettingTextError(f"a finite number is expected, got {text!r}")
        return number
    if kind == "names":
        return [part for part in re.split(r"[,\s]+", text) if part]
    parts = [part for part in _SEPARATORS.split(text) if part]
    if kind == "integers":
        try:
            return [int(part) for part in parts]
        except ValueError:
            raise SettingTextError(f"whole numbers like '6 × 8' are expected, got {text!r}") from None
    if kind == "numbers":
        try:
            numbers = [float(part) for part in parts]
        except ValueError:
            raise SettingTextError(f"numbers like '95.5, 97' are expected, got {text!r}") from None
        if not all(math.isfinite(number) for number in numbers):
            raise SettingTextError(f"finite numbers are expected, got {text!r}")
        return numbers
    raise ValueError(f"unknown setting kind {kind!r}")


def results_of(analyses: Sequence[str], result_attributes: Sequence[str]) -> list[str]:
    """The result attributes of ``analyses``, in their order, from the device's ``result_attributes``
    lines ``"analysis: attr1, attr2"``; an analysis the listing lacks adds nothing."""
    by_analysis: dict[str, list[str]] = {}
    for line in result_attributes:
        name, _, attributes = line.partition(":")
        by_analysis[name.strip()] = [attr.strip() for attr in attributes.split(",") if attr.strip()]
    return [attr for analysis in analyses for attr in by_analysis.get(analysis, [])]
