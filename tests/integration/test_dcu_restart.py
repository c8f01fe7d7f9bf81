"""The DCU process killed (while idle, and in the middle of a series) and started again on the same
ports: the device notices, needs Initialize like after any DCU restart, and the acquisition right
after Initialize is exact."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass

import numpy as np
import pytest
import requests
import tango
from tango import DevState
from tango.test_context import DeviceTestContext

from sim.data import ScanDataGenerator
from sim.encode import dtype_for_bit_depth
from tango_dectris_live.device.dectris_live import DectrisLive
from tango_dectris_live.testing import EventRecorder, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

NAV = (6, 8)
TIMEOUT = 90.0


@dataclass
class SimulatorProcess:
    """``simplon-sim`` as its own process, as a DCU is: it can be killed."""

    process: subprocess.Popen
    port: int
    stream_port: int
    stream2_port: int

    @classmethod
    def start(cls, port: int = 0, stream_port: int = 0, stream2_port: int = 0) -> SimulatorProcess:
        process = subprocess.Popen(
            [sys.executable, "-m", "sim.cli", "--model", "ARINA", "--port", str(port), "--stream-port",
             str(stream_port), "--stream2-port", str(stream2_port)],
            stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        line = process.stdout.readline()
        found = re.search(r"rest=http://[\d.]+:(\d+) stream=tcp://[\d.]+:(\d+) stream2=tcp://[\d.]+:(\d+)", line)
        if found is None:
            process.kill()
            raise AssertionError(f"the simulator did not start: {line!r}")
        return cls(process, *(int(n) for n in found.groups()))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def sim_config(self, **settings) -> None:
        requests.put(f"{self.url}/sim/api/config", json=settings, timeout=30).raise_for_status()

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)
        self.process.stdout.close()

    def truth(self, nav_shape) -> ScanDataGenerator:
        def value(key):
            return requests.get(f"{self.url}/detector/api/1.8.0/config/{key}", timeout=10).json()["value"]
        settings = requests.get(f"{self.url}/sim/api/config", timeout=10).json()
        return ScanDataGenerator(value("x_pixels_in_detector"), value("y_pixels_in_detector"),
                                 dtype_for_bit_depth(value("bit_depth_image")), nav_shape=nav_shape,
                                 seed=settings["seed"], dose=settings["dose"], pool_size=settings["pool_size"])


@pytest.fixture
def dcu():
    holder = {"sim": SimulatorProcess.start()}
    yield holder
    sim = holder["sim"]
    if sim.process.poll() is None:
        sim.process.terminate()
        sim.process.wait(30)
        sim.process.stdout.close()


def initialize(proxy: tango.DeviceProxy) -> None:
    wait_for(lambda: proxy.state() == DevState.OFF, 60, f"State OFF: the DCU needs Initialize ({proxy.status()})")
    proxy.Initialize()
    wait_for(lambda: proxy.state() == DevState.ON, 60, f"State ON after Initialize ({proxy.status()})")
    proxy.trigger_mode = list(proxy.get_attribute_config("trigger_mode").enum_labels).index("ints")
    proxy.frame_time = 0.001
    proxy.count_time = 0.0009


def exact_acquisition(proxy: tango.DeviceProxy, sim: SimulatorProcess) -> None:
    sim.sim_config(pacing="max", nav_shape=list(NAV))
    proxy.nav_shape = list(NAV)
    with EventRecorder(proxy, data_ready=("sum_image",)) as log:
        proxy.Start()
        wait_for(lambda: log.data_ready("sum_image"), TIMEOUT, f"the final result ({proxy.status()})")
    count = int(np.prod(NAV))
    assert proxy.frames_processed == count and proxy.frames_missing == 0, proxy.acquisition_status
    truth = sim.truth(NAV)
    np.testing.assert_array_equal(proxy.sum_image, truth.sum_frames(range(count)))
    np.testing.assert_array_equal(proxy.sumsig_image, truth.sum_per_frame(range(count)).reshape(NAV))


def restart(holder: dict, proxy: tango.DeviceProxy) -> SimulatorProcess:
    old = holder["sim"]
    old.kill()
    wait_for(lambda: proxy.state() == DevState.UNKNOWN, 30, f"State UNKNOWN once the DCU is gone ({proxy.status()})")
    holder["sim"] = SimulatorProcess.start(old.port, old.stream_port, old.stream2_port)
    return holder["sim"]


@pytest.mark.parametrize("connection", ["per_series", "always"])
@pytest.mark.parametrize("when", ["idle", "mid_series"])
def test_exact_acquisition_right_after_the_dcu_restarts(dcu, when, connection):
    """With ``always`` the idle receiver keeps a connection that the DCU's death closed: it must
    notice before the next arm, or the header sent at arm is lost with it."""
    sim = dcu["sim"]
    properties = {"DcuHost": "127.0.0.1", "DcuPort": sim.port, "StreamPort": sim.stream_port,
                  "Stream2Port": sim.stream2_port, "StatePollPeriod": 0.1, "StreamConnection": connection}
    with DeviceTestContext(DectrisLive, properties=properties, process=True, timeout=60) as proxy:
        initialize(proxy)
        proxy.analyses = ["sum", "sumsig"]
        exact_acquisition(proxy, sim)
        if when == "mid_series":
            sim.sim_config(pacing="frame_time", nav_shape=[64, 64])
            proxy.nav_shape = [64, 64]
            first_series = proxy.series_id
            proxy.Start()
            # frames of the new series (frames_received still counts the last one's until it starts)
            wait_for(lambda: proxy.series_id != first_series and proxy.frames_received > 0, 30,
                     f"frames arriving ({proxy.status()})")
        sim = restart(dcu, proxy)
        initialize(proxy)
        wait_for(lambda: "Live processing (idle)" in proxy.status(), 60,
                 f"the interrupted acquisition ended ({proxy.status()})")
        exact_acquisition(proxy, sim)
