"""The writer process end to end: real frame stacks from the receiver (or built in shared memory),
slots given back once written, counters, results, a writer that dies, a full disk."""
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

from tango_dectris_live.receiver import SeriesFinished, StackReady, StreamReceiver
from tango_dectris_live.saving import (SavingFailed, SavingLocation, SeriesFileSpec, SeriesSaved,
                                       SeriesWriterProcess, WriterProcessError)
from tango_dectris_live.saving.testing import BlobStacks
from tango_dectris_live.testing.stream_producer import StreamProducer, compress, random_frames

SHAPE = (24, 40)
SPAWN = multiprocessing.get_context("spawn")


class Recorder:
    """The callbacks' side: stacks given back, answers seen (from the collector thread)."""

    def __init__(self, release=None) -> None:
        self.done: list = []
        self.answers: list = []
        self._release = release
        self._lock = threading.Lock()

    def stack_done(self, handle) -> None:
        with self._lock:
            self.done.append(handle)
        if self._release is not None:
            self._release(handle)

    def answer(self, answer) -> None:
        with self._lock:
            self.answers.append(answer)


def _receive_and_save(tmp_path, version: int, encoding: str, frames: np.ndarray, order=None):
    location = SavingLocation.create(str(tmp_path), "raw", "series_{series_id}")
    with StreamProducer(version) as producer, StreamReceiver(
            producer.endpoint, stream_version=version, frame_shape=SHAPE, dtype=frames.dtype,
            frame_stack_size=8, num_slots=4) as receiver:
        recorder = Recorder(release=receiver.release)
        with SeriesWriterProcess(on_stack_done=recorder.stack_done, on_answer=recorder.answer) as writer:
            receiver.arm(3)
            producer.send_all(producer.series(3, frames, encoding, order=order))
            given = 0
            while True:
                event = receiver.next_event(10)
                assert event is not None, "no receiver event within 10 s"
                if hasattr(event, "header"):
                    reserved = location.reserve(event.series)
                    # geometry and encoding left to the first stack, as after a header without them
                    writer.open_series(reserved.path, SeriesFileSpec(series_id=event.series, n_frames=len(frames)))
                elif isinstance(event, StackReady):
                    writer.write_stack(event.handle)
                    given += 1
                elif isinstance(event, SeriesFinished):
                    writer.close_series(event.summary.end_reason)
                    break
            saved = writer.wait_series_saved(20)
            status = writer.status()
    assert len(recorder.done) == given
    return reserved.path, saved, status, recorder


@pytest.mark.parametrize("version, encoding", [(1, "bslz4"), (1, "lz4"), (1, "none"), (2, "bslz4"), (2, "lz4"),
                                               (2, "none")])
def test_a_received_series_is_saved_exactly(tmp_path, version, encoding):
    frames = random_frames(30, SHAPE, "uint16", seed=version)
    path, saved, status, recorder = _receive_and_save(tmp_path, version, encoding, frames)
    assert saved.complete and saved.frames_saved == 30 and saved.path == str(path)
    assert status.state == "saved" and status.frames_saved == 30 and status.series_saved == 1
    assert status.bytes_written == saved.bytes_written > 0 and status.backlog == 0
    assert recorder.answers == [saved]
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(f["/entry/data/data"][()], frames)
        assert f["/entry/data/missing_frames"].size == 0
        assert f["/entry/data/data"].attrs["stream_encoding"] == {"lz4": "lz4" if version == 1 else "lz4h5"}.get(
            encoding, encoding)


def test_frames_the_stream_lost_are_listed_missing(tmp_path):
    frames = random_frames(20, SHAPE, "uint16", seed=4)
    sent = [i for i in range(20) if i not in (0, 9, 10)]
    path, saved, _status, _recorder = _receive_and_save(tmp_path, 2, "bslz4", frames, order=sent)
    assert saved.frames_saved == 17 and saved.frames_missing == 3 and not saved.complete
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(f["/entry/data/missing_frames"][()], [0, 9, 10])
        np.testing.assert_array_equal(f["/entry/data/data"][sent], frames[sent])


def stack_of(stacks: BlobStacks, frames: np.ndarray, numbers) -> object:
    return stacks.stack([compress(frames[i], "bslz4") for i in numbers], list(numbers), shape=SHAPE, dtype="uint16",
                        encoding="bslz4")


