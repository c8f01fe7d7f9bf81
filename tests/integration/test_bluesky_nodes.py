"""The ophyd-async detector in a Bluesky ``count`` against a merging device (issue 22): the merger
(``Role merger``) of two node devices, each node server a process of its own, in the embedded
Tango database. The events' results, and the results read from the merger's series files, must be
the simulator's ground truth, as against a single device (test_bluesky_detector.py).

:func:`deploy_merger` is the deployment test_sardana_nodes.py uses too; this module imports Bluesky
and ophyd-async only inside its tests so that importing it needs neither."""
from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

import h5py
import numpy as np
import pytest
import requests
import tango

from sim.server import SimulatorServer
from tango_dectris_live.device.embedded_db import EmbeddedTangoDatabase
from tango_dectris_live.testing import wait_for

from .live_reference import VirtualDetectors, assert_equals_truth, reference_results, simulator_ground_truth

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MERGER = "test/dlmerge/1"
NODES = ("test/dlnode/1", "test/dlnode/2")
NAV = (6, 8)
# off the pixel grid, as in test_bluesky_detector: no pixel on the disk's edge
DETECTORS = VirtualDetectors(beam_center_xy=(47.3, 48.6), bf_radius=7.2, adf_inner_radius=18.4,
                             adf_outer_radius=27.7)
RESULTS = ("sum_image", "sumsig_image", "bf_image")


def deploy_merger(sim: SimulatorServer, db: EmbeddedTangoDatabase, base: Path, nav_shape: tuple[int, int],
                  detectors: VirtualDetectors = DETECTORS, trigger_mode: str = "ints") -> tango.DeviceProxy:
    """The simulator initialized as an ARINA binned 96x96 uint16 at full pace, one node server per
    node of NODES (1 worker, saving below ``base``/nodeN), then the merging server (saving below
    ``base``/data), started after the nodes as a Starter level would; returns the merger, ON, with
    the virtual detectors' geometry of ``detectors``."""
    rest = f"{sim.rest_url}/detector/api/1.8.0"
    requests.put(f"{rest}/command/initialize", timeout=60).raise_for_status()
    for key, value in (("trigger_mode", trigger_mode), ("binning_mode", "2x2"), ("pixel_format", "uint16")):
        requests.put(f"{rest}/config/{key}", json={"value": value}, timeout=10).raise_for_status()
    requests.put(f"{sim.rest_url}/sim/api/config", json={"pacing": "max", "nav_shape": list(nav_shape)},
                 timeout=10).raise_for_status()
    common = {"DcuHost": "127.0.0.1", "DcuPort": sim.port, "StreamPort": sim.stream_port,
              "Stream2Port": sim.stream2_port, "StatePollPeriod": 0.1}
    for folder in ("data", *(f"node{i}" for i in range(1, len(NODES) + 1))):
        (base / folder).mkdir(exist_ok=True)
    for i, node in enumerate(NODES, start=1):
        db.register_device(f"node{i}", node, {**common, "Role": "node", "Workers": 1,
                                              "SavingBaseDirectory": str(base / f"node{i}")})
    db.register_device("merger", MERGER, {**common, "Role": "merger", "SavingBaseDirectory": str(base / "data")})
    db.database().put_device_property(MERGER, {"Nodes": list(NODES)})
    for i, node in enumerate(NODES, start=1):
        db.start_server(f"node{i}", node)
    db.start_server("merger", MERGER)
    merger = tango.DeviceProxy(f"tango://{db.tango_host}/{MERGER}")
    merger.set_timeout_millis(30_000)
    wait_for(lambda: merger.state() == tango.DevState.ON, 60, lambda: f"merger ON ({merger.status()})")
    merger.beam_center = list(detectors.beam_center_xy)
    merger.adf_outer_radius = detectors.adf_outer_radius
    merger.adf_inner_radius = detectors.adf_inner_radius
    merger.bf_radius = detectors.bf_radius
    return merger


def assert_merged_by_every_node(merger: tango.DeviceProxy) -> None:
    """The merger's last series ran on every node, none failed, no frame is missing."""
    lines = list(merger.nodes_status)
    assert len(lines) == len(NODES) and not any("FAILED" in line or "left out" in line for line in lines), lines
    assert int(merger.frames_missing) == 0, merger.status()


@pytest.fixture(scope="module")
def merger_line(tmp_path_factory):
    base = tmp_path_factory.mktemp("bluesky_nodes")
    # exts: the detector's prepare must set ints itself, as in test_bluesky_detector
    with SimulatorServer(host="127.0.0.1", model="ARINA") as sim, EmbeddedTangoDatabase() as db:
        merger = deploy_merger(sim, db, base, NAV, trigger_mode="exts")
        yield sim, merger, f"tango://{db.tango_host}/{MERGER}", base


