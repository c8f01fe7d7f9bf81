"""Sardana with the DectrisLive controllers, started as a beamline runs it: the embedded Tango
database, the simulator as the DCU, the DectrisLive server, Sardana's Pool and MacroServer
(``Sardana`` server) with a dummy motor; macros run through the Door as spock runs them. Every
value Sardana records is compared with the simulator's ground truth."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import h5py
import numpy as np
import pytest
import requests
import tango

pytest.importorskip("sardana", reason="Sardana is not installed (pip install tango-dectris-live[sardana])")

from sim.server import SimulatorServer  # noqa: E402
from tango_dectris_live.device.embedded_db import EmbeddedTangoDatabase  # noqa: E402
from tango_dectris_live.testing import wait_for  # noqa: E402

from .live_reference import VirtualDetectors, reference_results, simulator_ground_truth  # noqa: E402
from tango_dectris_live.sardana import CONTROLLER_PATH, MACRO_PATH  # noqa: E402
from tango_dectris_live.testing.sardana_servers import DoorClient, SardanaServers, default_database  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DEVICE = "test/dectris/1"
# ARINA binned to 96 x 96 (its disk centred near (48, 48)); centre off the pixel grid so that no
# pixel lies exactly on an edge
DETECTORS = VirtualDetectors(beam_center_xy=(47.3, 48.6), bf_radius=7.2, adf_inner_radius=18.4,
                             adf_outer_radius=27.7)
# LiberTEM's centre of mass is computed in float32: its tolerance is the device tests' (test_device_live)
TOLERANCE = {"rtol": 2e-5, "atol": 2e-3}
COUNTERS = {"dlive_sumsig": "sumsig_image", "dlive_bf": "bf_image", "dlive_adf": "adf_image",
            "dlive_com_x": "com_x_image", "dlive_com_y": "com_y_image"}


class Beamline:
    """What the tests drive: the simulator, the device, the Door, where files go."""

    def __init__(self, sim: SimulatorServer, device: tango.DeviceProxy, door: DoorClient, sardana: SardanaServers,
                 base: Path) -> None:
        self.sim, self.device, self.door, self.sardana, self.base = sim, device, door, sardana, base

    def sim_config(self, **settings) -> None:
        requests.put(f"{self.sim.rest_url}/sim/api/config", json=settings, timeout=10).raise_for_status()

    def run(self, *words: object, timeout: float = 180.0):
        result = self.door.run(*words, timeout=timeout)
        assert result.state == tango.DevState.ON, (
            f"{' '.join(map(str, words))} ended {result.state}: {result.errors}\n{result.output}\n"
            f"Pool log:\n{self.sardana.log_text()[-3000:]}")
        return result


@pytest.fixture(scope="module")
def beamline(tmp_path_factory):
    base = tmp_path_factory.mktemp("sardana")
    with SimulatorServer(host="127.0.0.1", model="ARINA") as sim, EmbeddedTangoDatabase() as db, \
            default_database(db.tango_host):
        sardana = None
        door = None
        try:
            rest = f"{sim.rest_url}/detector/api/1.8.0"
            requests.put(f"{rest}/command/initialize", timeout=60).raise_for_status()
            for key, value in (("trigger_mode", "ints"), ("binning_mode", "2x2"), ("pixel_format", "uint16")):
                requests.put(f"{rest}/config/{key}", json={"value": value}, timeout=10).raise_for_status()
            requests.put(f"{sim.rest_url}/sim/api/config", json={"pacing": "max", "nav_shape": [1, 1]},
                         timeout=10).raise_for_status()
            db.register_device("test", DEVICE, {
                "DcuHost": "127.0.0.1", "DcuPort": sim.port, "StreamPort": sim.stream_port,
                "Stream2Port": sim.stream2_port, "StatePollPeriod": 0.1, "SavingBaseDirectory": str(base / "data")})
            (base / "data").mkdir()
            db.start_server("test", DEVICE)
            device = tango.DeviceProxy(DEVICE)
            wait_for(lambda: device.state() == tango.DevState.ON, 60, lambda: f"device ON ({device.status()})")
            device.beam_center = list(DETECTORS.beam_center_xy)
            device.adf_outer_radius = DETECTORS.adf_outer_radius
            device.adf_inner_radius = DETECTORS.adf_inner_radius
            device.bf_radius = DETECTORS.bf_radius
            sardana = SardanaServers(db.tango_host, base, CONTROLLER_PATH, MACRO_PATH).start()
            door = DoorClient(sardana.door)
            line = Beamline(sim, device, door, sardana, base)
            set_up_beamline(line, DEVICE)
            yield line
        finally:
            if door is not None:
                door.close()
            if sardana is not None:
                sardana.stop()


def set_up_beamline(line: Beamline, device: str) -> None:
    """A dummy motor, ``dectris_live_setup`` on ``device`` (group dlive_mg), the scan directory."""
    line.run("defctrl", "DummyMotorController", "motctrl", timeout=60)
    line.run("defelem", "dummy_mot", "motctrl", "1", timeout=60)
    setup = line.run("dectris_live_setup", device, timeout=60)
    assert "dlive_mg" in setup.output
    (line.base / "scans").mkdir()
    line.run("senv", "ScanDir", str(line.base / "scans"))


def _truth(line: Beamline, nav_shape: tuple[int, int]) -> dict[str, np.ndarray]:
    return reference_results(simulator_ground_truth(line.sim, nav_shape), DETECTORS)


def _scan_entry(path: Path) -> h5py.Group:
    f = h5py.File(path, "r")
    entries = sorted(name for name in f if name.startswith("entry"))
    return f[entries[-1]]


def check_ct(beamline: Beamline) -> None:
    """``ct 0.01`` with the dlive_mg group: the image and every counter equal the ground truth."""
    beamline.sim_config(nav_shape=[1, 1])
    beamline.run("senv", "ActiveMntGrp", "dlive_mg")
    result = beamline.run("ct", "0.01")
    truth = _truth(beamline, (1, 1))
    for channel, name in COUNTERS.items():
        value = tango.DeviceProxy(channel).Value
        np.testing.assert_allclose(value, truth[name].ravel()[0], err_msg=channel, **TOLERANCE)
        assert channel in result.output
    np.testing.assert_array_equal(tango.DeviceProxy("dlive_image").Value, truth["sum_image"])
    assert beamline.device.state() == tango.DevState.ON


def test_ct_gives_the_detector_image_and_the_virtual_counters(beamline):
    check_ct(beamline)


def test_ascan_records_every_point_with_image_references_into_the_saved_files(beamline):
    beamline.sim_config(nav_shape=[1, 1])
    beamline.run("senv", "ActiveMntGrp", "dlive_mg")
    beamline.run("senv", "ScanFile", "ascan.h5")
    beamline.run("set_meas_conf", "ValueRefEnabled", "True", "dlive_image")
    try:
        beamline.run("ascan", "dummy_mot", "0", "1", "9", "0.01")
    finally:
        beamline.run("set_meas_conf", "ValueRefEnabled", "False", "dlive_image")
    truth = _truth(beamline, (1, 1))
    entry = _scan_entry(beamline.base / "scans" / "ascan.h5")
    measurement = entry["measurement"]
    np.testing.assert_allclose(measurement["dummy_mot"][...], np.linspace(0, 1, 10))
    for channel, name in COUNTERS.items():
        np.testing.assert_allclose(measurement[channel][...], np.full(10, truth[name].ravel()[0]), err_msg=channel,
                                   **TOLERANCE)
    images = measurement["dlive_image"]
    assert images.is_virtual and images.shape == (10, 96, 96)  # Sardana's recorder: a VDS of the references
    sources = images.virtual_sources()
    files = sorted({Path(source.file_name) for source in sources})
    assert len(files) == 10  # one series file per point, written by the device
    for path in files:
        assert path.resolve().is_relative_to((beamline.base / "data").resolve())
        with h5py.File(path, "r") as saved:
            np.testing.assert_array_equal(saved["entry/results/sum/sum_image"][...], truth["sum_image"])
    for point in range(10):
        np.testing.assert_array_equal(images[point], truth["sum_image"])


def _hardware_group(beamline: Beamline, image: bool = False) -> None:
    """The virtual counters (and with ``image`` the detector image) in a group synchronised by the
    simulator's trigger input, one trigger per point."""
    group = "dlive_hw_image_mg" if image else "dlive_hw_mg"
    if "simtg" not in " ".join(tango.DeviceProxy(beamline.sardana.pool).ControllerList):
        beamline.run("defctrl", "SimplonSimTriggerGateController", "simtg", "SimulatorUrl", beamline.sim.rest_url)
        beamline.run("defelem", "simtg01", "simtg", "1")
    if group not in " ".join(tango.DeviceProxy(beamline.sardana.pool).MeasurementGroupList):
        beamline.run("defmeas", group, *COUNTERS, *(["dlive_image"] if image else []))
        beamline.run("set_meas_conf", "Synchronizer", "simtg01", "[]", group)
        beamline.run("set_meas_conf", "Synchronization", "Trigger", "[]", group)
    beamline.run("senv", "ActiveMntGrp", group)


