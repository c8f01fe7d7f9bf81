"""The ophyd-async detector in Bluesky plans, against the simulator and a DectrisLive device server:
``count``, ``scan`` over a simulated motor and a one-series fly scan, run by a RunEngine with the
code of docs/bluesky.md as written there; the documents' data are compared with the simulator's
ground truth, and every StreamResource's file is opened and compared too."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import bluesky.plan_stubs as bps
import bluesky.plans as bp
import h5py
import hdf5plugin  # noqa: F401 - the HDF5 filters of the saved frames
import numpy as np
import pytest
import requests
from bluesky.utils import FailedStatus
from ophyd_async.core import TriggerInfo, init_devices, wait_for_value
from tango import DevState
from tango.test_context import DeviceTestContext

from sim.server import SimulatorServer
from tango_dectris_live.bluesky import AcquisitionError, DectrisLiveDetector, SeriesFileError
from tango_dectris_live.device.dectris_live import DectrisLive
from tango_dectris_live.testing import wait_for

from .live_reference import VirtualDetectors, assert_equals_truth, reference_results, simulator_ground_truth

pytestmark = [pytest.mark.integration, pytest.mark.slow]

NAV = (6, 8)
FRAMES = int(np.prod(NAV))
FRAME_SHAPE = (96, 96)  # ARINA with 2x2 binning
ARINA96 = (("binning_mode", "2x2"), ("pixel_format", "uint16"))
# off the pixel grid, as in test_device_live: no pixel on the disk's edge
DETECTORS = VirtualDetectors(beam_center_xy=(47.3, 48.6), bf_radius=7.2, adf_inner_radius=18.4,
                             adf_outer_radius=27.7)
DOCS = Path(__file__).resolve().parents[2] / "docs" / "bluesky.md"
DOCUMENTED_TRL = "tango://tango-host:10000/bl/det/arina"
RESULTS = ("sum_image", "sumsig_image", "bf_image")


def documented_examples() -> dict[str, str]:
    """The Python blocks of docs/bluesky.md that start with ``# example: <name>``."""
    blocks = re.findall(r"```python\n# example: ([^\n]+)\n(.*?)```", DOCS.read_text(), flags=re.DOTALL)
    return {name.strip(): code for name, code in blocks}


@pytest.fixture(scope="module")
def live_device(tmp_path_factory):
    base = tmp_path_factory.mktemp("bluesky_saving")
    with SimulatorServer(host="127.0.0.1", model="ARINA") as sim:
        rest = f"{sim.rest_url}/detector/api/1.8.0"
        requests.put(f"{rest}/command/initialize", timeout=60).raise_for_status()
        for key, value in (("trigger_mode", "exts"), *ARINA96):  # exts: prepare must set ints itself
            requests.put(f"{rest}/config/{key}", json={"value": value}, timeout=10).raise_for_status()
        requests.put(f"{sim.rest_url}/sim/api/config", json={"pacing": "max", "nav_shape": list(NAV)},
                     timeout=10).raise_for_status()
        properties = {"DcuHost": "127.0.0.1", "DcuPort": sim.port, "StreamPort": sim.stream_port,
                      "Stream2Port": sim.stream2_port, "StatePollPeriod": 0.1, "SavingBaseDirectory": str(base)}
        context = DeviceTestContext(DectrisLive, properties=properties, process=True, timeout=60)
        with context as proxy:
            wait_for(lambda: proxy.state() == DevState.ON, 60, lambda: f"State ON ({proxy.status()})")
            proxy.beam_center = list(DETECTORS.beam_center_xy)
            proxy.bf_radius = DETECTORS.bf_radius
            proxy.adf_outer_radius = DETECTORS.adf_outer_radius
            proxy.adf_inner_radius = DETECTORS.adf_inner_radius
            yield sim, proxy, context.get_device_access(), base


class Examples:
    """The documented examples, run in one namespace (as in one session), the setup first with
    the test device's address instead of the documented one."""

    def __init__(self, trl: str) -> None:
        self.code = documented_examples()
        self.namespace: dict[str, Any] = {}
        exec(self.code["setup"].replace(DOCUMENTED_TRL, trl), self.namespace)  # noqa: S102 - the docs' code

    def run(self, name: str) -> list[tuple[str, dict]]:
        """The documents of one example (of the example after a previous one, for "read the files")."""
        if name != "read the files":
            self.documents.clear()
        exec(self.code[name], self.namespace)  # noqa: S102
        return self.documents

    @property
    def documents(self) -> list[tuple[str, dict]]:
        return self.namespace["documents"]

    def __getitem__(self, name: str) -> Any:
        return self.namespace[name]


