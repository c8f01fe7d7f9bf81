"""Live processing through the DectrisLive device, end to end: simulator → stream → receiver →
LiberTEM workers → Tango IMAGE attributes → a DeviceProxy subscriber, compared with NumPy results
computed offline from the simulator's ground truth.

One simulator (ARINA: 192 × 192 frames, small scans) and one device server for the module, so the
startup cost (device server, worker processes) is paid once; each test sets the simulator and
device state it needs.
"""
from __future__ import annotations

import os
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import requests
import tango
from tango import AttrQuality, DevState
from tango.test_context import DeviceTestContext

from sim.server import SimulatorServer
from tango_dectris_live.device.dectris_live import DectrisLive
from tango_dectris_live.device.embedded_db import EmbeddedTangoDatabase
from tango_dectris_live.testing import ChangeEvent, EventRecorder, wait_for

from .live_reference import (RESULTS_OF_ANALYSIS, SCAN_SHAPED_RESULTS, VirtualDetectors, reference_results,
                             simulator_ground_truth)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# Off the pixel grid, so that no pixel lies exactly on a disk or ring edge (where "<" and "<="
# would differ); the simulator's disk is centred near (96, 96) with radius 24.
DETECTORS = VirtualDetectors(beam_center_xy=(95.3, 97.6), bf_radius=14.2, adf_inner_radius=36.4,
                             adf_outer_radius=55.7)
ALL_RESULTS = tuple(name for names in RESULTS_OF_ANALYSIS.values() for name in names)
ACQUISITION_TIMEOUT = 90.0
FAST_FRAME_TIME = 0.001  # the ARINA's default; with pacing "max" the simulator ignores it anyway


# ---- the simulator and the device ----------------------------------------------------------------

def configure_simulator(sim: SimulatorServer, **settings) -> None:
    """Simulator-only settings (pacing, nav_shape, faults) through its REST API."""
    reply = requests.put(f"{sim.rest_url}/sim/api/config", json=settings, timeout=30)
    assert reply.status_code == 200, reply.text


def dcu(sim: SimulatorServer, module: str, task: str, key: str, value=None):
    """A SIMPLON request from "someone else" (the vendor GUI, a script): straight to the DCU."""
    reply = requests.put(f"{sim.rest_url}/{module}/api/1.8.0/{task}/{key}",
                         json=None if value is None else {"value": value}, timeout=60)
    assert reply.status_code == 200, reply.text
    return reply.json() if reply.content else None


def arm_and_trigger_elsewhere(sim: SimulatorServer, nimages: int) -> int:
    """One ints series armed and triggered behind the device's back; returns its series id once
    the DCU has sent every frame (the trigger blocks until then)."""
    dcu(sim, "detector", "config", "ntrigger", 1)
    dcu(sim, "detector", "config", "nimages", nimages)
    series = dcu(sim, "detector", "command", "arm")["sequence id"]
    dcu(sim, "detector", "command", "trigger")
    return int(series)


def live_mode(proxy: tango.DeviceProxy) -> str:
    """idle / active / passive, as the device's Status reports it."""
    for mode in ("idle", "active", "passive"):
        if f"Live processing ({mode})" in proxy.status():
            return mode
    return "unknown"


# ALARM: Tango's own rule for a device whose attributes have a WARNING quality (results of a
# series with missing frames); the detector and the live processing are idle all the same.
IDLE_STATES = (DevState.ON, DevState.ALARM)


def is_idle(proxy: tango.DeviceProxy) -> bool:
    return proxy.state() in IDLE_STATES and live_mode(proxy) == "idle"


def wait_idle(proxy: tango.DeviceProxy) -> None:
    wait_for(lambda: is_idle(proxy), ACQUISITION_TIMEOUT, f"the device idle (Status: {proxy.status()})")


def wait_listening(proxy: tango.DeviceProxy) -> None:
    wait_for(lambda: proxy.acquisition_status.startswith("listening"), ACQUISITION_TIMEOUT,
             "the device listening for a series")