def test_ascanct_hardware_triggered_values_arrive_while_the_scan_runs(beamline):
    points = 10
    beamline.sim_config(nav_shape=[1, points])
    _hardware_group(beamline)
    beamline.run("senv", "ScanFile", "ascanct.h5")
    buffers: list[int] = []
    seen = threading.Lock()
    channel = tango.DeviceProxy("dlive_sumsig")

    def on_buffer(event: tango.EventData) -> None:
        if not event.err and event.attr_value is not None and event.attr_value.value is not None:
            with seen:
                buffers.append(len(str(event.attr_value.value)))

    subscription = channel.subscribe_event("ValueBuffer", tango.EventType.CHANGE_EVENT, on_buffer)
    try:
        beamline.run("ascanct", "dummy_mot", "0", "1", str(points), "0.1")
    finally:
        channel.unsubscribe_event(subscription)
    truth = _truth(beamline, (1, points))
    entry = _scan_entry(beamline.base / "scans" / "ascanct.h5")
    measurement = entry["measurement"]
    for name, result in COUNTERS.items():
        recorded = measurement[name][...]
        np.testing.assert_allclose(recorded[:points], truth[result].ravel(), err_msg=name, **TOLERANCE)
    # the values came in several buffers while the scan ran, not in one at its end
    with seen:
        assert len([size for size in buffers if size > 2]) >= 2, buffers


