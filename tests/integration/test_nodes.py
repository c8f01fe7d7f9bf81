"""Several receiver nodes on one detector stream, one merged result (issue 22).

As a facility deploys it: the embedded Tango database, the simulator as the DCU, three node
devices each in a server process of its own (``Role node``), merging devices (``Role merger``,
``Nodes`` = 1, 2 or 3 of them) and a single device (``Role single``) in servers of their own. The
merged results of a series must be those of the single device on the same series, bit for bit,
and the simulator's ground truth."""
from __future__ import annotations

import os

import h5py
import numpy as np
import pytest
import requests
import tango

from sim.server import SimulatorServer
from tango_dectris_live.device.embedded_db import EmbeddedTangoDatabase
from tango_dectris_live.testing import acquire, wait_for

from .live_reference import VirtualDetectors, reference_results, simulator_ground_truth

pytestmark = [pytest.mark.integration, pytest.mark.slow]

NAV = (24, 24)
ANALYSES = ["sum", "sumsig", "bf", "adf", "com"]
DETECTORS = VirtualDetectors(beam_center_xy=(47.0, 45.5), bf_radius=10.0, adf_inner_radius=14.0,
                             adf_outer_radius=40.0)
NODES = [f"test/dlnode/{i}" for i in (1, 2, 3)]
MERGERS = {count: f"test/dlmerge/{count}" for count in (1, 2, 3)}
SINGLE = "test/dlsingle/1"
RESULTS = ("sum_image", "sumsig_image", "bf_image", "adf_image", "com_x_image", "com_y_image")


class Facility:
    def __init__(self, sim, db):
        self.sim = sim
        self.db = db
        self.rest = f"{sim.rest_url}/detector/api/1.8.0"

    def proxy(self, name: str) -> tango.DeviceProxy:
        proxy = tango.DeviceProxy(f"tango://{self.db.tango_host}/{name}")
        proxy.set_timeout_millis(30_000)
        return proxy

    def set_stream(self, version: int) -> None:
        requests.put(f"{self.sim.rest_url}/stream/api/1.8.0/config/format",
                     json={"value": "legacy" if version == 1 else "cbor"}, timeout=10).raise_for_status()


def _common(sim) -> dict[str, object]:
    return {"DcuHost": "127.0.0.1", "DcuPort": sim.port, "StreamPort": sim.stream_port,
            "Stream2Port": sim.stream2_port, "StatePollPeriod": 0.2}


@pytest.fixture(scope="module")
def facility(tmp_path_factory):
    data = tmp_path_factory.mktemp("merged")
    with SimulatorServer(host="127.0.0.1", model="ARINA") as sim, EmbeddedTangoDatabase() as db:
        saved_host = os.environ.get("TANGO_HOST")
        os.environ["TANGO_HOST"] = db.tango_host
        try:
            rest = f"{sim.rest_url}/detector/api/1.8.0"
            requests.put(f"{rest}/command/initialize", timeout=60).raise_for_status()
            for key, value in (("trigger_mode", "ints"), ("binning_mode", "2x2"), ("pixel_format", "uint16")):
                requests.put(f"{rest}/config/{key}", json={"value": value}, timeout=10).raise_for_status()
            requests.put(f"{sim.rest_url}/sim/api/config", json={"pacing": "max", "nav_shape": list(NAV)},
                         timeout=10).raise_for_status()
            for i, node in enumerate(NODES, start=1):
                db.register_device(f"node{i}", node, {**_common(sim), "Role": "node", "Workers": 1})
            for count, merger in MERGERS.items():
                db.register_device("mergers", merger, {**_common(sim), "Role": "merger",
                                                       "SavingBaseDirectory": str(data)})
                db.database().put_device_property(merger, {"Nodes": NODES[:count]})
            db.register_device("single", SINGLE, {**_common(sim), "Workers": 1})
            for i, node in enumerate(NODES, start=1):
                db.start_server(f"node{i}", node)
            db.start_server("single", SINGLE)
            db.start_server("mergers", MERGERS[1])
            line = Facility(sim, db)
            for name in (*MERGERS.values(), SINGLE):
                device = line.proxy(name)
                wait_for(lambda: device.state() == tango.DevState.ON, 60, lambda: f"{name} ON ({device.status()})")
                device.analyses = ANALYSES
                device.nav_shape = list(NAV)
                device.beam_center = list(DETECTORS.beam_center_xy)
                device.adf_outer_radius = DETECTORS.adf_outer_radius
                device.adf_inner_radius = DETECTORS.adf_inner_radius
                device.bf_radius = DETECTORS.bf_radius
            yield line
        finally:
            if saved_host is None:
                os.environ.pop("TANGO_HOST", None)
            else:
                os.environ["TANGO_HOST"] = saved_host