def set_frame_time(proxy: tango.DeviceProxy, seconds: float) -> None:
    proxy.frame_time = seconds  # the DCU shortens count_time to fit
    proxy.count_time = seconds * 0.9


def final_results(log: EventRecorder, names: tuple[str, ...], series_done: int = 1) -> dict[str, ChangeEvent]:
    """The final change event of each result, once ``series_done`` data-ready events arrived for
    each (the device pushes the final values first, then the data-ready events)."""
    wait_for(lambda: all(len(log.data_ready(name)) >= series_done for name in names), ACQUISITION_TIMEOUT,
             f"data-ready events of {', '.join(names)} (errors: {log.errors})")
    return {name: log.changes(name)[-1] for name in names}


def fresh(log: EventRecorder, names: tuple[str, ...]) -> EventRecorder:
    """Wait for the initial event a subscription delivers, then forget it: only what follows counts."""
    wait_for(lambda: all(log.changes(name) for name in names), 30, "the subscriptions' initial events")
    log.clear()
    return log


@pytest.fixture(scope="module")
def arina():
    with SimulatorServer(host="127.0.0.1", model="ARINA") as sim:
        yield sim


@pytest.fixture(scope="module")
def live_device(arina):
    properties = {"DcuHost": "127.0.0.1", "DcuPort": arina.port, "StreamPort": arina.stream_port,
                  "Stream2Port": arina.stream2_port, "StatePollPeriod": 0.1}
    with DeviceTestContext(DectrisLive, properties=properties, process=True, timeout=60) as proxy:
        proxy.Initialize()
        wait_for(lambda: proxy.state() == DevState.ON, 60, f"State ON after Initialize ({proxy.status()})")
        proxy.trigger_mode = list(proxy.get_attribute_config("trigger_mode").enum_labels).index("ints")
        proxy.beam_center = list(DETECTORS.beam_center_xy)
        proxy.bf_radius = DETECTORS.bf_radius
        proxy.adf_outer_radius = DETECTORS.adf_outer_radius
        proxy.adf_inner_radius = DETECTORS.adf_inner_radius
        yield proxy


def reset(proxy: tango.DeviceProxy, sim: SimulatorServer) -> None:
    """The state every acquisition of this module starts from: fast simulator, no faults, whole
    stacks, every built-in analysis."""
    configure_simulator(sim, pacing="max", faults=[], nav_shape=None)
    set_frame_time(proxy, FAST_FRAME_TIME)
    proxy.frame_stack_size = 0
    proxy.analyses = list(RESULTS_OF_ANALYSIS)


def publish_complete_results(proxy: tango.DeviceProxy, sim: SimulatorServer) -> None:
    """A complete passive series of every analysis, so that no result keeps the WARNING quality
    of an earlier series (which turns State to ALARM, where Start is refused: see
    test_start_is_accepted_after_a_series_with_missing_frames). Listen works in any State."""
    reset(proxy, sim)
    configure_simulator(sim, nav_shape=[2, 2])
    proxy.nav_shape = [2, 2]
    with EventRecorder(proxy, data_ready=ALL_RESULTS) as log:
        proxy.Listen()
        wait_listening(proxy)
        arm_and_trigger_elsewhere(sim, 4)
        wait_for(lambda: all(log.data_ready(name) for name in ALL_RESULTS), ACQUISITION_TIMEOUT,
                 "a complete series published")
        proxy.Stop()
        wait_idle(proxy)


@pytest.fixture
def device(live_device, arina):
    reset(live_device, arina)
    yield live_device
    if not is_idle(live_device):
        live_device.Abort()  # leave the shared device idle for the next test
        wait_idle(live_device)
    if live_device.state() == DevState.ALARM:
        publish_complete_results(live_device, arina)


# ---- 1. every built-in analysis, active and passive ----------------------------------------------

@dataclass(frozen=True)
class FinishedAcquisition:
    nav_shape: tuple[int, int]
    final: dict[str, ChangeEvent]  # as the subscriber received it
    read_back: dict[str, tuple[np.ndarray, AttrQuality]]  # read after the acquisition
    data_ready: dict[str, list[int]]
    reference: dict[str, np.ndarray]
    errors: list[str]


