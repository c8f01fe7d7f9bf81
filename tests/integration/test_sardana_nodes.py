"""Sardana against a merging device (issue 22): the same controllers, macros and measurement group
as ``test_sardana.py``, but the device they are given is a ``Role merger`` device whose frames are
received and processed by two node devices, each node server a process of its own, all registered
in the embedded Tango database as a facility deploys them (docs/nodes.md). A user's scans must not
see the difference: every value Sardana records is the simulator's ground truth."""
from __future__ import annotations

import os

import numpy as np
import pytest
import tango

pytest.importorskip("sardana", reason="Sardana is not installed (pip install tango-dectris-live[sardana])")

from sim.server import SimulatorServer  # noqa: E402
from tango_dectris_live.device.embedded_db import EmbeddedTangoDatabase  # noqa: E402
from tango_dectris_live.sardana import CONTROLLER_PATH, MACRO_PATH  # noqa: E402
from tango_dectris_live.testing.sardana_servers import DoorClient, SardanaServers, default_database  # noqa: E402

from .test_bluesky_nodes import MERGER, assert_merged_by_every_node, deploy_merger  # noqa: E402
from .test_sardana import (COUNTERS, DETECTORS, TOLERANCE, Beamline, _hardware_group, _scan_entry,  # noqa: E402
                           _truth, check_ct, set_up_beamline)

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def beamline(tmp_path_factory):
    """The simulator as the DCU, two node servers and the merging server (three processes), the
    Sardana server, a dummy motor and ``dectris_live_setup`` run on the merging device."""
    base = tmp_path_factory.mktemp("sardana_nodes")
    with SimulatorServer(host="127.0.0.1", model="ARINA") as sim, EmbeddedTangoDatabase() as db, \
            default_database(db.tango_host):
        sardana = None
        door = None
        try:
            device = deploy_merger(sim, db, base, (1, 1), DETECTORS)
            sardana = SardanaServers(db.tango_host, base, CONTROLLER_PATH, MACRO_PATH).start()
            door = DoorClient(sardana.door)
            line = Beamline(sim, device, door, sardana, base)
            set_up_beamline(line, MERGER)
            yield line
        finally:
            if door is not None:
                door.close()
            if sardana is not None:
                sardana.stop()


def test_ct_on_the_merger_gives_the_detector_image_and_the_virtual_counters(beamline):
    check_ct(beamline)
    assert_merged_by_every_node(beamline.device)


def test_ascan_on_the_merger_records_every_point_and_its_image_reference(beamline):
    """Five points; the image of each point is a reference into the series file the merging
    device saved (its merged results: a step scan's image is the point's sum_image, a result)."""
    beamline.sim_config(nav_shape=[1, 1])
    beamline.run("senv", "ActiveMntGrp", "dlive_mg")
    beamline.run("senv", "ScanFile", "ascan_nodes.h5")
    beamline.run("set_meas_conf", "ValueRefEnabled", "True", "dlive_image")
    series_before = int(beamline.device.series_id)
    try:
        beamline.run("ascan", "dummy_mot", "0", "1", "4", "0.01")
    finally:
        beamline.run("set_meas_conf", "ValueRefEnabled", "False", "dlive_image")
    assert int(beamline.device.series_id) == series_before + 5  # one series per point, on the merger
    assert_merged_by_every_node(beamline.device)
    truth = _truth(beamline, (1, 1))
    measurement = _scan_entry(beamline.base / "scans" / "ascan_nodes.h5")["measurement"]
    np.testing.assert_allclose(measurement["dummy_mot"][...], np.linspace(0, 1, 5))
    for channel, name in COUNTERS.items():
        np.testing.assert_allclose(measurement[channel][...], np.full(5, truth[name].ravel()[0]), err_msg=channel,
                                   **TOLERANCE)
    images = measurement["dlive_image"]
    assert images.is_virtual and images.shape == (5, 96, 96)
    files = sorted({source.file_name for source in images.virtual_sources()})
    assert len(files) == 5  # one series file per point, written by the merging device
    data = (beamline.base / "data").resolve()
    assert all(os.path.realpath(path).startswith(f"{data}{os.sep}") for path in files), files
    for point in range(5):
        np.testing.assert_array_equal(images[point], truth["sum_image"], err_msg=f"point {point}")


def test_ascanct_on_the_merger_records_every_point_of_the_series(beamline):
    """A hardware-triggered scan of the virtual counters: one series on the nodes, the merged
    values per point equal the ground truth."""
    points = 8
    beamline.sim_config(nav_shape=[1, points])
    _hardware_group(beamline)
    beamline.run("senv", "ScanFile", "ascanct_nodes.h5")
    beamline.run("ascanct", "dummy_mot", "0", "1", str(points), "0.05")
    assert_merged_by_every_node(beamline.device)
    truth = _truth(beamline, (1, points))
    measurement = _scan_entry(beamline.base / "scans" / "ascanct_nodes.h5")["measurement"]
    for name, result in COUNTERS.items():
        np.testing.assert_allclose(measurement[name][...][:points], truth[result].ravel(), err_msg=name, **TOLERANCE)


def test_ascanct_with_the_image_on_the_merger_says_the_merger_has_no_frames(beamline):
    """A hardware-synchronised scan's images are the frames, which a merging device does not have: the
    image channel is refused at load with a message naming the merging device (not NaN images)."""
    points = 4
    beamline.sim_config(nav_shape=[1, points])
    _hardware_group(beamline, image=True)
    beamline.run("senv", "ScanFile", "ascanct_image_nodes.h5")
    result = beamline.door.run("ascanct", "dummy_mot", "0", "1", str(points), "0.05", timeout=120)
    assert result.state != tango.DevState.ON and "merging device" in result.errors, (result.state, result.output)