def _results(device: tango.DeviceProxy) -> dict[str, np.ndarray]:
    return {name: np.asarray(device.read_attribute(name).value) for name in RESULTS}


@pytest.mark.parametrize("version", [2, 1], ids=["v2", "v1"])
def test_one_two_three_nodes_give_the_single_device_result(facility, version):
    facility.set_stream(version)
    single = facility.proxy(SINGLE)
    acquire(single, result="sum_image")
    expected = _results(single)
    truth = reference_results(simulator_ground_truth(facility.sim, NAV), DETECTORS)
    np.testing.assert_array_equal(expected["sum_image"], truth["sum_image"])
    for count, name in MERGERS.items():
        merger = facility.proxy(name)
        # a merger has no frames: results_and_frames saves its (merged) results
        merger.saving_mode = "results_and_frames" if count == 3 else "results"
        acquire(merger, result="sum_image")
        assert merger.frames_missing == 0, merger.status()
        assert merger.frames_processed == NAV[0] * NAV[1], merger.status()
        assert merger.read_attribute("sum_image").quality == tango.AttrQuality.ATTR_VALID
        got = _results(merger)
        for result in RESULTS:
            np.testing.assert_array_equal(got[result], expected[result], err_msg=f"{count} node(s): {result}")
        # the merged results are saved by the merging device, as a single device saves its own
        series = merger.series_id
        wait_for(lambda: merger.saving_status.startswith("saved") and f"_{series}" in merger.last_saved_file, 60,
                 lambda: f"series {series} saved ({merger.saving_status})")
        with h5py.File(merger.last_saved_file, "r") as saved:
            for analysis, result in (("sum", "sum_image"), ("bf", "bf_image"), ("com", "com_x_image")):
                np.testing.assert_array_equal(saved[f"entry/results/{analysis}/{result}"][()].reshape(got[result].shape),
                                              got[result], err_msg=f"saved {result}")
        merger.saving_mode = "off"
        lines = merger.nodes_status
        assert len(lines) == count and all("FAILED" not in line for line in lines), lines
        # every node took part: the DCU dealt the frames to each of them
        shares = [int(line.split(": ")[1].split(" frames received")[0]) for line in lines]
        assert sum(shares) == NAV[0] * NAV[1] and min(shares) > 0, lines


