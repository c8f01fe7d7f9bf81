"""What a client learns from a DectrisLive device about its attributes."""
from __future__ import annotations

from collections.abc import Iterable

import tango


def result_attributes(proxy: tango.DeviceProxy, analyses: Iterable[str]) -> list[str]:
    """The result attributes of ``analyses``, from the device's own ``result_attributes`` listing
    (lines ``"analysis: result, result"``), in the order of ``analyses``."""
    by_analysis = dict(line.split(": ", 1) for line in proxy.result_attributes)
    return [result for name in analyses for result in by_analysis[name].split(", ")]