def spec(series_id: int = 1, n_frames: int = 20, **kwargs) -> SeriesFileSpec:
    return SeriesFileSpec(series_id=series_id, frame_shape=SHAPE, dtype="uint16", encoding="bslz4",
                          n_frames=n_frames, **kwargs)


def test_results_go_through_the_writer(tmp_path):
    frames = random_frames(20, SHAPE)
    layout = {"sumsig": {"sumsig": ((4, 5), "float64")}}
    sumsig = frames.sum(axis=(1, 2)).reshape(4, 5).astype(np.float64)
    sumsig[3, 4] = np.nan
    with BlobStacks(2, 10, 2048) as stacks, SeriesWriterProcess(on_stack_done=stacks.release) as writer:
        writer.open_series(tmp_path / "r.h5", spec(scan_shape=(4, 5), result_layout=layout,
                                                   analysis_parameters={"sumsig": {"frames": 20}}))
        writer.write_stack(stack_of(stacks, frames, range(10)))
        writer.write_results({"sumsig": np.zeros((4, 5))})
        writer.write_stack(stack_of(stacks, frames, range(10, 20)))
        writer.write_results({"sumsig": sumsig}, np.isfinite(sumsig))
        writer.close_series("complete")
        assert writer.wait_series_saved(20).complete
    with h5py.File(tmp_path / "r.h5", "r") as f:
        np.testing.assert_array_equal(f["/entry/results/sumsig/sumsig"][()], sumsig)
        assert f["/entry/results/sumsig"].attrs["frames"] == 20
        np.testing.assert_array_equal(f["/entry/results/frames_done"][()], np.isfinite(sumsig))


def test_results_outside_the_layout_are_reported_not_fatal(tmp_path):
    frames = random_frames(10, SHAPE)
    recorder = Recorder()
    with BlobStacks(1, 10, 2048) as stacks, SeriesWriterProcess(on_answer=recorder.answer,
                                                                on_stack_done=stacks.release) as writer:
        writer.open_series(tmp_path / "r.h5", spec(n_frames=10))
        writer.write_results({"nonsense": np.zeros(3)})
        writer.write_stack(stack_of(stacks, frames, range(10)))
        writer.close_series()
        assert writer.wait_series_saved(20).complete
    failure = recorder.answers[0]
    assert isinstance(failure, SavingFailed) and not failure.fatal
    assert "results not saved" in failure.reason and "nonsense" in failure.reason


def test_write_stack_needs_an_open_series(tmp_path):
    with BlobStacks(1, 4, 2048) as stacks, SeriesWriterProcess() as writer:
        handle = stack_of(stacks, random_frames(4, SHAPE), range(4))
        with pytest.raises(WriterProcessError, match="no series file is open"):
            writer.write_stack(handle)


def test_closing_the_writer_closes_the_open_series(tmp_path):
    frames = random_frames(10, SHAPE)
    with BlobStacks(1, 10, 2048) as stacks:
        writer = SeriesWriterProcess(on_stack_done=stacks.release)
        writer.open_series(tmp_path / "c.h5", spec(n_frames=10))
        writer.write_stack(stack_of(stacks, frames, range(10)))
        writer.close()
        saved = writer.wait_series_saved(0)
    assert saved.frames_saved == 10 and saved.file_closed
    with h5py.File(tmp_path / "c.h5", "r") as f:
        assert b"series ended: writer process stopped" in f["/entry/saving_status"][()]
    with pytest.raises(WriterProcessError, match="closed"):
        writer.open_series(tmp_path / "d.h5", spec())


