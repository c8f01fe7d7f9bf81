"""A writer killed mid-series, a full disk, a file-size limit: the file stays readable with what was
written, the reason is reported, and the next series is saved again.

The writers run in child processes (spawned): the file-size limit and the kill must not hit pytest.
The children say where they are through a pipe; nothing waits on time."""
from __future__ import annotations

import multiprocessing
import os
import resource
import signal
from pathlib import Path

import h5py
import hdf5plugin  # noqa: F401 - registers the HDF5 filters for reading back
import numpy as np
import pytest

from tango_dectris_live.saving import NexusSeriesWriter, SeriesFileSpec, clear_write_flags
from tango_dectris_live.testing.stream_producer import compress, random_frames

SHAPE = (64, 64)
FRAMES = 60
SPAWN = multiprocessing.get_context("spawn")


def frames_and_blobs() -> tuple[np.ndarray, list[bytes]]:
    frames = random_frames(FRAMES, SHAPE, seed=5)
    frames += np.random.default_rng(5).integers(0, 1000, size=frames.shape, dtype=np.uint16)  # compresses poorly
    return frames, [compress(frame, "bslz4") for frame in frames]


def series_spec(n_frames: int = FRAMES) -> SeriesFileSpec:
    return SeriesFileSpec(series_id=1, frame_shape=SHAPE, dtype="uint16", encoding="bslz4", n_frames=n_frames)


def _write_then_wait_to_be_killed(path: str, conn) -> None:
    _frames, blobs = frames_and_blobs()
    writer = NexusSeriesWriter(path, series_spec(), flush_interval=1e9)
    for i in range(10):
        writer.write_frame(i, blobs[i])
    writer.flush()
    for i in range(10, 15):  # written, not flushed
        writer.write_frame(i, blobs[i])
    conn.send("flushed 10")
    signal.pause()


def test_killed_writer_leaves_a_readable_file_with_the_flushed_frames(tmp_path):
    frames, _blobs = frames_and_blobs()
    path = tmp_path / "killed.h5"
    ours, theirs = SPAWN.Pipe()
    child = SPAWN.Process(target=_write_then_wait_to_be_killed, args=(str(path), theirs))
    child.start()
    try:
        assert ours.recv() == "flushed 10"
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.join()
    assert child.exitcode == -signal.SIGKILL
    with h5py.File(path, "r", swmr=True) as f:  # as SWMR readers always could
        np.testing.assert_array_equal(f["/entry/data/data"][:10], frames[:10])
        assert f["/entry/saving_status"][()].startswith(b"writing")
    with pytest.raises(OSError, match="already open for write"):
        h5py.File(path, "r")
    assert clear_write_flags(path) is True
    assert clear_write_flags(path) is False
    with h5py.File(path, "r") as f:  # now as any reader (LiberTEM, silx) opens it
        np.testing.assert_array_equal(f["/entry/data/data"][:10], frames[:10])
        assert f["/entry/data/data"].shape == (FRAMES, *SHAPE)


def _write_under_a_file_size_limit(path: str, limit: int, check_space: bool, conn) -> None:
    _frames, blobs = frames_and_blobs()
    writer = NexusSeriesWriter(path, series_spec(), flush_interval=1e9, check_space=check_space)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # as the writer process does: EFBIG, not death
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    written = 0
    for i, blob in enumerate(blobs):
        if not writer.write_frame(i, blob):
            break
        written += 1
        if i % 5 == 4:
            writer.flush()
    conn.send((written, writer.close()))
    conn.close()
    os._exit(0)  # a given-up file's h5py object must not be freed (see nexus.py)


def _run_limited(path: Path, limit: int, check_space: bool):
    ours, theirs = SPAWN.Pipe()
    child = SPAWN.Process(target=_write_under_a_file_size_limit, args=(str(path), limit, check_space, theirs))
    child.start()
    written, saved = ours.recv()
    child.join()
    return written, saved


def test_a_file_size_limit_stops_frames_and_the_file_closes_normally(tmp_path):
    frames, blobs = frames_and_blobs()
    path = tmp_path / "limited.h5"
    # room for the layout (< 64 KiB), the 1 MiB the writer keeps for closing, and 20 frames
    limit = 64 * 1024 + (1 << 20) + sum(map(len, blobs[:20]))
    written, saved = _run_limited(path, limit, check_space=True)
    assert 20 <= written < 40  # the layout takes less than 64 KiB
    assert saved.file_closed and saved.frames_saved == written and not saved.complete
    assert saved.stopped_reason.startswith("file size limit reached (File too large")
    with h5py.File(path, "r") as f:  # closed normally: any reader opens it
        np.testing.assert_array_equal(f["/entry/data/data"][:written], frames[:written])
        np.testing.assert_array_equal(f["/entry/data/missing_frames"][()], np.arange(written, FRAMES))
        assert f["/entry/saving_status"][()].decode().startswith("stopped: file size limit reached")
    # the next series, without the limit
    with NexusSeriesWriter(tmp_path / "next.h5", series_spec(2)) as writer:
        writer.write_frame(0, blobs[0])
        writer.write_frame(1, blobs[1])
    assert writer.close().complete


def test_a_write_that_fails_anyway_gives_the_file_up_at_its_last_flush(tmp_path):
    """Without the space check HDF5 itself hits the limit: it cannot close the file any more, so
    the file is left as the last flush made it, like a killed writer's."""
    frames, _blobs = frames_and_blobs()
    path = tmp_path / "given_up.h5"
    written, saved = _run_limited(path, 256 * 1024, check_space=False)
    assert not saved.file_closed and saved.stopped_reason.startswith("file size limit reached")
    assert saved.frames_saved % 5 == 0 and saved.frames_saved <= written  # the frames flushed
    clear_write_flags(path)
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(f["/entry/data/data"][:saved.frames_saved], frames[:saved.frames_saved])


def test_clear_write_flags_leaves_a_closed_file_alone_and_refuses_other_files(tmp_path):
    from tango_dectris_live.saving import SeriesFileError

    path = tmp_path / "closed.h5"
    with NexusSeriesWriter(path, series_spec(1)):
        pass
    before = path.read_bytes()
    assert clear_write_flags(path) is False  # HDF5's own superblock checksum verified
    assert path.read_bytes() == before
    (tmp_path / "text.h5").write_text("not HDF5 at all")
    with pytest.raises(SeriesFileError, match="not an HDF5 file"):
        clear_write_flags(tmp_path / "text.h5")
