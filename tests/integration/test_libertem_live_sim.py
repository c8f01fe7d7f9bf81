"""The device against a DCU it did not write: LiberTEM-live's DECTRIS simulator
(``libertem-live-dectris-sim``, from the ``libertem-live[sim]`` package), replaying a zmqdump
recording of one series. It is a partial DCU: no detector/status/state (404), HTTP 500 "not
implemented" for most keys and for the key listings, config writes accepted only for the recorded
values, every arm answered with the recording's series id, and the global header's parts sent as
separate single-part ZeroMQ messages. Active and passive acquisitions must be exact, one after
the other."""
from __future__ import annotations

import dataclasses
import queue
import re
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import requests
from tango import DevState
from tango.test_context import DeviceTestContext

from sim.zmqdump import write_zmqdump
from tango_dectris_live.device.dectris_live import DectrisLive
from tango_dectris_live.testing import acquire, EventRecorder, wait_for
from tests.test_sim_stream_v1 import make_series, stream_under_test

pytestmark = [pytest.mark.integration, pytest.mark.slow]

libertem_sim = pytest.importorskip("libertem_live.detectors.dectris.sim",
                                   reason="LiberTEM-live's simulator needs libertem-live[sim] (flask)")

NAV = (4, 6)
TIMEOUT = 90.0


def _put(url: str, value=None) -> requests.Response:
    reply = requests.put(url, json=None if value is None else {"value": value}, timeout=30)
    assert reply.status_code == 200, reply.text
    return reply


@pytest.fixture(scope="module")
def recording(tmp_path_factory):
    """One exte series of our simulator's stream written as a zmqdump file, and its ground truth."""
    count = int(np.prod(NAV))
    series = dataclasses.replace(
        make_series(nimages=1, bit_depth=32, detector_config={
            "trigger_mode": "exte", "nimages": 1, "ntrigger": count, "bit_depth_image": 32,
            "compression": "bslz4"}),
        trigger_mode="exte", nimages=1, ntrigger=count)
    with stream_under_test(pacing="max", nav_shape=list(NAV)) as stream:
        messages = stream.run_series(series)
        truth = stream.sink.generator_for(series)
    path = tmp_path_factory.mktemp("libertem-sim") / "series.zmqdump"
    write_zmqdump(path, messages)
    return path, truth


def _read_ports(process: subprocess.Popen) -> tuple[int, int]:
    """The REST and ZeroMQ ports the simulator chose, from its log lines on stderr."""
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        for line in process.stderr:
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    api = zmq_port = None
    deadline = time.monotonic() + 60
    while api is None or zmq_port is None:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or process.poll() is not None:
            raise AssertionError("LiberTEM-live's simulator did not report its ports")
        try:
            line = lines.get(timeout=remaining)
        except queue.Empty:
            continue
        found = re.search(r"API server listening on \('[\d.]+', (\d+)\)", line)
        if found:
            api = int(found.group(1))
        found = re.search(r"listening on tcp://[\d.]+:(\d+)", line)
        if found:
            zmq_port = int(found.group(1))
    return api, zmq_port


@pytest.fixture(scope="module")
def libertem_dcu(recording):
    path, truth = recording
    # libertem-live-dectris-sim, as its module (the venv's bin/ need not be on PATH)
    process = subprocess.Popen([sys.executable, "-m", "libertem_live.detectors.dectris.sim", str(path),
                                "--port", "0", "--zmqport", "0"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        api, zmq_port = _read_ports(process)
        yield api, zmq_port, truth
    finally:
        process.terminate()
        try:
            process.wait(40)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def proxy(libertem_dcu):
    api, zmq_port, _truth = libertem_dcu
    properties = {"DcuHost": "127.0.0.1", "DcuPort": api, "StreamPort": zmq_port, "StatePollPeriod": 0.1}
    with DeviceTestContext(DectrisLive, properties=properties, process=True, timeout=60) as device:
        wait_for(lambda: device.state() == DevState.ON, 60, "State ON on a DCU without state")
        device.analyses = ["sum", "sumsig"]
        yield device


def assert_exact(proxy, truth) -> None:
    count = int(np.prod(NAV))
    assert proxy.frames_processed == count and proxy.frames_missing == 0, proxy.acquisition_status
    np.testing.assert_array_equal(proxy.sum_image, truth.sum_frames(range(count)))
    np.testing.assert_array_equal(proxy.sumsig_image.ravel(), truth.sum_per_frame(range(count)))


def test_status_names_what_the_dcu_does_not_provide(proxy):
    status = proxy.status()
    assert "reports no state" in status, status
    assert "does not provide" in status and "detector/config/keys" in status, status


def test_active_acquisitions_in_a_row_are_exact(proxy, libertem_dcu):
    truth = libertem_dcu[2]
    for _ in range(2):
        acquire(proxy, TIMEOUT)
        assert_exact(proxy, truth)
        assert proxy.messages_rejected == 0, list(proxy.rejected_by_reason)


def test_passive_acquisition_of_a_series_armed_elsewhere_is_exact(proxy, libertem_dcu):
    api, _zmq_port, truth = libertem_dcu
    with EventRecorder(proxy, data_ready=("sum_image",)) as log:
        proxy.Listen()
        wait_for(lambda: proxy.acquisition_status.startswith("listening"), TIMEOUT, "listening")
        _put(f"http://127.0.0.1:{api}/detector/api/1.8.0/command/arm")
        wait_for(lambda: log.data_ready("sum_image"), TIMEOUT, f"the final result ({proxy.status()})")
        proxy.Stop()
    wait_for(lambda: "Live processing (idle)" in proxy.status(), TIMEOUT, "idle")
    assert_exact(proxy, truth)