@pytest.fixture(scope="module")
def example(live_device) -> Examples:
    _sim, _proxy, trl, _base = live_device
    return Examples(trl)


@pytest.fixture(scope="module")
def truth(live_device):
    sim, *_ = live_device
    generator = simulator_ground_truth(sim, NAV)
    frames = np.stack([generator.frame(n) for n in range(FRAMES)])
    return frames, reference_results(generator, DETECTORS)


def of_kind(documents: list[tuple[str, dict]], kind: str) -> list[dict]:
    return [doc for name, doc in documents if name == kind]


def read_resource(resource: dict) -> np.ndarray:
    assert resource["mimetype"] == "application/x-hdf5"
    assert resource["uri"].startswith("file://localhost/")
    with h5py.File(urlparse(resource["uri"]).path, "r") as file:
        return file[resource["parameters"]["dataset"]][()]


def assert_stream_resources(documents: list[tuple[str, dict]], data_keys: set[str], events: int,
                            truth) -> dict[str, list[dict]]:
    """One StreamResource per data key and event, each with one StreamDatum of indices 0..1, in
    event order; every file's datasets equal the ground truth."""
    frames, reference = truth
    resources = {doc["uid"]: doc for doc in of_kind(documents, "stream_resource")}
    datums = of_kind(documents, "stream_datum")
    by_key: dict[str, list[dict]] = {key: [] for key in data_keys}
    for datum in datums:
        resource = resources[datum["stream_resource"]]
        assert datum["indices"] == {"start": 0, "stop": 1}
        by_key[resource["data_key"]].append(datum)
    assert {key: len(found) for key, found in by_key.items()} == dict.fromkeys(data_keys, events)
    for key, found in by_key.items():
        assert [datum["seq_nums"] for datum in found] == [{"start": n, "stop": n + 1} for n in range(1, events + 1)]
        for datum in found:
            data = read_resource(resources[datum["stream_resource"]])
            if key == "det-frames":
                np.testing.assert_array_equal(data, frames)
            else:
                assert_equals_truth(key.removeprefix("det-"), data, reference[key.removeprefix("det-")])
    return {key: [resources[datum["stream_resource"]] for datum in found] for key, found in by_key.items()}


# ---- the documented examples -------------------------------------------------------------------

def test_count_puts_each_series_results_in_its_event(example, live_device, truth):
    _sim, proxy, _trl, _base = live_device
    _frames, reference = truth
    documents = example.run("count")
    labels = list(proxy.get_attribute_config("trigger_mode").enum_labels)
    assert labels[proxy.read_attribute("trigger_mode").value] == "ints"  # prepare's, the fixture left exts
    (descriptor,) = of_kind(documents, "descriptor")
    keys = descriptor["data_keys"]
    for name in RESULTS:
        expected_shape = list(FRAME_SHAPE) if name == "sum_image" else list(NAV)
        assert (keys[f"det-{name}"]["shape"], keys[f"det-{name}"]["dtype_numpy"]) == (expected_shape, "<f8")
        assert "external" not in keys[f"det-{name}"]
    for name in ("series_id", "frames_processed", "frames_missing"):
        assert (keys[f"det-{name}"]["dtype"], keys[f"det-{name}"]["shape"]) == ("integer", [])
    assert not of_kind(documents, "stream_resource")  # saving off: nothing in files
    events = of_kind(documents, "event")
    assert len(events) == 3
    series = [event["data"]["det-series_id"] for event in events]
    assert series == list(range(series[0], series[0] + 3))  # one Start per event
    for event in events:
        assert (event["data"]["det-frames_processed"], event["data"]["det-frames_missing"]) == (FRAMES, 0)
        for name in RESULTS:
            assert_equals_truth(name, event["data"][f"det-{name}"], reference[name])
    configuration = descriptor["configuration"]["det"]["data"]
    assert list(configuration["det-driver-nav_shape"]) == list(NAV)
    assert list(configuration["det-driver-analyses"]) == ["sum", "sumsig", "bf"]