def test_a_node_killed_mid_series_costs_exactly_its_lost_frames_and_the_next_series_runs(facility):
    """SIGKILL one of three nodes while the series streams: its frames not merged yet are NaN
    (quality WARNING, Status and nodes_status name the node), every other position is the ground
    truth; the next series runs on the two nodes left, complete."""
    facility.set_stream(2)
    merger = facility.proxy(MERGERS[3])
    truth = simulator_ground_truth(facility.sim, NAV)
    frames = NAV[0] * NAV[1]
    victim = facility.db.servers["node2"]
    requests.put(f"{facility.rest}/config/frame_time", json={"value": 0.01}, timeout=10).raise_for_status()
    requests.put(f"{facility.rest}/config/count_time", json={"value": 0.01}, timeout=10).raise_for_status()
    requests.put(f"{facility.sim.rest_url}/sim/api/config", json={"pacing": "frame_time"},
                 timeout=10).raise_for_status()
    try:
        wait_for(lambda: merger.state() == tango.DevState.ON, 30, lambda: f"ON ({merger.status()})")
        ended = merger.acquisitions_ended
        node = facility.proxy(NODES[1])
        before = node.series_id
        merger.Start()
        # the victim has received a part of its share of this series, then the kill
        wait_for(lambda: node.series_id != before and node.frames_received >= 20, 60,
                 lambda: f"node 2 receiving ({node.status()})")
        victim.kill()
        victim.wait(10)
        wait_for(lambda: merger.acquisitions_ended > ended, 90, lambda: f"the series' end ({merger.status()})")
        wait_for(lambda: merger.state() == tango.DevState.ON, 30, lambda: f"ON ({merger.status()})")
        assert merger.frames_processed < frames, "the killed node lost nothing: killed too late?"
        assert merger.read_attribute("sumsig_image").quality == tango.AttrQuality.ATTR_WARNING
        got = _results(merger)
        lost = np.isnan(got["sumsig_image"]).ravel()
        assert merger.frames_missing == int(lost.sum()) > 0
        present = np.flatnonzero(~lost)
        expected = reference_results(truth, DETECTORS, missing=np.flatnonzero(lost).tolist())
        for name in ("sumsig_image", "bf_image", "adf_image"):
            np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
            assert np.array_equal(np.isnan(got[name]).ravel(), lost), name
        for name in ("com_x_image", "com_y_image"):
            np.testing.assert_allclose(got[name].ravel()[present], expected[name].ravel()[present], rtol=1e-4,
                                       atol=1e-4, err_msg=name)
        np.testing.assert_array_equal(got["sum_image"], truth.sum_frames(present).astype(np.float64))
        failed = [line for line in merger.nodes_status if "FAILED" in line]
        assert len(failed) == 1 and failed[0].startswith(NODES[1]), merger.nodes_status
        assert NODES[1] in merger.status()
        # the next series: the two nodes left take every frame
        acquire(merger, result="sum_image")
        assert (merger.frames_processed, merger.frames_missing) == (frames, 0), merger.status()
        lines = merger.nodes_status
        assert any(line.startswith(NODES[1]) and "left out" in line for line in lines), lines
        np.testing.assert_array_equal(_results(merger)["sumsig_image"],
                                      reference_results(truth, DETECTORS)["sumsig_image"])
        # the node is back (as Starter or systemd restart it): the very next series runs on all three,
        # though Tango subscribes the merger to the new server's events again only after a while
        requests.put(f"{facility.sim.rest_url}/sim/api/config", json={"pacing": "max"}, timeout=10)
        facility.db.start_server("node2", NODES[1])
        acquire(merger, result="sum_image")
        assert (merger.frames_processed, merger.frames_missing) == (frames, 0), merger.status()
        lines = merger.nodes_status
        assert len(lines) == 3 and not any("FAILED" in line or "left out" in line for line in lines), lines
    finally:
        requests.put(f"{facility.sim.rest_url}/sim/api/config", json={"pacing": "max"}, timeout=10)
        if victim.poll() is not None:
            facility.db.start_server("node2", NODES[1])


