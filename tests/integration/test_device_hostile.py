"""A hostile client: absurd settings are refused with the limit named (or, where legal, work), and
after every case a normal acquisition through the device is exact. Also: a series whose header
never comes ends within the bound the user set, with the reason, and the next one works."""
from __future__ import annotations

import json

import numpy as np
import pytest
import requests
import tango
from tango import DevState
from tango.test_context import DeviceTestContext

from sim.server import SimulatorServer
from tango_dectris_live.device.dectris_live import DectrisLive
from tango_dectris_live.testing import EventRecorder, wait_for

from .live_reference import simulator_ground_truth
from .test_device_live import configure_simulator, set_frame_time, wait_idle

pytestmark = [pytest.mark.integration, pytest.mark.slow]

NAV = (4, 6)
TIMEOUT = 90.0


@pytest.fixture(scope="module")
def arina():
    with SimulatorServer(host="127.0.0.1", model="ARINA") as sim:
        yield sim


@pytest.fixture(scope="module")
def proxy(arina):
    properties = {"DcuHost": "127.0.0.1", "DcuPort": arina.port, "StreamPort": arina.stream_port,
                  "Stream2Port": arina.stream2_port, "StatePollPeriod": 0.1}
    with DeviceTestContext(DectrisLive, properties=properties, process=True, timeout=60) as device:
        device.Initialize()
        wait_for(lambda: device.state() == DevState.ON, 60, f"State ON after Initialize ({device.status()})")
        device.trigger_mode = list(device.get_attribute_config("trigger_mode").enum_labels).index("ints")
        set_frame_time(device, 0.001)
        device.analyses = ["sum", "sumsig"]
        yield device


def exact_acquisition(proxy: tango.DeviceProxy, sim: SimulatorServer) -> None:
    """A normal active acquisition: every frame processed and sum/sumsig equal to the ground truth."""
    configure_simulator(sim, pacing="max", faults=[], nav_shape=list(NAV))
    proxy.nav_shape = list(NAV)
    with EventRecorder(proxy, data_ready=("sum_image",)) as log:
        wait_for(lambda: proxy.state() == DevState.ON, TIMEOUT, f"State ON before Start ({proxy.status()})")
        proxy.Start()
        wait_for(lambda: log.data_ready("sum_image"), TIMEOUT, f"the final result ({proxy.status()})")
    wait_idle(proxy)
    truth = simulator_ground_truth(sim, NAV)
    count = int(np.prod(NAV))
    assert proxy.frames_processed == count and proxy.frames_missing == 0, proxy.acquisition_status
    np.testing.assert_array_equal(proxy.sum_image, truth.sum_frames(range(count)))
    np.testing.assert_array_equal(proxy.sumsig_image, truth.sum_per_frame(range(count)).reshape(NAV))


def refused(proxy: tango.DeviceProxy, name: str, value, *words: str) -> None:
    with pytest.raises(tango.DevFailed) as failure:
        proxy.write_attribute(name, value)
    text = failure.value.args[0].desc
    for word in words:
        assert word in text, text


@pytest.mark.parametrize("name, value, words", [
    ("workers", 100000, ("workers = 100000 refused", "per core")),
    ("nav_shape", [100000, 100000], ("16384",)),
    ("nav_shape", [20000, 20000], ("16384",)),
    ("nav_shape", [10000, 10000, 10000], ("16384",)),
    ("beam_center", [1e308, 1e308], ("outside the frame",)),
    ("beam_center", [float("nan"), 3.0], ("NaN",)),  # refused by Tango itself
    ("bf_radius", 1e308, ("diagonal",)),
    ("adf_outer_radius", 1e308, ("diagonal",)),
    ("adf_inner_radius", 1e3, ("smaller than",)),
    ("num_slots", 1, ("num_slots = 1 refused",)),
    ("bytes_per_frame", 1, ("bytes_per_frame = 1 refused",)),
    ("frame_stack_size", 10**6, ("at most",)),
    ("series_timeout", -1.0, ("series_timeout",)),
])
def test_absurd_setting_is_refused_then_an_acquisition_is_exact(proxy, arina, name, value, words):
    before = proxy.read_attribute(name).value
    refused(proxy, name, value, *words)
    after = proxy.read_attribute(name).value
    assert np.array_equal(np.asarray(after), np.asarray(before)), f"{name} changed by a refused write"
    exact_acquisition(proxy, arina)


@pytest.mark.parametrize("name", ["frame_stack_size", "frames_per_partition"])
def test_legal_extreme_tuning_works_exactly(proxy, arina, name):
    proxy.write_attribute(name, 1)
    try:
        exact_acquisition(proxy, arina)
    finally:
        proxy.write_attribute(name, 0)
    exact_acquisition(proxy, arina)


def test_a_series_whose_header_never_comes_ends_within_the_bound(proxy, arina):
    """The DCU arms and sends its frames, but the series' header is lost: the series ends with
    'no data' after series_timeout naming what was received and rejected, State is ON again, and
    the next acquisition is exact."""
    configure_simulator(arina, pacing="max", nav_shape=list(NAV), faults=[{"kind": "no_header"}])
    proxy.nav_shape = list(NAV)
    proxy.series_timeout = 1.0
    try:
        proxy.Start()
        wait_for(lambda: "no data" in proxy.acquisition_status, 30, f"the no-data error ({proxy.status()})")
        wait_idle(proxy)
        status = proxy.status()
        assert "no header within 1 s" in status and "Last acquisition error" in status, status
        assert "rejected: no_header" in status, status  # the frames (and end) of the series
        assert proxy.messages_rejected >= int(np.prod(NAV))
        assert proxy.state() == DevState.ON
    finally:
        proxy.series_timeout = 0.0
    exact_acquisition(proxy, arina)


def test_while_idle_another_consumer_receives_whole_series(proxy, arina):
    """stream_connection per_series (the default): the idle device is not connected, so a second
    consumer of the DCU's stream (a notebook, another receiver) gets every message of a series
    armed elsewhere; the device's next acquisition is exact."""
    import zmq

    exact_acquisition(proxy, arina)  # the device has used the stream before
    assert proxy.stream_connection == "per_series"
    configure_simulator(arina, pacing="max", faults=[], nav_shape=list(NAV))
    count = int(np.prod(NAV))
    context = zmq.Context()
    consumer = context.socket(zmq.PULL)
    consumer.setsockopt(zmq.LINGER, 0)
    try:
        consumer.connect(f"tcp://127.0.0.1:{arina.stream_port}")
        base = f"{arina.rest_url}/detector/api/1.8.0"
        for key, value in (("ntrigger", 1), ("nimages", count)):
            requests.put(f"{base}/config/{key}", json={"value": value}, timeout=30).raise_for_status()
        requests.put(f"{base}/command/arm", timeout=30).raise_for_status()
        requests.put(f"{base}/command/trigger", timeout=60).raise_for_status()
        requests.put(f"{base}/command/disarm", timeout=30).raise_for_status()
        htypes = []
        while "dseries_end-1.0" not in htypes:
            assert consumer.poll(30_000), f"the consumer stopped receiving after {htypes.count('dimage-1.0')} images"
            htypes.append(json.loads(consumer.recv_multipart()[0])["htype"])
        assert htypes.count("dheader-1.0") == 1 and htypes.count("dimage-1.0") == count, htypes
    finally:
        consumer.close()
        context.term()
    exact_acquisition(proxy, arina)