def test_stop_in_the_middle_of_a_scan_ends_cleanly_and_the_next_scan_works(beamline):
    beamline.sim_config(nav_shape=[1, 1])
    beamline.run("senv", "ActiveMntGrp", "dlive_mg")
    beamline.run("senv", "ScanFile", "stopped.h5")
    before = int(beamline.device.acquisitions_ended)
    beamline.door.start("ascan", "dummy_mot", "0", "1", "40", "0.2")
    wait_for(lambda: int(beamline.device.acquisitions_ended) >= before + 2, 120, lambda: "two points acquired")
    beamline.door.proxy.StopMacro()
    assert beamline.door.wait_idle(120) in (tango.DevState.ON, tango.DevState.ALARM)
    wait_for(lambda: beamline.device.state() == tango.DevState.ON, 60,
             lambda: f"device ON after the stop ({beamline.device.status()})")
    points = _scan_entry(beamline.base / "scans" / "stopped.h5")["measurement"]["dlive_sumsig"].shape[0]
    assert 2 <= points < 41
    # the next scan runs to its end
    beamline.run("senv", "ScanFile", "after_stop.h5")
    beamline.run("ascan", "dummy_mot", "0", "1", "2", "0.01")
    measurement = _scan_entry(beamline.base / "scans" / "after_stop.h5")["measurement"]
    np.testing.assert_allclose(measurement["dlive_sumsig"][...], np.full(3, _truth(beamline, (1, 1))[
        "sumsig_image"].ravel()[0]), rtol=1e-9)


def test_ascanct_with_a_lost_frame_records_nan_for_its_point_and_the_rest_exactly(beamline):
    points = 8
    beamline.sim_config(nav_shape=[1, points], faults=[{"kind": "drop", "frames": [3]}])
    _hardware_group(beamline, image=True)
    beamline.run("senv", "ScanFile", "ascanct_lost.h5")
    beamline.run("ascanct", "dummy_mot", "0", "1", str(points), "0.05")
    generator = simulator_ground_truth(beamline.sim, (1, points))
    truth = reference_results(generator, DETECTORS, missing=[3])
    measurement = _scan_entry(beamline.base / "scans" / "ascanct_lost.h5")["measurement"]
    for name, result in COUNTERS.items():
        recorded = measurement[name][...][:points]
        assert np.isnan(recorded[3]), name
        np.testing.assert_allclose(recorded, truth[result].ravel(), err_msg=name, equal_nan=True, **TOLERANCE)
    assert "1 frame(s) missing" in tango.DeviceProxy("dlive_sumsig").status()
    # each point's image is its frame (from the series file the device saved); the lost one NaN
    images = measurement["dlive_image"][...][:points]
    assert np.isnan(images[3]).all()
    for point in (0, 1, 2, 4, 5, 6, 7):
        np.testing.assert_array_equal(images[point], generator.frame(point), err_msg=f"point {point}")


