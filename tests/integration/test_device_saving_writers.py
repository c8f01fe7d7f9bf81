"""Saving through the device with two writer processes (device property SavingWriters = 2): the
frames of a series go to two part files, the series file's /entry/data/data shows them all, exactly
as the simulator sent them, to h5py+hdf5plugin and to LiberTEM; dropped frames are listed missing."""
from __future__ import annotations

from pathlib import Path

import h5py
import hdf5plugin  # noqa: F401 - the HDF5 filters that decode the saved frames
import numpy as np
import pytest
import requests

from sim.server import SimulatorServer
from tango_dectris_live.testing import acquire, wait_for

from .live_reference import simulator_ground_truth
from .test_device_saving import NAV, arina_saving_device

pytestmark = [pytest.mark.integration, pytest.mark.slow]

COUNT = int(np.prod(NAV))
STACK = 8  # frames per stack: 6 stacks, dealt out to the two writers by blocks of 8 frames
TIMEOUT = 90.0


@pytest.fixture(scope="module")
def two_writers(tmp_path_factory):
    base = tmp_path_factory.mktemp("saving_base")
    with arina_saving_device(base, SavingWriters=2, FrameStackSize=STACK) as (sim, proxy):
        proxy.frame_stack_size = STACK
        proxy.saving_mode = "results_and_frames"
        proxy.saving_name_pattern = "scan_{series_id}.h5"
        yield sim, proxy, base


def configure_simulator(sim: SimulatorServer, **settings) -> None:
    requests.put(f"{sim.rest_url}/sim/api/config", json=settings, timeout=30).raise_for_status()


def saved_series(proxy) -> Path:
    series = proxy.series_id
    wait_for(lambda: proxy.saving_status.startswith("saved") and f"scan_{series}.h5" in proxy.last_saved_file,
             TIMEOUT, lambda: f"series {series} saved ({proxy.saving_status})")
    return Path(proxy.last_saved_file)


def test_two_writers_save_the_simulators_frames_exactly_and_libertem_reads_them(two_writers):
    from tests.libertem_reading import libertem_sums  # LiberTEM loads slowly: only where it is needed

    sim, proxy, base = two_writers
    configure_simulator(sim, pacing="max", nav_shape=list(NAV))
    acquire(proxy, TIMEOUT)
    path = saved_series(proxy)
    assert proxy.frames_saved == COUNT
    parts = [path.with_name(f"{path.stem}_part{k}.h5") for k in range(2)]
    assert sorted(base.iterdir()) == sorted([path, *parts])
    truth = simulator_ground_truth(sim, NAV)
    expected = np.stack([truth.frame(n) for n in range(COUNT)])
    with h5py.File(path, "r") as f:
        frames = f["/entry/data/data"]
        assert frames.is_virtual and frames.shape == (COUNT, 96, 96)
        np.testing.assert_array_equal(frames[...], expected)
        assert f["/entry/data/missing_frames"].shape == (0,)
        np.testing.assert_array_equal(f["/entry/results/sum/sum_image"][...], proxy.sum_image)
        np.testing.assert_array_equal(f["/entry/results/sumsig/sumsig_image"][...], proxy.sumsig_image)
    for part in parts:  # each writer wrote half of the frames, as received (bitshuffle chunks)
        with h5py.File(part, "r") as f:
            data = f["/entry/data/data"]
            assert data.shape == (COUNT // 2, 96, 96)
            assert data.id.get_create_plist().get_filter(0)[0] == 32008
    total, per_frame = libertem_sums(path)
    np.testing.assert_array_equal(total, expected.sum(axis=0, dtype=np.float64))
    np.testing.assert_array_equal(total, proxy.sum_image)
    np.testing.assert_array_equal(per_frame, expected.sum(axis=(1, 2), dtype=np.float64))
    np.testing.assert_array_equal(per_frame.reshape(NAV), proxy.sumsig_image)


def test_frames_the_stream_dropped_are_listed_missing(two_writers):
    sim, proxy, _base = two_writers
    dropped = [5, 12]  # one in each writer's part (blocks 0 and 1)
    configure_simulator(sim, pacing="max", nav_shape=list(NAV), faults=[{"kind": "drop", "frames": dropped}])
    acquire(proxy, TIMEOUT)
    series = proxy.series_id
    wait_for(lambda: f"scan_{series}.h5" in proxy.last_saved_file and proxy.saving_status.startswith("saved"),
             TIMEOUT, lambda: f"series {series} saved ({proxy.saving_status})")
    path = Path(proxy.last_saved_file)
    assert proxy.frames_saved == COUNT - len(dropped)
    truth = simulator_ground_truth(sim, NAV)
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(f["/entry/data/missing_frames"][()], dropped)
        frames = f["/entry/data/data"]
        kept = [n for n in range(COUNT) if n not in dropped]
        np.testing.assert_array_equal(frames[kept], np.stack([truth.frame(n) for n in kept]))
        assert not frames[dropped].any()
        sumsig = f["/entry/results/sumsig/sumsig_image"][...].ravel()
        assert np.isnan(sumsig[dropped]).all() and np.isfinite(sumsig[kept]).all()
        assert f["/entry/saving_status"][()].startswith(b"incomplete: 46 frames saved, 2 missing")
