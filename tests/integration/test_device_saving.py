"""Saving through the device, as a user sets it up: SavingBaseDirectory, saving_mode/directory/
pattern; every series a NeXus file with the exact frames the simulator sent and the exact results."""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import h5py
import hdf5plugin  # noqa: F401 - the HDF5 filters that decode the saved frames
import numpy as np
import pytest
import requests
import tango
from tango import DevState
from tango.test_context import DeviceTestContext

from sim.server import SimulatorServer
from tango_dectris_live.device.dectris_live import DectrisLive
from tango_dectris_live.testing import acquire, wait_for

from .live_reference import simulator_ground_truth

pytestmark = [pytest.mark.integration, pytest.mark.slow]

NAV = (6, 8)
COUNT = int(np.prod(NAV))
TIMEOUT = 90.0
ARINA96 = (("binning_mode", "2x2"), ("pixel_format", "uint16"))  # ARINA binned: 96 x 96 uint16


@contextmanager
def arina_saving_device(base: Path, **properties: object):
    """The simulator (ARINA binned, ints) and a DectrisLive device saving below ``base``, with
    ``properties`` besides the DCU's address; yields (simulator, device)."""
    with SimulatorServer(host="127.0.0.1", model="ARINA") as sim:
        rest = f"{sim.rest_url}/detector/api/1.8.0"
        requests.put(f"{rest}/command/initialize", timeout=60).raise_for_status()
        for key, value in (("trigger_mode", "ints"), *ARINA96):
            requests.put(f"{rest}/config/{key}", json={"value": value}, timeout=10).raise_for_status()
        requests.put(f"{sim.rest_url}/sim/api/config", json={"pacing": "max", "nav_shape": list(NAV)},
                     timeout=10).raise_for_status()
        properties = {"DcuHost": "127.0.0.1", "DcuPort": sim.port, "StreamPort": sim.stream_port,
                      "Stream2Port": sim.stream2_port, "StatePollPeriod": 0.1, "SavingBaseDirectory": str(base),
                      **properties}
        with DeviceTestContext(DectrisLive, properties=properties, process=True, timeout=60) as proxy:
            wait_for(lambda: proxy.state() == DevState.ON, 60, lambda: f"State ON ({proxy.status()})")
            proxy.analyses = ["sum", "sumsig"]
            proxy.nav_shape = list(NAV)
            yield sim, proxy


@pytest.fixture(scope="module")
def saving_device(tmp_path_factory):
    base = tmp_path_factory.mktemp("saving_base")
    with arina_saving_device(base) as (sim, proxy):
        yield sim, proxy, base


def saved_file(proxy: tango.DeviceProxy, series: int) -> Path:
    """The series' file once its writer closed it (saving_status says 'saved ...')."""
    wait_for(lambda: proxy.saving_status.startswith("saved") and f"_{series}" in proxy.last_saved_file, TIMEOUT,
             lambda: f"series {series} saved ({proxy.saving_status})")
    return Path(proxy.last_saved_file)


def test_a_series_saved_with_its_frames_and_results(saving_device):
    sim, proxy, base = saving_device
    proxy.saving_mode = "results_and_frames"
    proxy.saving_directory = "scan_a"
    proxy.saving_name_pattern = "series_{series_id}.h5"
    acquire(proxy, TIMEOUT)
    path = saved_file(proxy, proxy.series_id)
    assert path.parent == base / "scan_a" and proxy.frames_saved == COUNT
    truth = simulator_ground_truth(sim, NAV)
    with h5py.File(path, "r") as f:
        frames = f["/entry/data/data"]
        assert frames.shape == (COUNT, 96, 96)
        assert frames.id.get_create_plist().get_filter(0)[0] == 32008  # bitshuffle: the blobs as received
        np.testing.assert_array_equal(frames[...], np.stack([truth.frame(n) for n in range(COUNT)]))
        assert f["/entry/data/missing_frames"].shape == (0,)
        np.testing.assert_array_equal(f["/entry/results/sum/sum_image"][...], proxy.sum_image)
        np.testing.assert_array_equal(f["/entry/results/sumsig/sumsig_image"][...], proxy.sumsig_image)
        np.testing.assert_array_equal(f["/entry/results/sum/sum_image"][...], truth.sum_frames(range(COUNT)))
        detector = f["/entry/instrument/detector"]
        assert detector["x_pixels_in_detector"][()] == 96 and detector["stream_format"][()] == b"legacy"
        assert detector["count_time"].attrs["units"] in ("s", b"s")
        assert f["/entry/scan_shape"][...].tolist() == list(NAV)


def test_results_only_and_the_name_is_never_reused(saving_device):
    _sim, proxy, base = saving_device
    proxy.saving_mode = "results"
    proxy.saving_directory = "scan_b"
    proxy.saving_name_pattern = "fixed.h5"
    acquire(proxy, TIMEOUT)
    wait_for(lambda: proxy.saving_status.startswith("saved") and proxy.last_saved_file.endswith("fixed.h5"),
             TIMEOUT, lambda: proxy.saving_status)
    first = Path(proxy.last_saved_file)
    acquire(proxy, TIMEOUT)
    wait_for(lambda: proxy.saving_status.startswith("saved") and proxy.last_saved_file != str(first), TIMEOUT,
             lambda: proxy.saving_status)
    second = Path(proxy.last_saved_file)
    assert (first.name, second.name) == ("fixed.h5", "fixed_1.h5") and second.parent == base / "scan_b"
    with h5py.File(second, "r") as f:
        assert f["/entry/data/data"].shape[0] == 0  # results only: no frames
        np.testing.assert_array_equal(f["/entry/results/sumsig/sumsig_image"][...], proxy.sumsig_image)


@pytest.mark.parametrize("directory", ["../outside", "/tmp/absolute", "link_out/x"])
def test_a_directory_out_of_the_base_is_refused(saving_device, directory):
    _sim, proxy, base = saving_device
    if directory.startswith("link_out") and not (base / "link_out").exists():
        os.symlink("/tmp", base / "link_out")
    proxy.saving_mode = "results"
    before = proxy.saving_directory
    with pytest.raises(tango.DevFailed, match="base|outside|absolute|\\.\\."):
        proxy.saving_directory = directory
    assert proxy.saving_directory == before


def test_saving_mode_is_checked(saving_device):
    _sim, proxy, _base = saving_device
    with pytest.raises(tango.DevFailed, match="saving_mode must be one of off, results, results_and_frames"):
        proxy.saving_mode = "everything"


def test_a_series_that_cannot_be_saved_is_processed_and_said_so_then_the_next_saves(saving_device):
    _sim, proxy, base = saving_device
    (base / "blocked").write_text("a file where the directory should be")
    proxy.saving_mode = "results"
    proxy.saving_name_pattern = "series_{series_id}.h5"
    proxy.saving_directory = "blocked/sub"
    acquire(proxy, TIMEOUT)
    assert proxy.frames_processed == COUNT  # the processing went on
    series = proxy.series_id
    wait_for(lambda: f"Saving: series {series} not saved" in proxy.status(), TIMEOUT, proxy.status)
    assert f"series {series} not saved" in proxy.saving_status
    proxy.saving_directory = "scan_c"
    acquire(proxy, TIMEOUT)
    path = saved_file(proxy, proxy.series_id)
    assert path.parent == base / "scan_c" and "Saving:" not in proxy.status()