def test_stop_in_the_middle_of_a_continuous_scan_ends_cleanly_and_the_next_one_works(beamline):
    points = 40
    beamline.sim_config(nav_shape=[1, points])
    _hardware_group(beamline)
    beamline.run("senv", "ScanFile", "ascanct_stopped.h5")
    processed_before = int(beamline.device.acquisitions_ended)
    beamline.door.start("ascanct", "dummy_mot", "0", "1", str(points), "0.1")
    wait_for(lambda: int(beamline.device.frames_processed) >= 3 and beamline.device.state() == tango.DevState.RUNNING,
             120, lambda: "the continuous scan under way")
    beamline.door.proxy.StopMacro()
    assert beamline.door.wait_idle(120) in (tango.DevState.ON, tango.DevState.ALARM)
    wait_for(lambda: int(beamline.device.acquisitions_ended) > processed_before
             and beamline.device.state() == tango.DevState.ON, 60,
             lambda: f"device ON after the stop ({beamline.device.status()})")
    assert int(beamline.device.frames_processed) < points
    # the next continuous scan runs to its end, exactly
    beamline.sim_config(nav_shape=[1, 5])
    beamline.run("senv", "ScanFile", "ascanct_after_stop.h5")
    beamline.run("ascanct", "dummy_mot", "0", "1", "5", "0.02")
    measurement = _scan_entry(beamline.base / "scans" / "ascanct_after_stop.h5")["measurement"]
    np.testing.assert_allclose(measurement["dlive_sumsig"][...][:5], _truth(beamline, (1, 5))["sumsig_image"].ravel(),
                               **TOLERANCE)



def test_the_scan_plot_draws_the_virtual_detector_of_a_continuous_scan(beamline, tmp_path):
    """Sardana's own scan window (showscan online) on the Door, under Xvfb, while an ascanct of the
    virtual counters runs; its screenshot goes to docs/images when TANGO_DECTRIS_LIVE_SCREENSHOTS
    names that folder."""
    pytest.importorskip("PyQt5", reason="the gui extra (PyQt5) is missing")
    from PIL import Image

    from tango_dectris_live.testing.xvfb import XvfbError, start_xvfb

    try:
        display, xvfb = start_xvfb()
    except XvfbError as error:
        pytest.skip(str(error))
    points = 30
    output, trigger = tmp_path / "sardana-scan-plot.png", tmp_path / "grab"
    beamline.run("senv", "JsonRecorder", "True")  # what the scan window plots comes from the Door's JSON recorder
    beamline.sim_config(nav_shape=[1, points])
    _hardware_group(beamline)
    for parameter, value in (("PlotType", "Spectrum"), ("PlotAxes", "mov")):
        beamline.run("set_meas_conf", parameter, value, "[]", "dlive_hw_mg")
    env = dict(os.environ, DISPLAY=display, QT_QPA_PLATFORM="xcb")
    window = subprocess.Popen([sys.executable, str(Path(__file__).with_name("sardana_scan_plot.py")),
                               beamline.sardana.door, str(output), str(trigger)], env=env, stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = window.stdout.readline()
        while line and line.strip() != "ready":  # Taurus' log lines come first
            line = window.stdout.readline()
        assert line.strip() == "ready", window.stdout.read()
        beamline.run("senv", "ScanFile", "ascanct_plot.h5")
        beamline.run("ascanct", "dummy_mot", "0", "1", str(points), "0.05")
        trigger.touch()
        out, _ = window.communicate(timeout=60)
        assert window.returncode == 0 and f"saved {output}" in out, out
    finally:
        if window.poll() is None:
            window.kill()
            window.wait()
        xvfb.kill()
        xvfb.wait()
    plot = np.asarray(Image.open(output).convert("RGB"))[:, :700]  # the plot, left of the scan point panel
    assert len(np.unique(plot.reshape(-1, 3), axis=0)) > 8, "the plot area is blank"
    target = os.environ.get("TANGO_DECTRIS_LIVE_SCREENSHOTS")
    if target:
        shutil.copy(output, Path(target) / output.name)
