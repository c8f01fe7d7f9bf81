"""Start/stop hygiene, the shared-memory layout, and decoding in another process."""
from __future__ import annotations

import multiprocessing
import os
import threading

import numpy as np
import pytest

from tango_dectris_live.receiver import (
    FRAME_RECORD_DTYPE,
    FrameStackLayout,
    StreamReceiver,
    decode_frames_into,
)
from tango_dectris_live.receiver import _receiver
from tango_dectris_live.stream import Algorithm
from tests.stream_producer import StreamProducer, collect_series, random_frames

SHAPE = (16, 24)


def _our_segments() -> set[str]:
    return {name for name in os.listdir("/dev/shm") if name.startswith(f"tdl_{os.getpid()}_")}


def test_compiled_constants_match_the_python_side():
    assert _receiver.FRAME_RECORD_BYTES == FRAME_RECORD_DTYPE.itemsize
    assert _receiver.ENCODING_IDS == {algorithm.value: algorithm.code for algorithm in Algorithm}


def test_layout_defaults_follow_the_geometry():
    arina = FrameStackLayout.for_frames((96, 96), "uint16")
    assert arina.bytes_per_frame == 96 * 96 * 2 // 4
    assert arina.frame_stack_size == 512
    assert arina.slot_bytes % 4096 == 0 and arina.data_bytes >= 512 * arina.bytes_per_frame
    big = FrameStackLayout.for_frames((4362, 4148), "uint32")
    assert big.frame_stack_size == 1
    with pytest.raises(ValueError, match="num_slots"):
        FrameStackLayout(num_slots=0, frame_stack_size=1, bytes_per_frame=1)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="stream_version"):
        StreamReceiver("tcp://127.0.0.1:1", stream_version=3)
    receiver = StreamReceiver("not-an-endpoint")
    with pytest.raises(RuntimeError, match="could not start"):
        receiver.start()
    assert not _our_segments()


def test_hundred_start_stop_cycles_leave_nothing_behind():
    threads_before = set(threading.enumerate())
    segments_before = _our_segments()
    with StreamProducer(1) as producer:
        for _ in range(100):
            receiver = StreamReceiver(producer.endpoint, frame_shape=SHAPE, num_slots=2, poll_interval=0.01)
            receiver.start()
            receiver.listen()
            receiver.stop()
            receiver.stop()  # idempotent
    assert _our_segments() == segments_before
    assert set(threading.enumerate()) == threads_before


def test_stop_after_an_error_in_the_with_block_cleans_up():
    threads_before = set(threading.enumerate())
    with pytest.raises(ZeroDivisionError):
        with StreamProducer(2) as producer, StreamReceiver(producer.endpoint, stream_version=2,
                                                           frame_shape=SHAPE) as receiver:
            receiver.arm(1)
            producer.send_all(producer.series(1, random_frames(3, SHAPE), end=False))
            assert receiver.next_event(10) is not None
            1 / 0
    assert not _our_segments()
    assert set(threading.enumerate()) == threads_before
    assert receiver.stats().series_finished == 1  # ended as "stopped"; stats stay readable after stop


def test_release_twice_is_refused():
    with StreamProducer(1) as producer, StreamReceiver(producer.endpoint, frame_shape=SHAPE) as receiver:
        receiver.arm(1)
        producer.send_all(producer.series(1, random_frames(2, SHAPE)))
        _summary, _frames, events = collect_series(receiver, decode_frames_into, release=False)
        handle = next(event.handle for event in events if hasattr(event, "handle"))
        receiver.release(handle)
        with pytest.raises(ValueError, match="released twice"):
            receiver.release(handle)


def _decode_in_worker(handle, results):
    out = np.zeros((handle.frames, *handle.shape), np.uint16)
    numbers = decode_frames_into(handle, 0, handle.frames, out)
    results.put((numbers.tolist(), out))


def test_a_worker_process_decodes_by_segment_name():
    frames = random_frames(6, SHAPE)
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    with StreamProducer(2) as producer, StreamReceiver(producer.endpoint, stream_version=2, frame_shape=SHAPE,
                                                       frame_stack_size=8) as receiver:
        receiver.arm(1)
        producer.send_all(producer.series(1, frames))
        event = receiver.next_event(10)
        while not hasattr(event, "handle"):
            event = receiver.next_event(10)
        worker = context.Process(target=_decode_in_worker, args=(event.handle, results))
        worker.start()
        numbers, decoded = results.get(timeout=60)
        worker.join(60)
        assert worker.exitcode == 0
        receiver.release(event.handle)
        assert _our_segments()  # the worker's exit did not unlink the receiver's segment
    assert numbers == list(range(6))
    np.testing.assert_array_equal(decoded, frames)
