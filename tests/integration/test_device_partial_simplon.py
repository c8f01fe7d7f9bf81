"""A DCU that implements only part of SIMPLON (no key listings, no filewriter/monitor/system, basic
stream settings): the device uses what is there, says what is missing, and processes live."""
from __future__ import annotations

import numpy as np
import pytest
import requests
import tango
from tango import DevState
from tango.test_context import DeviceTestContext

from sim.data import ScanDataGenerator
from sim.encode import dtype_for_bit_depth
from sim.server import SimulatorServer
from tango_dectris_live.device.dectris_live import DectrisLive
from tango_dectris_live.testing import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
def minimal_simulator():
    with SimulatorServer(host="127.0.0.1", model="ARINA", profile="minimal") as simulator:
        yield simulator


def test_simulator_minimal_profile_hides_what_such_a_dcu_lacks(minimal_simulator):
    base = minimal_simulator.rest_url
    requests.put(f"{base}/detector/api/1.8.0/command/initialize", timeout=30).raise_for_status()
    assert requests.get(f"{base}/detector/api/1.8.0/config/keys", timeout=10).status_code == 404
    assert requests.get(f"{base}/filewriter/api/1.8.0/config/mode", timeout=10).status_code == 404
    assert requests.get(f"{base}/stream/api/1.8.0/config/format", timeout=10).status_code == 404
    assert requests.get(f"{base}/stream/api/1.8.0/status/state", timeout=10).status_code == 200


def test_device_on_a_partial_dcu_reports_what_is_missing_and_processes_live(minimal_simulator):
    simulator = minimal_simulator
    properties = {"DcuHost": "127.0.0.1", "DcuPort": simulator.port, "StreamPort": simulator.stream_port,
                  "Stream2Port": simulator.stream2_port, "StatePollPeriod": 0.1, "Workers": 1}
    requests.put(f"{simulator.rest_url}/sim/api/config", json={"pacing": "max", "nav_shape": [4, 5]},
                 timeout=10).raise_for_status()
    with DeviceTestContext(DectrisLive, properties=properties, process=True, timeout=60) as proxy:
        proxy.Initialize()
        wait_for(lambda: proxy.state() == DevState.ON, 30, "State ON")
        status = proxy.status()
        assert "does not provide" in status
        assert "detector/config/keys" in status and "filewriter" in status
        attributes = set(proxy.get_attribute_list())
        assert {"count_time", "nimages", "trigger_mode", "stream_mode"} <= attributes
        assert "filewriter_mode" not in attributes
        proxy.analyses = ["sumsig"]
        proxy.nav_shape = [4, 5]
        proxy.Start()
        wait_for(lambda: proxy.frames_processed == 20 and proxy.state() == DevState.ON, 60,
                 "the scan processed")
        config = simulator.detector.get_config
        settings = simulator.sink.get_sim_config()
        truth = ScanDataGenerator(config("detector", "x_pixels_in_detector")["value"],
                                  config("detector", "y_pixels_in_detector")["value"],
                                  dtype_for_bit_depth(config("detector", "bit_depth_image")["value"]),
                                  nav_shape=(4, 5), seed=settings["seed"], dose=settings["dose"],
                                  pool_size=settings["pool_size"])
        np.testing.assert_array_equal(proxy.sumsig_image, truth.sum_per_frame(range(20)).reshape(4, 5))
        assert proxy.read_attribute("sumsig_image").quality == tango.AttrQuality.ATTR_VALID