@pytest.fixture(scope="module")
def truth(merger_line) -> dict[str, np.ndarray]:
    sim, *_ = merger_line
    return reference_results(simulator_ground_truth(sim, NAV), DETECTORS)


class Session:
    """One RunEngine for the module, as one user session. pytango's asyncio executor (a process
    global) stays bound to the event loop it was first used on -- here that of the RunEngine of
    test_bluesky_detector.py, run before in the same process -- and a proxy made for another loop
    cannot be awaited: the executor is dropped first, so that pytango makes one for this session's."""

    def __init__(self) -> None:
        pytest.importorskip("ophyd_async",
                            reason="ophyd-async is not installed (pip install tango-dectris-live[bluesky])")
        from bluesky import RunEngine
        from tango.asyncio_executor import set_global_executor

        set_global_executor(None)

        self.engine = RunEngine()
        self.documents: list[tuple[str, dict]] = []
        self.engine.subscribe(lambda name, doc: self.documents.append((name, doc)))

    def count(self, trl: str, num: int, saving_mode: str) -> list[tuple[str, dict]]:
        """``count`` of a DectrisLiveDetector on ``trl``, the device's saving_mode set first: its documents."""
        import bluesky.plan_stubs as bps
        import bluesky.plans as bp
        from ophyd_async.core import init_devices

        from tango_dectris_live.bluesky import DectrisLiveDetector

        with init_devices():
            det = DectrisLiveDetector(trl, analyses=["sum", "sumsig", "bf"], nav_shape=NAV)
        self.engine(bps.mv(det.driver.saving_mode, saving_mode))
        self.documents.clear()
        self.engine(bp.count([det], num=num))
        return list(self.documents)


@pytest.fixture(scope="module")
def session(merger_line) -> Session:
    return Session()


def _of_kind(documents: list[tuple[str, dict]], kind: str) -> list[dict]:
    return [doc for name, doc in documents if name == kind]


def test_count_on_the_merger_puts_each_series_merged_results_in_its_event(merger_line, session, truth):
    _sim, merger, trl, _base = merger_line
    documents = session.count(trl, 2, "off")
    labels = list(merger.get_attribute_config("trigger_mode").enum_labels)
    assert labels[merger.read_attribute("trigger_mode").value] == "ints"  # the detector's prepare, on the merger
    events = _of_kind(documents, "event")
    assert len(events) == 2
    series = [event["data"]["det-series_id"] for event in events]
    assert series[1] == series[0] + 1 == int(merger.series_id)  # one Start of the merger per event
    for event in events:
        assert (event["data"]["det-frames_processed"], event["data"]["det-frames_missing"]) == (NAV[0] * NAV[1], 0)
        for name in RESULTS:
            assert_equals_truth(name, event["data"][f"det-{name}"], truth[name])
    assert not _of_kind(documents, "stream_resource")  # saving off: nothing in files
    assert_merged_by_every_node(merger)


def test_count_on_the_merger_with_saving_reads_the_merged_results_from_its_files(merger_line, session, truth):
    """saving_mode results: the results come from the merger's series file (StreamResource), one per event."""
    _sim, merger, trl, base = merger_line
    try:
        documents = session.count(trl, 2, "results")
    finally:
        merger.saving_mode = "off"
    assert_merged_by_every_node(merger)
    resources = {doc["uid"]: doc for doc in _of_kind(documents, "stream_resource")}
    assert {doc["data_key"] for doc in resources.values()} == {f"det-{name}" for name in RESULTS}
    assert len({doc["uri"] for doc in resources.values()}) == 2  # one file per series
    datums = _of_kind(documents, "stream_datum")
    assert len(datums) == 2 * len(RESULTS)
    for datum in datums:
        resource = resources[datum["stream_resource"]]
        path = Path(urlparse(resource["uri"]).path)
        assert path.resolve().is_relative_to((base / "data").resolve()), path  # the merger's own file
        with h5py.File(path, "r") as saved:
            data = saved[resource["parameters"]["dataset"]][()]
        name = resource["data_key"].removeprefix("det-")
        assert_equals_truth(name, data, truth[name])


def test_count_on_the_merger_with_frames_says_the_merger_has_no_frames(merger_line, session):
    """results_and_frames on a merging device: refused at prepare, the message says it has no frames."""
    _sim, merger, trl, _base = merger_line
    try:
        with pytest.raises(Exception, match="merging device"):
            session.count(trl, 1, "results_and_frames")
    finally:
        merger.saving_mode = "off"