def test_scan_saves_each_point_and_references_its_file(example, live_device, truth):
    _sim, _proxy, _trl, base = live_device
    documents = example.run("scan")
    (descriptor,) = of_kind(documents, "descriptor")
    keys = descriptor["data_keys"]
    assert keys["det-frames"]["shape"] == [FRAMES, *FRAME_SHAPE]
    assert keys["det-frames"]["dtype_numpy"] == np.dtype(np.uint16).str
    stream_keys = {f"det-{name}" for name in ("frames", *RESULTS)}
    assert {key for key, value in keys.items() if value.get("external") == "STREAM:"} == stream_keys
    events = of_kind(documents, "event")
    assert [event["data"]["motor"] for event in events] == [0.0, 0.5, 1.0]
    assert all(key not in event["data"] for event in events for key in stream_keys)
    resources = assert_stream_resources(documents, stream_keys, 3, truth)
    paths = [urlparse(resource["uri"]).path for resource in resources["det-frames"]]
    assert len(set(paths)) == 3 and all(Path(path).parent == base / "sample_3" for path in paths)
    for resource in resources["det-bf_image"]:  # described as stored
        with h5py.File(urlparse(resource["uri"]).path, "r") as file:
            assert file["/entry/results/bf/bf_image"].dtype.str == keys["det-bf_image"]["dtype_numpy"]
    # the documented way of reading them back gives the same
    example.run("read the files")
    frames, reference = truth
    assert len(example["frames"]) == 3 and all(np.array_equal(f, frames) for f in example["frames"])
    assert len(example["sums"]) == 3 and all(np.array_equal(s, reference["sum_image"]) for s in example["sums"])


def test_fly_scan_of_one_series(example, live_device, truth):
    _sim, proxy, _trl, _base = live_device
    documents = example.run("fly")
    assert proxy.count_time == pytest.approx(0.0005)  # the TriggerInfo's livetime
    assert not of_kind(documents, "event")
    (descriptor,) = of_kind(documents, "descriptor")
    stream_keys = {f"det-{name}" for name in ("frames", *RESULTS)}
    assert set(descriptor["data_keys"]) == stream_keys
    assert_stream_resources(documents, stream_keys, 1, truth)


# ---- beyond the examples -------------------------------------------------------------------------

def test_results_in_the_events_and_frames_from_the_file(example, live_device, truth):
    _sim, proxy, trl, _base = live_device
    _frames, reference = truth
    with init_devices():
        live = DectrisLiveDetector(trl, analyses=["sum", "sumsig", "bf"], nav_shape=NAV, results_from_file=False)
    proxy.saving_mode = "results_and_frames"
    example.documents.clear()
    example["RE"](bp.count([live], num=2))
    documents = example.documents
    (descriptor,) = of_kind(documents, "descriptor")
    external = {key for key, value in descriptor["data_keys"].items() if value.get("external") == "STREAM:"}
    assert external == {"live-frames"}
    for event in of_kind(documents, "event"):
        for name in RESULTS:
            assert_equals_truth(name, event["data"][f"live-{name}"], reference[name])
    frames, _ = truth
    assert [np.array_equal(read_resource(doc), frames) for doc in of_kind(documents, "stream_resource")] == [True] * 2


def test_a_series_that_cannot_be_saved_fails_the_plan_with_the_device_s_reason(example, live_device):
    _sim, proxy, _trl, base = live_device
    (base / "blocked").write_text("a file where the directory should be")
    proxy.saving_mode = "results"
    proxy.saving_directory = "blocked/sub"
    with pytest.raises(FailedStatus) as failure:
        example["RE"](bp.count([example["det"]], num=1))
    assert isinstance(failure.value.__cause__, AcquisitionError)
    assert re.search(r"the series was not saved: series [0-9]+ not saved", str(failure.value.__cause__))
    wait_for(lambda: proxy.state() == DevState.ON, 30, proxy.status)
    proxy.saving_directory = "after_failure"
    documents = example.run("count")  # the next plan works (the example sets saving off)
    assert len(of_kind(documents, "event")) == 3