def test_a_killed_writer_gives_every_stack_back_and_the_next_series_is_saved(tmp_path):
    frames = random_frames(40, SHAPE, seed=9)
    recorder = Recorder()
    with BlobStacks(4, 10, 2048) as stacks:
        recorder._release = stacks.release
        with SeriesWriterProcess(on_stack_done=recorder.stack_done, on_answer=recorder.answer,
                                 flush_interval=1e-6) as writer:
            writer.open_series(tmp_path / "killed.h5", spec(n_frames=40))
            writer.write_stack(stack_of(stacks, frames, range(10)))
            assert writer.wait_stacks_done(20)
            first_pid = writer.pid
            os.kill(first_pid, signal.SIGSTOP)  # the next stacks stay unwritten
            writer.write_stack(stack_of(stacks, frames, range(10, 20)))
            writer.write_stack(stack_of(stacks, frames, range(20, 30)))
            os.kill(first_pid, signal.SIGKILL)
            saved = writer.wait_series_saved(20)
            assert writer.wait_stacks_done(20)
            assert len(recorder.done) == 3  # the two unwritten stacks given back too
            assert not saved.file_closed and "ended unexpectedly (exit code -9)" in saved.stopped_reason
            status = writer.status()
            assert status.state == "failed" and "opens normally (write flags cleared)" in status.message
            assert any(isinstance(a, SavingFailed) and a.fatal for a in recorder.answers)
            with pytest.raises(WriterProcessError, match="not running"):
                writer.write_stack(stack_of(stacks, frames, range(30, 40)))
            # the next series: a new writer process
            writer.open_series(tmp_path / "next.h5", spec(2, n_frames=10))
            assert writer.pid != first_pid
            writer.write_stack(stack_of(stacks, frames, range(10)))
            writer.close_series()
            assert writer.wait_series_saved(20).complete
    with h5py.File(tmp_path / "killed.h5", "r") as f:  # flags cleared: a plain reader opens it
        data = f["/entry/data/data"]
        assert saved.frames_saved <= 10
        np.testing.assert_array_equal(data[:saved.frames_saved], frames[:saved.frames_saved])
    with h5py.File(tmp_path / "next.h5", "r") as f:
        np.testing.assert_array_equal(f["/entry/data/data"][()], frames[:10])


def _save_under_a_file_size_limit(base: str, check_space: bool, conn) -> None:
    """A device process whose writer process hits a file-size limit (inherited through spawn)."""
    try:
        conn.send(_save_two_series_limited(base, check_space))
    except BaseException:
        conn.send(traceback.format_exc())
        raise


def _save_two_series_limited(base: str, check_space: bool) -> tuple:
    frames = random_frames(60, (64, 64), seed=5) + np.random.default_rng(5).integers(0, 1000, (60, 64, 64),
                                                                                        dtype=np.uint16)
    blobs = [compress(frame, "bslz4") for frame in frames]
    answers = []
    with BlobStacks(6, 10, 9000) as stacks:  # /dev/shm is a file too: created before the limit
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        # room for the layout and 20 frames (and the 1 MiB the space check keeps for closing)
        room = 64 * 1024 + sum(map(len, blobs[:20])) + ((1 << 20) if check_space else 0)
        resource.setrlimit(resource.RLIMIT_FSIZE, (room, resource.RLIM_INFINITY))
        with SeriesWriterProcess(on_stack_done=stacks.release, on_answer=answers.append, check_space=check_space,
                                 flush_interval=1e-6) as writer:
            big = SeriesFileSpec(series_id=1, frame_shape=(64, 64), dtype="uint16", encoding="bslz4", n_frames=60)
            writer.open_series(os.path.join(base, "big.h5"), big)
            for first in range(0, 60, 10):
                handle = stacks.stack(blobs[first:first + 10], list(range(first, first + 10)), shape=(64, 64),
                                      dtype="uint16", encoding="bslz4")
                try:
                    writer.write_stack(handle)
                except WriterProcessError:  # it gave the file up: the stack stays ours
                    stacks.release(handle)
                    break
                writer.wait_stacks_done(20)
            writer.close_series("complete")
            first_saved = writer.wait_series_saved(20)
            first_pid = writer.pid
            small = SeriesFileSpec(series_id=2, frame_shape=(64, 64), dtype="uint16", encoding="bslz4", n_frames=10)
            writer.open_series(os.path.join(base, "small.h5"), small)
            writer.write_stack(stacks.stack(blobs[:10], list(range(10)), shape=(64, 64), dtype="uint16",
                                            encoding="bslz4"))
            writer.close_series("complete")
            second_saved = writer.wait_series_saved(20)
            restarted = writer.pid != first_pid
    return first_saved, second_saved, answers, restarted