@pytest.mark.parametrize("count", [1, 2, 3], ids=["1node", "2nodes", "3nodes"])
@pytest.mark.parametrize("version", [1, 2], ids=["v1", "v2"])
def test_passive_nodes_merge_every_series_someone_else_arms(facility, version, count):
    """Listen on a merger of 1, 2 or 3 nodes; a script arms, triggers and disarms twice through the
    DCU's REST API: each series is merged complete and equals the single device's result."""
    from tango_dectris_live.testing import EventRecorder

    facility.set_stream(version)
    requests.put(f"{facility.rest}/config/nimages", json={"value": NAV[0] * NAV[1]}, timeout=10).raise_for_status()
    requests.put(f"{facility.rest}/config/ntrigger", json={"value": 1}, timeout=10).raise_for_status()
    single = facility.proxy(SINGLE)
    acquire(single, result="sum_image")
    expected = _results(single)
    merger = facility.proxy(MERGERS[count])
    wait_for(lambda: merger.state() == tango.DevState.ON, 30, lambda: f"ON ({merger.status()})")
    with EventRecorder(merger, data_ready=("sum_image",)) as log:
        merger.Listen()
        try:
            wait_for(lambda: all("listening" in facility.proxy(n).acquisition_status for n in NODES[:count]), 60,
                     lambda: "the nodes listening")
            for round_ in (1, 2):
                series = requests.put(f"{facility.rest}/command/arm", timeout=30).json()["sequence id"]
                requests.put(f"{facility.rest}/command/trigger", timeout=60).raise_for_status()
                requests.put(f"{facility.rest}/command/disarm", timeout=30).raise_for_status()
                wait_for(lambda: len(log.data_ready("sum_image")) >= round_, 60,
                         lambda: f"series {series} merged ({merger.status()}; nodes: " + "; ".join(
                             f"{n}: {facility.proxy(n).status()}" for n in NODES[:count]) + ")")
                assert merger.series_id == series
                assert (merger.frames_processed, merger.frames_missing) == (NAV[0] * NAV[1], 0), merger.status()
                got = _results(merger)
                for name in RESULTS:
                    np.testing.assert_array_equal(got[name], expected[name], err_msg=f"series {series}: {name}")
                lines = merger.nodes_status
                assert len(lines) == count and all("FAILED" not in line for line in lines), lines
        finally:
            merger.Stop()
        wait_for(lambda: merger.state() == tango.DevState.ON, 30, lambda: f"ON after Stop ({merger.status()})")
        for node in NODES[:count]:
            wait_for(lambda: facility.proxy(node).state() == tango.DevState.ON, 30, lambda: f"{node} idle")


def test_stop_and_abort_mid_series_end_on_every_node_and_the_next_series_runs(facility):
    """Stop (the DCU cancels, what arrived is merged) and Abort (pending frames dropped) on a merger
    of two nodes while the series streams: State ON again, no node failed, the merged positions are
    the ground truth; then a full series."""
    facility.set_stream(2)
    merger = facility.proxy(MERGERS[2])
    frames = NAV[0] * NAV[1]
    truth = reference_results(simulator_ground_truth(facility.sim, NAV), DETECTORS)
    requests.put(f"{facility.rest}/config/frame_time", json={"value": 0.01}, timeout=10).raise_for_status()
    requests.put(f"{facility.rest}/config/count_time", json={"value": 0.01}, timeout=10).raise_for_status()
    requests.put(f"{facility.sim.rest_url}/sim/api/config", json={"pacing": "frame_time"},
                 timeout=10).raise_for_status()
    try:
        for how in ("Stop", "Abort"):
            wait_for(lambda: merger.state() == tango.DevState.ON, 30, lambda: f"ON ({merger.status()})")
            ended = merger.acquisitions_ended
            node = facility.proxy(NODES[0])
            before = node.series_id
            merger.Start()
            wait_for(lambda: node.series_id != before and node.frames_received >= 20, 60,
                     lambda: f"node 1 receiving ({node.status()})")
            getattr(merger, how)()
            wait_for(lambda: merger.acquisitions_ended > ended, 60, lambda: f"{how} ended ({merger.status()})")
            wait_for(lambda: merger.state() == tango.DevState.ON, 30, lambda: f"ON after {how} ({merger.status()})")
            assert 0 < merger.frames_processed < frames, (how, merger.status())
            got = _results(merger)["sumsig_image"]
            merged = ~np.isnan(got)
            np.testing.assert_array_equal(got[merged], truth["sumsig_image"][merged], err_msg=how)
            assert not any("FAILED" in line for line in merger.nodes_status), merger.nodes_status
            for name in NODES[:2]:  # the nodes were told: none ended the series by its frame timeout
                wait_for(lambda: "(idle)" in facility.proxy(name).status(), 30, lambda: f"{name} idle")
                assert "no frame for" not in facility.proxy(name).acquisition_status, (how, name)
    finally:
        requests.put(f"{facility.sim.rest_url}/sim/api/config", json={"pacing": "max"}, timeout=10)
    acquire(merger, result="sum_image")
    assert (merger.frames_processed, merger.frames_missing) == (frames, 0), merger.status()
