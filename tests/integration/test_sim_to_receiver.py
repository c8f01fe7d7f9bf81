"""The simulator's own stream into the compiled receiver: what a DCU sends is what we decode."""
from __future__ import annotations

import numpy as np
import pytest
import requests

from sim.data import ScanDataGenerator, default_nav_shape
from sim.encode import dtype_for_bit_depth
from tango_dectris_live.receiver import StreamReceiver, decode_frames_into
from tango_dectris_live.testing.stream_producer import collect_series

pytestmark = pytest.mark.integration


def _put(simulator, module, task, key, value=None):
    url = f"{simulator.rest_url}/{module}/api/1.8.0/{task}/{key}"
    response = requests.put(url, json=None if value is None else {"value": value}, timeout=30)
    assert response.status_code == 200, response.text
    return response.json() if response.content else None


def prepare_series(simulator, nimages: int, stream_format: str):
    """Initialize the simulated DCU for an ints series of ``nimages`` bslz4 frames on the stream
    ``stream_format``, sent as fast as possible; returns (ground truth, (height, width), dtype)."""
    _put(simulator, "detector", "command", "initialize")
    for key, value in (("trigger_mode", "ints"), ("nimages", nimages), ("ntrigger", 1),
                       ("compression", "bslz4")):
        _put(simulator, "detector", "config", key, value)
    _put(simulator, "stream", "config", "format", stream_format)
    _put(simulator, "stream", "config", "mode", "enabled")
    requests.put(f"{simulator.rest_url}/sim/api/config", json={"pacing": "max"}, timeout=10).raise_for_status()
    config = simulator.detector.get_config
    width = config("detector", "x_pixels_in_detector")["value"]
    height = config("detector", "y_pixels_in_detector")["value"]
    dtype = dtype_for_bit_depth(config("detector", "bit_depth_image")["value"])
    sim_settings = simulator.sink.get_sim_config()
    truth = ScanDataGenerator(width, height, dtype, nav_shape=default_nav_shape(nimages),
                              seed=sim_settings["seed"], dose=sim_settings["dose"],
                              pool_size=sim_settings["pool_size"])
    return truth, (height, width), dtype


@pytest.mark.parametrize("simulator", ["ARINA"], indirect=True)
@pytest.mark.parametrize("stream_format, version, port_attr", [("legacy", 1, "stream_port"),
                                                                ("cbor", 2, "stream2_port")])
def test_simulated_scan_round_trips_through_the_receiver(simulator, stream_format, version, port_attr):
    nimages = 36
    truth, (height, width), dtype = prepare_series(simulator, nimages, stream_format)

    endpoint = f"tcp://127.0.0.1:{getattr(simulator, port_attr)}"
    with StreamReceiver(endpoint, stream_version=version, frame_shape=(height, width), dtype=dtype,
                        frame_stack_size=8, num_slots=4) as receiver:
        receiver.listen()  # passive: take the series the next arm starts
        _put(simulator, "detector", "command", "arm")
        _put(simulator, "detector", "command", "trigger")
        summary, frames, _events = collect_series(receiver, decode_frames_into, np.dtype(dtype).name)

    assert summary.end_reason in ("complete", "end_message")
    assert summary.missing == 0 and sorted(frames) == list(range(nimages))
    for number, frame in frames.items():
        np.testing.assert_array_equal(frame, truth.frame(number), err_msg=f"frame {number}")
