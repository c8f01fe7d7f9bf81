"""Gaps, duplicates, disorder, bad messages, stalls, back-pressure: the receiver keeps going, and
the next acquisition on the same receiver works after each of them."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from tango_dectris_live.receiver import StreamReceiver, decode_frames_into
from tango_dectris_live.testing.stream_producer import StreamProducer, collect_series, random_frames

SHAPE = (16, 24)


@pytest.fixture(params=[1, 2], ids=["v1", "v2"])
def link(request):
    """A producer and a started receiver on the same loopback port."""
    version = request.param
    with StreamProducer(version) as producer, StreamReceiver(
            producer.endpoint, stream_version=version, frame_shape=SHAPE, frame_stack_size=4, num_slots=4,
            timeout=5.0) as receiver:
        yield producer, receiver


def _next_series_works(producer, receiver, series=50):
    frames = random_frames(6, SHAPE, seed=series)
    receiver.arm(series)
    sending = time.monotonic()
    producer.send_all(producer.series(series, frames))
    summary, received, _events = collect_series(receiver, decode_frames_into)
    assert summary.series == series and summary.end_reason == "complete" and summary.missing == 0
    # when the receiver had the series' end: after the producer began, before we read the summary
    assert sending <= summary.ended_at <= time.monotonic()
    assert all(np.array_equal(received[i], frames[i]) for i in range(6))


def test_dropped_frame_is_missing_at_its_number(link):
    producer, receiver = link
    frames = random_frames(12, SHAPE)
    receiver.arm(1)
    producer.send_all(producer.series(1, frames, order=[i for i in range(12) if i != 5]))
    summary, received, _events = collect_series(receiver, decode_frames_into)
    np.testing.assert_array_equal(summary.missing_frames, [5])
    assert summary.end_reason == "end_message"
    assert sorted(received) == [i for i in range(12) if i != 5]
    assert all(np.array_equal(received[i], frames[i]) for i in received)
    assert receiver.stats().frames_missing == 1
    _next_series_works(producer, receiver)


def test_duplicate_frame_is_counted_and_dropped(link):
    producer, receiver = link
    frames = random_frames(8, SHAPE)
    receiver.arm(1)
    producer.send_all(producer.series(1, frames, order=[0, 1, 2, 3, 3, 4, 5, 6, 7]))
    summary, received, _events = collect_series(receiver, decode_frames_into)  # raises on a double delivery
    assert summary.end_reason == "complete" and summary.missing == 0
    assert summary.errors["duplicate"] == 1
    assert receiver.stats().duplicates == 1
    assert all(np.array_equal(received[i], frames[i]) for i in range(8))
    _next_series_works(producer, receiver)


def test_reordered_frames_are_placed_by_number(link):
    producer, receiver = link
    frames = random_frames(10, SHAPE)
    order = [1, 0, 3, 2, 9, 4, 5, 8, 7, 6]
    receiver.arm(1)
    producer.send_all(producer.series(1, frames, order=order))
    summary, received, _events = collect_series(receiver, decode_frames_into)
    assert summary.missing == 0
    assert all(np.array_equal(received[i], frames[i]) for i in range(10))
    _next_series_works(producer, receiver)


def test_out_of_range_frame_is_counted(link):
    producer, receiver = link
    frames = random_frames(4, SHAPE)
    receiver.arm(1)
    producer.send(producer.header(1, nimages=4, shape=SHAPE))
    producer.send(producer.image(1, 4, frames[0]))  # frame number == expected count
    producer.send_all(producer.image(1, i, frames[i]) for i in range(4))
    summary, received, _events = collect_series(receiver, decode_frames_into)
    assert summary.errors["out_of_range"] == 1 and summary.missing == 0
    assert sorted(received) == [0, 1, 2, 3]
    _next_series_works(producer, receiver)


def test_corrupt_and_truncated_messages_are_counted(link):
    producer, receiver = link
    frames = random_frames(6, SHAPE)
    receiver.arm(1)
    producer.send(producer.header(1, nimages=6, shape=SHAPE))
    good = producer.image(1, 2, frames[2])
    if producer.version == 1:
        producer.send([b'{"frame":2,"htype":"dimage-1.0","series":1'] + good[1:])  # no closing brace
        producer.send(good[:2])  # truncated: no blob, no dconfig
        corrupt_reasons = {"truncated"}
    else:
        producer.send([good[0][: len(good[0]) // 2]])  # cut in the middle of the pixel bytes
        producer.send([b"\xd9\xd9\xf7\xa1\x64type\x65image\xff"])  # not valid CBOR
        corrupt_reasons = set()
    producer.send_all(producer.image(1, i, frames[i]) for i in range(6) if i != 2)
    producer.send(producer.end(1))
    summary, received, _events = collect_series(receiver, decode_frames_into)
    np.testing.assert_array_equal(summary.missing_frames, [2])
    errors = receiver.stats().errors
    assert sum(errors.values()) == 2, errors
    assert corrupt_reasons <= set(errors)
    _next_series_works(producer, receiver)


def test_wrong_series_is_drained_and_counted(link):
    producer, receiver = link
    frames = random_frames(6, SHAPE)
    receiver.arm(5)
    producer.send(producer.header(5, nimages=6, shape=SHAPE))
    for i in range(6):
        producer.send(producer.image(9, i, frames[i]))  # a series nobody armed for
        producer.send(producer.image(5, i, frames[i]))
    summary, received, _events = collect_series(receiver, decode_frames_into)
    assert summary.end_reason == "complete" and summary.errors["wrong_series"] == 6
    assert all(np.array_equal(received[i], frames[i]) for i in range(6))
    _next_series_works(producer, receiver)


def test_stale_end_before_header_is_ignored(link):
    producer, receiver = link
    frames = random_frames(5, SHAPE)
    receiver.arm(6)
    producer.send(producer.end(5))  # the previous series' end, arriving late
    producer.send_all(producer.series(6, frames))
    summary, received, _events = collect_series(receiver, decode_frames_into)
    assert summary.series == 6 and summary.end_reason == "complete" and len(received) == 5
    assert receiver.stats().errors == {"stale": 1}
    _next_series_works(producer, receiver)


def test_stall_mid_series_still_completes(link):
    producer, receiver = link
    frames = random_frames(10, SHAPE)
    receiver.arm(1)
    messages = producer.series(1, frames)
    producer.send_all(messages[:4])  # header + 3 frames, then the sender stalls
    first = receiver.next_event(10)
    stack = receiver.next_event(10)  # handed over by max_latency while nothing arrives
    assert stack.handle.frames == 3
    receiver.release(stack.handle)
    producer.send_all(messages[4:])
    summary, received, _events = collect_series(receiver, decode_frames_into)
    assert first.header.series_id == 1
    assert summary.end_reason == "complete" and summary.missing == 0 and len(received) == 7


@pytest.mark.parametrize("version", [1, 2])
def test_sender_gone_mid_series_ends_by_timeout(version):
    frames = random_frames(10, SHAPE)
    with StreamProducer(version) as producer, StreamReceiver(
            producer.endpoint, stream_version=version, frame_shape=SHAPE, timeout=0.3) as receiver:
        receiver.arm(1)
        producer.send_all(producer.series(1, frames, end=False)[:6])  # header + frames 0..4
        summary, received, _events = collect_series(receiver, decode_frames_into)
        assert summary.end_reason == "timeout"
        np.testing.assert_array_equal(summary.missing_frames, [5, 6, 7, 8, 9])
        assert sorted(received) == [0, 1, 2, 3, 4]
        receiver.timeout = 10.0  # no timeout may end the next series on a busy machine
        _next_series_works(producer, receiver)


def test_cancel_ends_the_series(link):
    producer, receiver = link
    frames = random_frames(10, SHAPE)
    receiver.arm(1)
    producer.send_all(producer.series(1, frames, end=False)[:3])
    assert receiver.next_event(10).header.series_id == 1
    receiver.cancel()
    summary, received, _events = collect_series(receiver, decode_frames_into)
    assert summary.end_reason == "cancelled" and summary.missing == 10 - len(received)
    _next_series_works(producer, receiver)


def test_oversize_frame_is_counted_not_fatal():
    noise = np.random.default_rng(1).integers(0, 65535, size=(3, 64, 64), dtype=np.uint16)
    with StreamProducer(1) as producer, StreamReceiver(
            producer.endpoint, frame_shape=SHAPE, frame_stack_size=2, bytes_per_frame=1024) as receiver:
        receiver.arm(1)
        producer.send_all(producer.series(1, noise, "none"))  # 8 KiB frames, 4 KiB slots
        summary, received, _events = collect_series(receiver, decode_frames_into)
        assert summary.errors["oversize"] == 3 and summary.missing == 3 and not received
        _next_series_works(producer, receiver)


@pytest.mark.parametrize("version", [1, 2])
def test_back_pressure_delivers_every_frame_exactly_once(version):
    frames = random_frames(120, SHAPE)
    with StreamProducer(version, send_hwm=4) as producer, StreamReceiver(
            producer.endpoint, stream_version=version, frame_shape=SHAPE, num_slots=2, frame_stack_size=4,
            receive_hwm=4) as receiver:
        receiver.arm(1)
        sender = threading.Thread(target=producer.send_all, args=(producer.series(1, frames), 30.0))
        sender.start()
        held = []
        received = {}
        summary = None
        while summary is None:
            event = receiver.next_event(10)
            assert event is not None
            if hasattr(event, "handle"):
                out = np.zeros((event.handle.frames, *SHAPE), np.uint16)
                for number, frame in zip(decode_frames_into(event.handle, 0, event.handle.frames, out), out):
                    assert int(number) not in received
                    received[int(number)] = frame.copy()
                held.append(event.handle)
                if len(held) == 2 and receiver.stats().backpressure_seconds == 0:
                    # both slots are with the consumer: the receiver must block until one comes back
                    deadline = time.monotonic() + 10
                    while receiver.stats().backpressure_seconds == 0:
                        assert time.monotonic() < deadline, "receiver never blocked on full slots"
                        threading.Event().wait(0.01)
                if len(held) == 2:
                    receiver.release(held.pop(0))  # release the older one only when a new one arrived
            elif hasattr(event, "summary"):
                summary = event.summary
        for handle in held:
            receiver.release(handle)
        sender.join()
        stats = receiver.stats()
    assert summary.missing == 0 and sorted(received) == list(range(120))
    assert all(np.array_equal(received[i], frames[i]) for i in range(120))
    assert stats.backpressure_seconds > 0 and stats.slots_total == 2


@pytest.mark.parametrize("version", [1, 2])
def test_passive_mode_takes_three_series_in_a_row(version):
    with StreamProducer(version) as producer, StreamReceiver(
            producer.endpoint, stream_version=version, frame_shape=SHAPE, frame_stack_size=4) as receiver:
        receiver.listen()
        sent = {series: random_frames(5 + series % 3, SHAPE, seed=series) for series in (40, 41, 42)}
        for series, frames in sent.items():
            producer.send_all(producer.series(series, frames))
        for series, frames in sent.items():
            summary, received, _events = collect_series(receiver, decode_frames_into)
            assert summary.series == series and summary.missing == 0
            assert all(np.array_equal(received[i], frames[i]) for i in range(len(frames)))
        assert receiver.stats().series_finished == 3 and receiver.stats().error_count == 0


def test_header_of_a_new_series_supersedes_an_unfinished_one():
    with StreamProducer(1) as producer, StreamReceiver(producer.endpoint, frame_shape=SHAPE) as receiver:
        receiver.listen()
        first = random_frames(6, SHAPE)
        producer.send_all(producer.series(1, first, end=False)[:4])
        producer.send_all(producer.series(2, first))
        summary, _received, _events = collect_series(receiver, decode_frames_into)
        assert summary.series == 1 and summary.end_reason == "superseded"
        np.testing.assert_array_equal(summary.missing_frames, [3, 4, 5])
        summary, received, _events = collect_series(receiver, decode_frames_into)
        assert summary.series == 2 and summary.end_reason == "complete" and len(received) == 6
