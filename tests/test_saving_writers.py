"""Several writer processes per series: each writes a part file beside the series file, and the
series file's /entry/data/data, a virtual dataset, shows every frame from its part. Frames read
back exactly, missing frames listed, part files never overwritten, a killed writer (of a part, or
of the series file) leaves readable files, a full disk stops the parts and the series closes valid."""
from __future__ import annotations

import multiprocessing
import os
import resource
import signal
import threading
import traceback

import h5py
import hdf5plugin  # noqa: F401 - registers the HDF5 filters for reading back
import numpy as np
import pytest

from tango_dectris_live.processing.series_saving import SeriesSaving
from tango_dectris_live.saving import (PartLayout, SavingError, SavingFailed, SeriesFileError, SeriesFileSpec,
                                       SeriesSaved, SeriesWriterProcess, automatic_writers, reserve_part_files,
                                       stored_frames)
from tango_dectris_live.saving.testing import BlobStacks
from tango_dectris_live.testing.stream_producer import compress, random_frames

SHAPE = (24, 40)
STACK = 8  # frames per stack: the part layout's block
SPAWN = multiprocessing.get_context("spawn")


class Recorder:
    """The callbacks' side (collector threads): stacks given back, answers seen."""

    def __init__(self, release=None) -> None:
        self.done: list = []
        self.answers: list = []
        self.release = release
        self._lock = threading.Lock()

    def stack_done(self, handle) -> None:
        with self._lock:
            self.done.append(handle)
        if self.release is not None:
            self.release(handle)

    def answer(self, answer) -> None:
        with self._lock:
            self.answers.append(answer)


def spec(n_frames: int, series_id: int = 1, **kwargs) -> SeriesFileSpec:
    return SeriesFileSpec(series_id=series_id, frame_shape=SHAPE, dtype="uint16", encoding="bslz4",
                          n_frames=n_frames, **kwargs)


def stack_of(stacks: BlobStacks, frames: np.ndarray, numbers) -> object:
    numbers = list(numbers)
    return stacks.stack([compress(frames[i], "bslz4") for i in numbers], numbers, shape=SHAPE, dtype="uint16",
                        encoding="bslz4")


# ---- the part layout ---------------------------------------------------------------------------


@pytest.mark.parametrize("n_frames", [1, 7, 8, 16, 45, 48, 61])
@pytest.mark.parametrize("count", [2, 3])
def test_the_part_layout_places_every_frame_once(n_frames, count):
    layout = PartLayout("s.h5", tuple(f"s_part{k}.h5" for k in range(count)), block=STACK)
    numbers = np.arange(n_frames)
    owners = layout.owner(numbers)
    assert sum(layout.frames_in(k, n_frames) for k in range(count)) == n_frames
    for part in range(count):
        mine = numbers[owners == part]
        positions = layout.position(mine)
        np.testing.assert_array_equal(positions, np.arange(mine.size))  # back to back in the part
        np.testing.assert_array_equal(layout.frame_numbers(part, positions), mine)
        covered = [number for first, runs, stride, block, _ in layout.regions(part, n_frames)
                   for run in range(runs) for number in range(first + run * stride, first + run * stride + block)]
        assert covered == mine.tolist()
    assert layout.owners(0, STACK - 1) == [0] and layout.owners(STACK, 2 * STACK - 1) == [1 % count]
    assert layout.owners(STACK - 1, STACK) == sorted({0, 1 % count})  # a stack across two blocks


def test_a_part_layout_names_files_in_one_directory():
    with pytest.raises(SeriesFileError, match="at least 2 files"):
        PartLayout("s.h5", ("s_part0.h5",), block=8)
    with pytest.raises(SeriesFileError, match="in one directory"):
        PartLayout("s.h5", ("s_part0.h5", "../s_part1.h5"), block=8)


def test_the_automatic_number_of_writers():
    assert [automatic_writers(cores) for cores in (1, 2, 4, 5, 16, 128)] == [1, 1, 1, 2, 2, 2]
    saving = SeriesSaving("", writers=0)
    assert saving.resolved_writers == automatic_writers()
    saving.writers = 3
    assert saving.resolved_writers == 3
    with pytest.raises(SavingError, match="whole number >= 0"):
        saving.writers = -1