def test_a_fly_stream_declared_before_any_file_says_why_it_cannot_describe_the_results(example, live_device):
    _sim, proxy, _trl, _base = live_device
    det = example["det"]

    def declared_first():
        yield from bps.stage(det)
        yield from bps.open_run()
        yield from bps.prepare(det, TriggerInfo(number_of_events=1), wait=True)
        yield from bps.declare_stream(det, name="primary", collect=True)

    proxy.saving_mode = "results"
    proxy.saving_directory = "declared_first"
    with pytest.raises(SeriesFileError, match="declare a fly scan's stream after complete"):
        example["RE"](declared_first())


def test_a_series_without_data_fails_the_plan_with_the_device_s_reason(example, live_device):
    """The DCU's header is lost: the device ends the series with 'no data' after series_timeout
    and publishes no result; the trigger fails with the device's acquisition_status."""
    sim, proxy, _trl, _base = live_device
    proxy.saving_mode = "off"
    proxy.series_timeout = 1.0
    requests.put(f"{sim.rest_url}/sim/api/config", json={"faults": [{"kind": "no_header"}]},
                 timeout=10).raise_for_status()
    try:
        with pytest.raises(FailedStatus) as failure:
            example["RE"](bp.count([example["det"]], num=1))
    finally:
        proxy.series_timeout = 0.0
    assert isinstance(failure.value.__cause__, AcquisitionError)
    assert re.search(r"ended without a result: no data: .*no header within 1 s", str(failure.value.__cause__))
    assert len(of_kind(example.run("count"), "event")) == 3  # the fault was for one series only


def test_a_plan_that_fails_during_a_series_stops_it(example, live_device):
    """unstage (the RunEngine's clean-up of a failed plan, started without waiting for it) sends
    Stop to the series still running: the device ends it gracefully and is idle for the next plan."""
    sim, proxy, _trl, _base = live_device
    det = example["det"]
    proxy.saving_mode = "off"
    proxy.frame_time = 0.05  # 48 frames: 2.4 s, paced by the simulator
    requests.put(f"{sim.rest_url}/sim/api/config", json={"pacing": "frame_time"}, timeout=10).raise_for_status()

    def fails_while_acquiring():
        yield from bps.stage(det)
        yield from bps.open_run()
        yield from bps.trigger(det, group="series")  # not waited for
        # frames arriving: the series is armed and half-way (the previous one ended with all of them)
        yield from bps.wait_for([lambda: wait_for_value(det.driver.frames_processed, lambda n: 0 < n < FRAMES,
                                                        timeout=30)])
        raise RuntimeError("the plan failed during the series")

    try:
        with pytest.raises(RuntimeError, match="the plan failed during the series"):
            example["RE"](fails_while_acquiring())
        wait_for(lambda: proxy.state() == DevState.ON, 30, lambda: f"the device idle again ({proxy.status()})")
        assert re.match(r"series [0-9]+ stopped: ", proxy.acquisition_status), proxy.acquisition_status
        assert proxy.frames_processed < FRAMES
    finally:
        requests.put(f"{sim.rest_url}/sim/api/config", json={"pacing": "max"}, timeout=10).raise_for_status()
    assert len(of_kind(example.run("count"), "event")) == 3


def test_prepare_takes_one_series_and_a_trigger_refuses_settings_changed_since(example, live_device):
    _sim, proxy, _trl, _base = live_device
    det = example["det"]
    proxy.saving_mode = "off"

    def prepared_for_two():
        yield from bps.stage(det)
        yield from bps.prepare(det, TriggerInfo(number_of_events=2), wait=True)

    with pytest.raises(FailedStatus) as failure:
        example["RE"](prepared_for_two())
    assert isinstance(failure.value.__cause__, ValueError)
    assert "one collection at a time" in str(failure.value.__cause__)

    def nav_shape_changed():
        yield from bps.stage(det)
        yield from bps.prepare(det, TriggerInfo(), wait=True)
        yield from bps.mv(det.driver.nav_shape, np.array([8, 6]))
        yield from bps.trigger(det, wait=True)

    series_before = proxy.series_id
    try:
        with pytest.raises(FailedStatus) as failure:
            example["RE"](nav_shape_changed())
    finally:
        proxy.nav_shape = list(NAV)
    assert re.search(r"nav_shape \(6, 8\) -> \(8, 6\) since the detector was prepared", str(failure.value.__cause__))
    assert proxy.series_id == series_before  # refused before Start