def acquire_every_analysis(proxy: tango.DeviceProxy, sim: SimulatorServer, mode: str) -> FinishedAcquisition:
    # Non-square scans, transposed between the modes: a swapped scan axis cannot go unnoticed.
    nav_shape = (6, 10) if mode == "active" else (10, 6)
    reset(proxy, sim)
    configure_simulator(sim, nav_shape=list(nav_shape))
    proxy.nav_shape = list(nav_shape)
    with EventRecorder(proxy, changes=ALL_RESULTS, data_ready=ALL_RESULTS) as log:
        fresh(log, ALL_RESULTS)
        if mode == "active":
            proxy.Start()
        else:
            proxy.Listen()
            wait_listening(proxy)
            arm_and_trigger_elsewhere(sim, int(np.prod(nav_shape)))
        final = final_results(log, ALL_RESULTS)
        if mode == "passive":
            proxy.Stop()
        wait_idle(proxy)
        read_back = {}
        for name in ALL_RESULTS:
            attribute = proxy.read_attribute(name)
            read_back[name] = (attribute.value, attribute.quality)
        data_ready = {name: log.data_ready(name) for name in ALL_RESULTS}
        errors = log.errors
    reference = reference_results(simulator_ground_truth(sim, nav_shape), DETECTORS)
    return FinishedAcquisition(nav_shape, final, read_back, data_ready, reference, errors)


@pytest.fixture(scope="module")
def finished_acquisition(live_device, arina):
    """One acquisition with every built-in analysis per mode, made by the first test that asks."""
    done: dict[str, FinishedAcquisition] = {}

    def of_mode(mode: str) -> FinishedAcquisition:
        if mode not in done:
            done[mode] = acquire_every_analysis(live_device, arina, mode)
        return done[mode]

    return of_mode


def assert_equals_reference(name: str, published: np.ndarray, expected: np.ndarray) -> None:
    published = np.asarray(published)
    if name in ("sum_image", "sumsig_image", "last_frame"):
        expected = expected.reshape(published.shape) if expected.ndim == 1 else expected
        assert published.shape == expected.shape, f"{name}: shape {published.shape} != {expected.shape}"
        assert np.array_equal(published, expected, equal_nan=True), f"{name} differs from the ground truth"
    else:
        assert published.shape == expected.shape, f"{name}: shape {published.shape} != {expected.shape}"
        # LiberTEM works in float32; centre-of-mass shifts are differences of pixel positions
        atol = 2e-3 if name.startswith("com_") else 0.0
        np.testing.assert_allclose(published, expected, rtol=2e-5, atol=atol, equal_nan=True, err_msg=name)


@pytest.mark.parametrize("analysis", list(RESULTS_OF_ANALYSIS))
@pytest.mark.parametrize("mode", ["active", "passive"])
def test_final_result_equals_offline_computation(finished_acquisition, mode, analysis):
    acquisition = finished_acquisition(mode)
    assert acquisition.errors == []
    frames = int(np.prod(acquisition.nav_shape))
    for name in RESULTS_OF_ANALYSIS[analysis]:
        final = acquisition.final[name]
        assert final.quality == AttrQuality.ATTR_VALID, f"{name}: final quality {final.quality}"
        assert_equals_reference(name, final.value, acquisition.reference[name])
        value, quality = acquisition.read_back[name]
        assert quality == AttrQuality.ATTR_VALID
        assert np.array_equal(value, final.value, equal_nan=True), f"{name}: read back != final event"
        assert acquisition.data_ready[name] == [frames], f"{name}: data-ready events {acquisition.data_ready[name]}"


def test_results_show_the_object_not_noise(finished_acquisition):
    """Guards the comparison itself: the reference images must vary over the scan (a constant
    image would let a transposed or shuffled result pass)."""
    reference = finished_acquisition("active").reference
    for name in SCAN_SHAPED_RESULTS:
        assert np.ptp(reference[name]) > 0, name


