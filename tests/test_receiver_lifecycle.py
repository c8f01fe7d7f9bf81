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
    ReceiverError,
    ReceiverMode,
    StreamReceiver,
    decode_frames_into,
)
from tango_dectris_live.receiver import _receiver
from tango_dectris_live.stream import Algorithm
from tango_dectris_live.testing.stream_producer import StreamProducer, collect_series, random_frames

SHAPE = (16, 24)


def _our_segments() -> set[str]:
    return {name for name in os.listdir("/dev/shm") if name.startswith(f"tdl_{os.getpid()}_")}


def test_compiled_constants_match_the_python_side():
    assert _receiver.FRAME_RECORD_BYTES == FRAME_RECORD_DTYPE.itemsize
    assert _receiver.ENCODING_IDS == {algorithm.value: algorithm.code for algorithm in Algorithm}


def test_layout_defaults_follow_the_geometry():
    arina = FrameStackLayout.for_frames((96, 96), "uint16")
    assert arina.bytes_per_frame == 96 * 96 * 2 // 4
    assert arina.frame_stack_size == 3640  # ~16 MiB of quarter frames (at most 4096)
    assert arina.slot_bytes % 4096 == 0 and arina.data_bytes >= 3640 * arina.bytes_per_frame
    assert arina.num_slots == 4  # as many 16 MiB slots as fit 64 MiB
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


# ---- modes: idle does not read, arm drains other series, armed times out without a header ---------

def test_header_sent_before_arm_is_kept_for_it():
    """Active mode as the device does it: the DCU's arm sends the header, then receiver.arm(N)."""
    frames = random_frames(6, SHAPE)
    with StreamProducer(1) as producer, StreamReceiver(producer.endpoint, frame_shape=SHAPE) as receiver:
        assert receiver.mode is ReceiverMode.IDLE
        producer.send_all(producer.series(3, random_frames(2, SHAPE), end=False))  # an older series
        producer.send(producer.header(9, nimages=2, shape=SHAPE))  # a newer one nobody armed for
        producer.send_all(producer.series(4, frames))
        receiver.arm(4)
        summary, received, events = collect_series(receiver, decode_frames_into)
        assert events[0].header.series_id == 4
        assert summary.end_reason == "complete" and summary.missing == 0
        assert all(np.array_equal(received[i], frames[i]) for i in range(6))
        # series 3: header and 2 frames are older (stale); series 9's header is newer
        assert dict(receiver.stats().errors) == {"stale": 3, "wrong_series": 1}
        assert receiver.mode is ReceiverMode.IDLE  # one series, then idle


def test_cancel_goes_idle_and_keeps_later_messages_queued():
    with StreamProducer(2) as producer, StreamReceiver(producer.endpoint, stream_version=2,
                                                       frame_shape=SHAPE) as receiver:
        receiver.listen()
        receiver.cancel()
        assert receiver.mode is ReceiverMode.IDLE
        frames = random_frames(5, SHAPE, seed=8)
        producer.send_all(producer.series(8, frames))  # sent while nobody reads
        receiver.arm(8)
        summary, received, _events = collect_series(receiver, decode_frames_into)
        assert summary.series == 8 and summary.end_reason == "complete" and len(received) == 5
        assert receiver.stats().error_count == 0


def test_armed_without_header_emits_no_header_and_goes_idle():
    with StreamProducer(1) as producer, StreamReceiver(producer.endpoint, frame_shape=SHAPE,
                                                       timeout=0.3) as receiver:
        receiver.arm(12)
        event = receiver.next_event(10)
        assert isinstance(event, ReceiverError) and event.kind == "no_header"
        assert "series 12 armed but no header within 0.3 s" in event.message
        assert receiver.mode is ReceiverMode.IDLE
        assert receiver.stats().errors == {"no_header": 1}
        frames = random_frames(4, SHAPE)
        producer.send_all(producer.series(13, frames))
        receiver.arm(13)  # the next arm works
        summary, received, _events = collect_series(receiver, decode_frames_into)
        assert summary.series == 13 and summary.end_reason == "complete" and len(received) == 4


def test_listening_stays_listening_after_a_series():
    with StreamProducer(1) as producer, StreamReceiver(producer.endpoint, frame_shape=SHAPE) as receiver:
        receiver.listen()
        producer.send_all(producer.series(1, random_frames(3, SHAPE)))
        summary, _received, _events = collect_series(receiver, decode_frames_into)
        assert summary.end_reason == "complete"
        assert receiver.mode is ReceiverMode.LISTENING


def test_arm_and_timeout_refuse_bad_values():
    with StreamProducer(1) as producer, StreamReceiver(producer.endpoint, frame_shape=SHAPE) as receiver:
        for bad in (-1, "3", 2.0, True):
            with pytest.raises(ValueError, match="series id"):
                receiver.arm(bad)
        assert receiver.mode is ReceiverMode.IDLE
        for bad in (0, -1.0, "5", None):
            with pytest.raises(ValueError, match="positive number of seconds"):
                receiver.timeout = bad
        receiver.timeout = 2
        assert receiver.timeout == 2.0


def test_a_repeated_end_of_a_completed_series_is_stale():
    with StreamProducer(1) as producer, StreamReceiver(producer.endpoint, frame_shape=SHAPE) as receiver:
        receiver.listen()
        producer.send_all(producer.series(1, random_frames(3, SHAPE)))  # completes before its end
        collect_series(receiver, decode_frames_into)
        producer.send(producer.end(1))  # a second end of series 1 (the DCU's stale end)
        producer.send_all(producer.series(2, random_frames(3, SHAPE)))
        summary, _received, _events = collect_series(receiver, decode_frames_into)
        assert summary.series == 2 and receiver.stats().errors == {"stale": 1}
