"""One live acquisition through a device, as a client runs it."""
from __future__ import annotations

import tango

from .events import EventRecorder
from .waiting import wait_for


def acquire(proxy: tango.DeviceProxy, timeout: float = 90.0, result: str = "sum_image") -> None:
    """Start an acquisition once the device is ON, wait for the final ``result`` (its data-ready
    event, pushed once per series) and for State ON again; TimeoutError names the Status."""
    with EventRecorder(proxy, data_ready=(result,)) as log:
        wait_for(lambda: proxy.state() == tango.DevState.ON, timeout, lambda: f"State ON ({proxy.status()})")
        proxy.Start()
        wait_for(lambda: log.data_ready(result), timeout, lambda: f"the final {result} ({proxy.status()})")
    wait_for(lambda: proxy.state() == tango.DevState.ON, timeout, lambda: f"State ON again ({proxy.status()})")