def test_part_files_are_named_after_the_series_file_and_never_overwrite(tmp_path):
    (tmp_path / "scan_1_part1.h5").write_bytes(b"someone's data")
    os.symlink("/tmp", tmp_path / "scan_1_part0.h5")  # a link counts as taken and is not followed
    parts = reserve_part_files(tmp_path / "scan_1.h5", 3)
    assert [p.name for p in parts] == ["scan_1_part0_1.h5", "scan_1_part1_1.h5", "scan_1_part2.h5"]
    assert all(p.parent == tmp_path and p.stat().st_size == 0 for p in parts)
    assert (tmp_path / "scan_1_part1.h5").read_bytes() == b"someone's data"


# ---- two writer processes ----------------------------------------------------------------------


def test_two_writers_save_every_frame_exactly_and_list_the_missing(tmp_path):
    n_frames = 45  # the last block is short
    frames = random_frames(n_frames, SHAPE, seed=3)
    lost = {13, 30, 31}
    # stacks as a receiver fills them (slots of 16 frames: blocks of 16 frames): consecutive frames,
    # the lost ones left out, one stack across two blocks (of both parts), the series' last, short one
    groups = [range(8), range(8, 16), range(16, 21), range(21, 29), range(29, 40), range(40, 45)]
    recorder = Recorder()
    (tmp_path / "scan_part0.h5").write_bytes(b"not ours")  # taken: the part goes to scan_part0_1.h5
    with BlobStacks(6, 16, 2048) as stacks:
        recorder.release = stacks.release
        with SeriesWriterProcess(writers=2, on_stack_done=recorder.stack_done, on_answer=recorder.answer) as writer:
            assert len(set(writer.pids)) == 2
            writer.open_series(tmp_path / "scan.h5", spec(n_frames, scan_shape=(5, 9)))
            given = 0
            for group in groups:
                numbers = [i for i in group if i not in lost]
                handle = stack_of(stacks, frames, numbers)
                writer.write_stack(handle)
                given += 1
            writer.write_results({})
            writer.close_series("complete")
            saved = writer.wait_series_saved(30)
            assert writer.wait_stacks_done(30)
            status = writer.status()
    assert len(recorder.done) == given  # each stack given back once, also the one both writers wrote
    assert saved.frames_saved == n_frames - len(lost) and saved.frames_missing == len(lost) and not saved.complete
    assert saved.stopped_reason is None and saved.file_closed
    assert status.state == "saved" and status.frames_saved == n_frames - len(lost) and status.writers == 2
    assert status.bytes_written == saved.bytes_written > 0 and status.backlog == 0
    assert recorder.answers == [saved]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scan.h5", "scan_part0.h5", "scan_part0_1.h5",
                                                         "scan_part1.h5"]
    expected = frames.copy()
    expected[sorted(lost)] = 0
    with h5py.File(tmp_path / "scan.h5", "r") as f:
        data = f["/entry/data/data"]
        assert data.is_virtual and data.shape == (n_frames, *SHAPE)
        np.testing.assert_array_equal(data[()], expected)
        np.testing.assert_array_equal(data[40:45], frames[40:45])  # a slice across parts
        np.testing.assert_array_equal(f["/entry/data/missing_frames"][()], sorted(lost))
        assert f["/entry/saving_status"][()].startswith(b"incomplete: 42 frames saved, 3 missing")
        assert list(data.attrs["part_files"]) == ["scan_part0_1.h5", "scan_part1.h5"]
        assert f["/entry/instrument/detector/data"].is_virtual
        np.testing.assert_array_equal(stored_frames(data), [i not in lost for i in range(n_frames)])
    # each part holds its own blocks only, as chunks (the bytes as received)
    layout = PartLayout("scan.h5", ("scan_part0_1.h5", "scan_part1.h5"), 16)
    for part, name in enumerate(layout.files):
        with h5py.File(tmp_path / name, "r") as f:
            data = f["/entry/data/data"]
            assert data.shape == (layout.frames_in(part, n_frames), *SHAPE) and data.chunks == (1, *SHAPE)
            assert f["/entry"].attrs["series_file"] == "scan.h5" and f["/entry"].attrs["part"] == part
            numbers = layout.frame_numbers(part, np.arange(data.shape[0]))
            np.testing.assert_array_equal(data[()], expected[numbers])
    assert (tmp_path / "scan_part0.h5").read_bytes() == b"not ours"