# ---- 2. a facility analysis registered through the entry point --------------------------------------

FACILITY_MODULE = '''
    """A facility's analysis: the brightest pixel of every frame."""
    import numpy as np
    from libertem.udf.base import UDF


    class FramePeakUDF(UDF):
        def get_result_buffers(self):
            return {"peak": self.buffer(kind="nav", dtype="float64")}

        def process_frame(self, frame):
            self.results.peak[:] = np.max(frame)


    def make_udf(parameters):
        return FramePeakUDF()
'''


def install_facility_analysis(site: Path) -> None:
    """``maxframe = facility_udfs:make_udf`` in group tango_dectris_live.analyses, as an installed
    distribution (a module plus its dist-info) in ``site``."""
    (site / "facility_udfs.py").write_text(textwrap.dedent(FACILITY_MODULE))
    dist_info = site / "facility_udfs-1.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: facility-udfs\nVersion: 1.0\n")
    (dist_info / "entry_points.txt").write_text("[tango_dectris_live.analyses]\nmaxframe = facility_udfs:make_udf\n")


@pytest.mark.parametrize("simulator", ["ARINA"], indirect=True)
def test_facility_analysis_from_an_entry_point(simulator, tmp_path, monkeypatch):
    install_facility_analysis(tmp_path)
    # the server and its worker processes inherit the environment
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])))
    device_name = "test/dectris/live"
    nav_shape = (4, 6)
    with EmbeddedTangoDatabase() as db:
        db.register_device("live", device_name, {
            "DcuHost": "127.0.0.1", "DcuPort": simulator.port, "StreamPort": simulator.stream_port,
            "Stream2Port": simulator.stream2_port, "StatePollPeriod": 0.1})
        db.start_server("live", device_name)
        proxy = tango.DeviceProxy(f"tango://{db.tango_host}/{device_name}")
        assert "maxframe" in proxy.available_analyses
        assert "maxframe_peak" in {name.lower() for name in proxy.get_attribute_list()}
        assert "maxframe: maxframe_peak" in proxy.result_attributes
        proxy.Initialize()
        wait_for(lambda: proxy.state() == DevState.ON, 60, f"State ON ({proxy.status()})")
        proxy.mask_to_zero = True  # else the masked pixels (at the maximum count) are every frame's peak
        proxy.trigger_mode = list(proxy.get_attribute_config("trigger_mode").enum_labels).index("ints")
        configure_simulator(simulator, pacing="max", nav_shape=list(nav_shape))
        proxy.nav_shape = list(nav_shape)
        proxy.analyses = ["maxframe", "sumsig"]
        with EventRecorder(proxy, changes=("maxframe_peak",), data_ready=("maxframe_peak",)) as log:
            fresh(log, ("maxframe_peak",))
            proxy.Start()
            final = final_results(log, ("maxframe_peak",))["maxframe_peak"]
        wait_idle(proxy)
        truth = simulator_ground_truth(simulator, nav_shape)
        peaks = np.array([truth.frame(k).max() for k in range(truth.scan_size)], dtype=np.float64)
        assert np.ptp(peaks) > 0  # a constant would not show a misplaced frame
        assert final.quality == AttrQuality.ATTR_VALID
        assert np.array_equal(final.value, peaks.reshape(nav_shape))
        assert np.array_equal(proxy.maxframe_peak, peaks.reshape(nav_shape))


# ---- 3. missing frames ----------------------------------------------------------------------------

