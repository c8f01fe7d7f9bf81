"""Active and passive acquisitions through the device are exact against each kind of partial DCU
and unusual stream framing the simulator can play:

* ``partial``: LiberTEM-live-like REST (no detector/status/state, HTTP 500 "not implemented" for
  the key listings and most keys) with the global header's parts as single-part messages;
* ``partial_split_all``: the same, every part of every message its own ZeroMQ message;
* ``partial_same_value_writes``: the same, config writes refused unless the value is already set
  (a replay of a recording);
* ``header_all_appendices_split``: a full DCU with header_detail all, header and image appendices,
  the header split over single-part messages.
"""
from __future__ import annotations

import numpy as np
import pytest
import requests
from tango import DevState
from tango.test_context import DeviceTestContext

from sim.server import SimulatorServer
from tango_dectris_live.device.dectris_live import DectrisLive
from tango_dectris_live.testing import acquire, EventRecorder, wait_for

from .live_reference import simulator_ground_truth

pytestmark = [pytest.mark.integration, pytest.mark.slow]

NAV = (4, 5)
COUNT = int(np.prod(NAV))
TIMEOUT = 90.0

VARIANTS = {
    "partial": ("partial", {}, {}),
    "partial_split_all": ("partial", {"v1_framing": "split_all"}, {}),
    "partial_same_value_writes": ("partial", {"writes": "same_value_only"}, {}),
    "header_all_appendices_split": ("full", {"v1_framing": "split_header"},
                                    {"header_detail": "all", "header_appendix": "scan 17 of run 3",
                                     "image_appendix": '{"motor_x": 1.5}'}),
}


def _put(url: str, value=None) -> None:
    reply = requests.put(url, json=None if value is None else {"value": value}, timeout=60)
    assert reply.status_code == 200, f"{url}: {reply.text}"


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request):
    profile, sim_config, stream_config = VARIANTS[request.param]
    with SimulatorServer(host="127.0.0.1", model="ARINA", profile=profile) as sim:
        base = f"{sim.rest_url}/detector/api/1.8.0"
        if profile == "full":
            _put(f"{base}/command/initialize")
        _put(f"{base}/config/trigger_mode", "ints")
        _put(f"{base}/config/ntrigger", 1)
        _put(f"{base}/config/nimages", COUNT)  # what a replay has recorded
        for key, value in stream_config.items():
            _put(f"{sim.rest_url}/stream/api/1.8.0/config/{key}", value)
        requests.put(f"{sim.rest_url}/sim/api/config", json={"pacing": "max", "nav_shape": list(NAV), **sim_config},
                     timeout=10).raise_for_status()
        properties = {"DcuHost": "127.0.0.1", "DcuPort": sim.port, "StreamPort": sim.stream_port,
                      "Stream2Port": sim.stream2_port, "StatePollPeriod": 0.1}
        with DeviceTestContext(DectrisLive, properties=properties, process=True, timeout=60) as proxy:
            wait_for(lambda: proxy.state() in (DevState.ON, DevState.OFF), 60, f"the device up ({proxy.status()})")
            if proxy.state() == DevState.OFF:
                proxy.Initialize()
            wait_for(lambda: proxy.state() == DevState.ON, 60, f"State ON ({proxy.status()})")
            proxy.analyses = ["sum", "sumsig"]
            proxy.nav_shape = list(NAV)
            yield request.param, sim, proxy


def assert_exact(proxy, sim) -> None:
    truth = simulator_ground_truth(sim, NAV)
    assert proxy.frames_processed == COUNT and proxy.frames_missing == 0, proxy.acquisition_status
    assert proxy.messages_rejected == 0, list(proxy.rejected_by_reason)
    np.testing.assert_array_equal(proxy.sum_image, truth.sum_frames(range(COUNT)))
    np.testing.assert_array_equal(proxy.sumsig_image, truth.sum_per_frame(range(COUNT)).reshape(NAV))


def test_status_says_what_the_dcu_lacks(variant):
    name, _sim, proxy = variant
    status = proxy.status()
    if name.startswith("partial"):
        assert "reports no state" in status and "does not provide" in status, status
    else:
        assert "reports no state" not in status, status


def test_active_acquisitions_are_exact(variant):
    _name, sim, proxy = variant
    for _ in range(2):
        acquire(proxy, TIMEOUT)
        assert_exact(proxy, sim)


def test_passive_acquisition_is_exact(variant):
    _name, sim, proxy = variant
    base = f"{sim.rest_url}/detector/api/1.8.0"
    with EventRecorder(proxy, data_ready=("sum_image",)) as log:
        proxy.Listen()
        wait_for(lambda: proxy.acquisition_status.startswith("listening"), TIMEOUT, "listening")
        _put(f"{base}/command/arm")
        _put(f"{base}/command/trigger")
        wait_for(lambda: log.data_ready("sum_image"), TIMEOUT, f"the final result ({proxy.status()})")
        _put(f"{base}/command/disarm")
        proxy.Stop()
    wait_for(lambda: "Live processing (idle)" in proxy.status(), TIMEOUT, f"idle ({proxy.status()})")
    assert_exact(proxy, sim)


@pytest.mark.parametrize("variant", ["partial_same_value_writes"], indirect=True)
def test_a_refused_write_names_the_dcus_text_and_the_device_stays_usable(variant):
    _name, _sim, proxy = variant
    proxy.nav_shape = [3, 3]
    try:
        proxy.Start()
        wait_for(lambda: "Live processing (idle)" in proxy.status(), TIMEOUT, f"idle ({proxy.status()})")
        status = proxy.status()
        assert "cannot set the scan of [3, 3] positions" in status and "does not match" in status, status
        assert proxy.state() == DevState.ON
    finally:
        proxy.nav_shape = list(NAV)
    test_active_acquisitions_are_exact(variant)