def test_a_series_without_a_known_length_or_without_frames_uses_one_file(tmp_path):
    frames = random_frames(10, SHAPE, seed=2)
    with BlobStacks(2, 16, 2048) as stacks, SeriesWriterProcess(writers=2, on_stack_done=stacks.release) as writer:
        writer.open_series(tmp_path / "unknown.h5", spec(None))
        writer.write_stack(stack_of(stacks, frames, range(10)))
        writer.close_series()
        assert writer.wait_series_saved(30).complete
        writer.open_series(tmp_path / "empty.h5", spec(10, series_id=2))  # no stack comes
        writer.close_series("cancelled")
        nothing = writer.wait_series_saved(30)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.h5", "unknown.h5"]  # no part files left
    with h5py.File(tmp_path / "unknown.h5", "r") as f:
        assert not f["/entry/data/data"].is_virtual
        np.testing.assert_array_equal(f["/entry/data/data"][()], frames)
    assert nothing.frames_saved == 0 and nothing.frames_missing == 10


@pytest.mark.parametrize("killed", [1, 0], ids=["a part writer", "the series file's writer"])
def test_a_killed_writer_leaves_readable_files_and_the_next_series_is_saved(tmp_path, killed):
    n_frames = 32
    frames = random_frames(n_frames, SHAPE, seed=9)
    recorder = Recorder()
    with BlobStacks(6, STACK, 2048) as stacks:
        recorder.release = stacks.release
        writer = SeriesWriterProcess(writers=2, on_stack_done=recorder.stack_done, on_answer=recorder.answer,
                                     flush_interval=1e-6)
        try:
            writer.open_series(tmp_path / "killed.h5", spec(n_frames))
            writer.write_stack(stack_of(stacks, frames, range(8)))  # part 0
            writer.write_stack(stack_of(stacks, frames, range(8, 16)))  # part 1
            assert writer.wait_stacks_done(30)
            victim = writer.pids[killed]
            os.kill(victim, signal.SIGSTOP)  # its next stack stays unwritten
            writer.write_stack(stack_of(stacks, frames, range(16 + 8 * killed, 24 + 8 * killed)))
            writer.write_stack(stack_of(stacks, frames, range(24 - 8 * killed, 32 - 8 * killed)))  # the other's
            os.kill(victim, signal.SIGKILL)
            assert writer.wait_stacks_done(30)
            assert len(recorder.done) == 4  # the unwritten stack given back too
            writer.close_series("complete")
            saved = writer.wait_series_saved(30)
            failures = [a for a in recorder.answers if isinstance(a, SavingFailed)]
            which = f"writer process {killed + 1} of 2 ended unexpectedly (exit code -9)"
            assert any(failure.fatal and which in failure.reason for failure in failures), failures
            # the next series: a new writer process in place of the killed one
            writer.open_series(tmp_path / "next.h5", spec(16, series_id=2))
            assert writer.pids[killed] != victim
            writer.write_stack(stack_of(stacks, frames, range(8)))
            writer.write_stack(stack_of(stacks, frames, range(8, 16)))
            writer.close_series()
            assert writer.wait_series_saved(30).complete
        finally:
            writer.close()  # the surviving writer closes its part of the killed series too
    unwritten = set(range(16 + 8 * killed, 24 + 8 * killed))
    expected = frames.copy()
    expected[sorted(unwritten)] = 0
    if killed == 1:  # the series file's writer closed it, reading the killed part's file
        assert saved.file_closed and saved.stopped_reason == "the writer of part 1 stopped before closing it"
        assert saved.frames_saved == n_frames - 8 and any("part 1 (killed_part1.h5)" in n for n in saved.notes)
    else:  # the series file stays as its last flush left it
        assert not saved.file_closed and "ended unexpectedly (exit code -9)" in saved.stopped_reason
    with h5py.File(tmp_path / "killed.h5", "r") as f:  # write flags cleared: any reader opens it
        data = f["/entry/data/data"]
        np.testing.assert_array_equal(data[()], expected)
        np.testing.assert_array_equal(stored_frames(data), [i not in unwritten for i in range(n_frames)])
        if killed == 1:
            np.testing.assert_array_equal(f["/entry/data/missing_frames"][()], sorted(unwritten))
            assert f["/entry/saving_status"][()].startswith(b"stopped: the writer of part 1 stopped")
        else:
            assert f["/entry/saving_status"][()].startswith(b"writing")
    with h5py.File(tmp_path / "next.h5", "r") as f:
        np.testing.assert_array_equal(f["/entry/data/data"][()], frames[:16])