@pytest.mark.parametrize("check_space", [True, False])
def test_a_full_disk_stops_the_series_and_the_next_one_is_saved(tmp_path, check_space):
    """With the space check the writer stops frames and closes the file; without it HDF5's write
    fails, the writer gives the file up and its process exits, and a new one saves the next series."""
    ours, theirs = SPAWN.Pipe()
    child = SPAWN.Process(target=_save_under_a_file_size_limit, args=(str(tmp_path), check_space, theirs))
    child.start()
    outcome = ours.recv()
    child.join()
    assert not isinstance(outcome, str), outcome
    first, second, answers, restarted = outcome
    assert first.stopped_reason.startswith("file size limit reached") and 0 < first.frames_saved < 60
    assert second.complete and second.frames_saved == 10
    assert restarted is not check_space  # a writer that gave a file up is replaced
    failures = [a for a in answers if isinstance(a, SavingFailed)]
    assert len(failures) == 1 and failures[0].fatal is not check_space
    assert [a for a in answers if isinstance(a, SeriesSaved)] == [first, second]
    with h5py.File(tmp_path / "big.h5", "r") as f:  # readable by anyone in both cases
        frames = f["/entry/data/data"]
        assert frames.shape[0] == 60
        stored = frames[:first.frames_saved]
        assert stored.any(axis=(1, 2)).all()
    with h5py.File(tmp_path / "small.h5", "r") as f:
        assert f["/entry/saving_status"][()].startswith(b"complete")


def _start_a_series_and_wait_to_be_killed(path: str, conn) -> None:
    frames = random_frames(10, SHAPE)
    with BlobStacks(1, 10, 2048) as stacks:
        writer = SeriesWriterProcess(on_stack_done=stacks.release)
        writer.open_series(path, spec(n_frames=10))
        writer.write_stack(stack_of(stacks, frames, range(10)))
        writer.wait_stacks_done(20)
        conn.send(writer.pid)
        signal.pause()


def test_a_writer_whose_device_process_died_closes_its_file(tmp_path):
    psutil = pytest.importorskip("psutil")
    path = tmp_path / "orphan.h5"
    ours, theirs = SPAWN.Pipe()
    device = SPAWN.Process(target=_start_a_series_and_wait_to_be_killed, args=(str(path), theirs))
    device.start()
    writer = psutil.Process(ours.recv())
    os.kill(device.pid, signal.SIGKILL)
    device.join()
    writer.wait(30)  # it notices, closes the series and exits (psutil.TimeoutExpired if not)
    with h5py.File(path, "r") as f:  # closed normally: no flags to clear
        np.testing.assert_array_equal(f["/entry/data/data"][()], random_frames(10, SHAPE))
        assert f["/entry/saving_status"][()].endswith(b"series ended: the device process ended")


def test_a_series_that_cannot_be_saved_is_reported_and_the_next_one_is(tmp_path):
    frames = random_frames(10, SHAPE)
    recorder = Recorder()
    precious = tmp_path / "taken.h5"
    precious.write_bytes(b"someone's data")
    with BlobStacks(2, 10, 2048) as stacks:
        recorder._release = stacks.release
        with SeriesWriterProcess(on_stack_done=recorder.stack_done, on_answer=recorder.answer) as writer:
            writer.open_series(precious, spec(n_frames=10))  # not reserved: must not be overwritten
            writer.write_stack(stack_of(stacks, frames, range(10)))
            writer.close_series()
            refused = writer.wait_series_saved(20)
            # geometry left to the first stack, and no stack comes: no file, the placeholder removed
            empty = SavingLocation.create(str(tmp_path), "", "empty_{series_id}").reserve(2)
            writer.open_series(empty.path, SeriesFileSpec(series_id=2))
            writer.close_series("cancelled")
            nothing = writer.wait_series_saved(20)
            writer.open_series(tmp_path / "fine.h5", spec(3, n_frames=10))
            writer.write_stack(stack_of(stacks, frames, range(10)))
            writer.close_series()
            assert writer.wait_series_saved(20).complete
    assert precious.read_bytes() == b"someone's data"
    assert refused.frames_saved == 0 and "exists and is not empty: not overwritten" in refused.stopped_reason
    assert isinstance(recorder.answers[0], SavingFailed) and "not overwritten" in recorder.answers[0].reason
    assert len(recorder.done) == 2
    assert "no frame arrived" in nothing.stopped_reason and not empty.path.exists()