def test_missing_frames_are_nan_at_their_scan_positions(device, arina):
    nav_shape, dropped = (6, 10), [5, 17]
    configure_simulator(arina, nav_shape=list(nav_shape), faults=[{"kind": "drop", "frames": dropped}])
    device.nav_shape = list(nav_shape)
    with EventRecorder(device, changes=ALL_RESULTS, data_ready=ALL_RESULTS) as log:
        fresh(log, ALL_RESULTS)
        device.Start()
        final = final_results(log, ALL_RESULTS)
    wait_idle(device)
    assert device.frames_missing == 2
    assert device.frames_expected == 60
    assert device.frames_processed == 58
    reference = reference_results(simulator_ground_truth(arina, nav_shape), DETECTORS, missing=dropped)
    expected_nan = np.zeros(nav_shape, dtype=bool)
    expected_nan[np.unravel_index(dropped, nav_shape)] = True
    for name in ALL_RESULTS:
        assert final[name].quality == AttrQuality.ATTR_WARNING, f"{name}: {final[name].quality}"
        if name in SCAN_SHAPED_RESULTS:
            assert np.array_equal(np.isnan(final[name].value), expected_nan), name
        assert_equals_reference(name, final[name].value, reference[name])
    assert device.read_attribute("sumsig_image").quality == AttrQuality.ATTR_WARNING


def test_start_is_accepted_after_a_series_with_missing_frames(device, arina):
    nav_shape = (2, 3)
    configure_simulator(arina, nav_shape=list(nav_shape), faults=[{"kind": "drop", "frames": [1]}])
    device.nav_shape = list(nav_shape)
    device.analyses = ["sumsig"]
    with EventRecorder(device, data_ready=("sumsig_image",)) as log:
        device.Start()
        wait_for(lambda: log.data_ready("sumsig_image"), ACQUISITION_TIMEOUT, "the series with a missing frame")
        wait_idle(device)
        assert device.frames_missing == 1
        # what every GUI does: read the result (its quality WARNING says frames are missing), then State
        assert device.read_attribute("sumsig_image").quality == AttrQuality.ATTR_WARNING
        state_seen_by_a_gui = device.state()
        device.Start()  # the detector and the live processing are idle: a new scan must be accepted
        wait_for(lambda: len(log.data_ready("sumsig_image")) == 2, ACQUISITION_TIMEOUT, "the next series")
    wait_idle(device)
    assert device.frames_missing == 0
    assert state_seen_by_a_gui == DevState.ON and device.state() == DevState.ON


# ---- 4. Stop and Abort mid-series ------------------------------------------------------------------

@pytest.mark.parametrize("command", ["Stop", "Abort"])
def test_stop_or_abort_mid_series_then_a_full_acquisition(device, arina, command):
    nav_shape = (10, 20)  # 200 frames at 20 ms: 4 s, interrupted after the first ones
    configure_simulator(arina, pacing="frame_time", nav_shape=list(nav_shape))
    set_frame_time(device, 0.02)
    device.frame_stack_size = 8  # processed stack by stack, not all at the end
    device.nav_shape = list(nav_shape)
    device.analyses = ["sumsig"]
    with EventRecorder(device, changes=("sumsig_image",), data_ready=("sumsig_image",)) as log:
        fresh(log, ("sumsig_image",))
        previous = device.series_id
        device.Start()
        # the counters show the previous series until the new one has started
        series = wait_for(lambda: (n := device.series_id) != previous and n, ACQUISITION_TIMEOUT, "a new series")
        received = wait_for(lambda: (n := device.frames_received) >= 20 and n, ACQUISITION_TIMEOUT,
                            "20 frames received")
        getattr(device, command)()
        wait_idle(device)
        assert device.series_id == series
        assert device.frames_expected == 200
        processed = device.frames_processed
        assert processed < 200
        if command == "Stop":
            assert processed >= received, "a graceful Stop processes what arrived"
            final = final_results(log, ("sumsig_image",))["sumsig_image"].value
            truth = simulator_ground_truth(arina, nav_shape)
            done = ~np.isnan(final)
            assert done.sum() == processed
            expected = truth.sum_per_frame(range(truth.scan_size)).reshape(nav_shape).astype(np.float64)
            assert np.array_equal(final[done], expected[done])
    assert device.state() == DevState.ON

    reset(device, arina)
    nav_shape = (6, 10)
    configure_simulator(arina, nav_shape=list(nav_shape))
    device.nav_shape = list(nav_shape)
    with EventRecorder(device, changes=("sum_image", "sumsig_image"), data_ready=("sumsig_image",)) as log:
        fresh(log, ("sum_image", "sumsig_image"))
        device.Start()
        final_results(log, ("sumsig_image",))
        wait_idle(device)
        final = {name: log.changes(name)[-1] for name in ("sum_image", "sumsig_image")}
    assert device.frames_processed == 60 and device.frames_missing == 0
    reference = reference_results(simulator_ground_truth(arina, nav_shape), DETECTORS)
    for name, event in final.items():
        assert event.quality == AttrQuality.ATTR_VALID
        assert_equals_reference(name, event.value, reference[name])