def _save_two_series_limited(base: str, conn) -> None:
    """A device process whose writer processes hit a file-size limit (inherited through spawn)."""
    try:
        frames = random_frames(60, (64, 64), seed=5) + np.random.default_rng(5).integers(
            0, 1000, (60, 64, 64), dtype=np.uint16)
        blobs = [compress(frame, "bslz4") for frame in frames]
        answers: list = []
        with BlobStacks(6, 10, 9000) as stacks:  # /dev/shm is a file too: created before the limit
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            # room per part file for its layout, 10 frames and the 1 MiB kept for closing
            resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024 + sum(map(len, blobs[:10])) + (1 << 20),
                                                       resource.RLIM_INFINITY))
            with SeriesWriterProcess(writers=2, on_stack_done=stacks.release, on_answer=answers.append,
                                     flush_interval=1e-6) as writer:
                big = SeriesFileSpec(series_id=1, frame_shape=(64, 64), dtype="uint16", encoding="bslz4", n_frames=60)
                writer.open_series(os.path.join(base, "big.h5"), big)
                for first in range(0, 60, 10):
                    writer.write_stack(stacks.stack(blobs[first:first + 10], list(range(first, first + 10)),
                                                    shape=(64, 64), dtype="uint16", encoding="bslz4"))
                    writer.wait_stacks_done(20)
                writer.close_series("complete")
                first_saved = writer.wait_series_saved(20)
                small = SeriesFileSpec(series_id=2, frame_shape=(64, 64), dtype="uint16", encoding="bslz4",
                                       n_frames=10)
                writer.open_series(os.path.join(base, "small.h5"), small)
                writer.write_stack(stacks.stack(blobs[:10], list(range(10)), shape=(64, 64), dtype="uint16",
                                                encoding="bslz4"))
                writer.close_series("complete")
                second_saved = writer.wait_series_saved(20)
        conn.send((first_saved, second_saved, answers))
    except BaseException:
        conn.send(traceback.format_exc())
        raise


def test_a_full_disk_stops_the_parts_the_series_file_closes_valid_and_the_next_is_saved(tmp_path):
    ours, theirs = SPAWN.Pipe()
    child = SPAWN.Process(target=_save_two_series_limited, args=(str(tmp_path), theirs))
    child.start()
    outcome = ours.recv()
    child.join()
    assert not isinstance(outcome, str), outcome
    first, second, answers = outcome
    assert first.file_closed and first.stopped_reason.startswith("file size limit reached")
    assert 0 < first.frames_saved < 60 and second.complete and second.frames_saved == 10
    assert [a for a in answers if isinstance(a, SeriesSaved)] == [first, second]
    assert all(not a.fatal for a in answers if isinstance(a, SavingFailed))  # stopped in time: nothing given up
    with h5py.File(tmp_path / "big.h5", "r") as f:  # closed normally: readable by anyone
        data = f["/entry/data/data"]
        stored = stored_frames(data)
        assert int(stored.sum()) == first.frames_saved
        np.testing.assert_array_equal(f["/entry/data/missing_frames"][()], np.flatnonzero(~stored))
        assert data[np.flatnonzero(stored)].any(axis=(1, 2)).all()
        assert f["/entry/saving_status"][()].startswith(b"stopped: file size limit reached")