# ---- 5. passive mode, series after series -----------------------------------------------------------

def test_ten_passive_acquisitions_in_a_row_are_all_processed(device, arina):
    nav_shape = (4, 4)
    configure_simulator(arina, nav_shape=list(nav_shape))
    device.nav_shape = list(nav_shape)
    device.analyses = ["sumsig"]
    with EventRecorder(device, changes=("series_id", "sumsig_image"), data_ready=("sumsig_image",)) as log:
        fresh(log, ("series_id", "sumsig_image"))
        device.Listen()
        wait_listening(device)
        # one after the other as fast as the DCU allows, without waiting for the device
        armed = [arm_and_trigger_elsewhere(arina, 16) for _ in range(10)]
        final_results(log, ("sumsig_image",), series_done=10)
        device.Stop()
        wait_idle(device)
        assert log.data_ready("sumsig_image") == [16] * 10
        assert set(armed) <= set(log.values("series_id"))
        last = log.changes("sumsig_image")[-1]
    assert device.series_id == armed[-1]
    reference = reference_results(simulator_ground_truth(arina, nav_shape), DETECTORS)
    assert last.quality == AttrQuality.ATTR_VALID
    assert_equals_reference("sumsig_image", last.value, reference["sumsig_image"])


# ---- 6. events while a series runs -------------------------------------------------------------------

def test_subscriber_sees_progress_grow_and_the_complete_final_result(device, arina):
    nav_shape = (10, 10)
    configure_simulator(arina, pacing="frame_time", nav_shape=list(nav_shape))
    set_frame_time(device, 0.01)
    device.frame_stack_size = 8
    device.nav_shape = list(nav_shape)
    device.analyses = ["sumsig"]
    progress_names = ("frames_processed", "progress")
    with EventRecorder(device, changes=(*progress_names, "sumsig_image"), data_ready=("sumsig_image",)) as log:
        fresh(log, (*progress_names, "sumsig_image"))
        device.Start()
        final = final_results(log, ("sumsig_image",))["sumsig_image"]
        wait_idle(device)
        wait_for(lambda: log.values("frames_processed")[-1:] == [100], 30, "frames_processed 100 pushed")
        processed = log.values("frames_processed")
        progress = log.values("progress")
        results = log.changes("sumsig_image")
    assert processed == sorted(processed), f"frames_processed went back: {processed}"
    assert progress == sorted(progress) and progress[-1] == pytest.approx(100.0), progress
    assert any(0 < n < 100 for n in processed), f"no intermediate progress: {processed}"
    assert all(event.quality == AttrQuality.ATTR_CHANGING for event in results[:-1])
    assert final is results[-1] and final.quality == AttrQuality.ATTR_VALID
    assert device.stream_transport == "zmtp"  # the StreamTransport property's default, auto
    reference = reference_results(simulator_ground_truth(arina, nav_shape), DETECTORS)
    assert_equals_reference("sumsig_image", final.value, reference["sumsig_image"])


def test_unknown_analysis_names_are_refused_with_the_available_ones(device):
    before = list(device.analyses)
    with pytest.raises(tango.DevFailed) as failure:
        device.analyses = ["sum", "virtual_dpc"]
    message = failure.value.args[0].desc
    assert "virtual_dpc" in message
    for name in device.available_analyses:
        assert name in message, f"{name} not listed in: {message}"
    assert list(device.analyses) == before
