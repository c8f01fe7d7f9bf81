"""Round trips through the compiled receiver: every decoded frame equals what was sent."""
from __future__ import annotations

import numpy as np
import pytest

from tango_dectris_live.receiver import FrameStackHandle, SeriesStarted, StreamReceiver, decode_frames_into
from tango_dectris_live.testing.stream_producer import StreamProducer, collect_series, random_frames

SHAPE = (24, 40)


def _round_trip(version: int, frames: np.ndarray, encoding: str, *, coalesce: float = 200e-6,
                transport: str = "auto", **series_kwargs) -> tuple:
    with StreamProducer(version) as producer, StreamReceiver(
            producer.endpoint, stream_version=version, frame_shape=frames.shape[1:], dtype=frames.dtype,
            frame_stack_size=8, num_slots=4, coalesce=coalesce, transport=transport) as receiver:
        receiver.arm(3)
        producer.send_all(producer.series(3, frames, encoding, **series_kwargs))
        summary, received, events = collect_series(receiver, decode_frames_into, frames.dtype.name)
        stats = receiver.stats()
    return summary, received, events, stats


@pytest.mark.parametrize("transport", ["zmtp", "libzmq"])
@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("encoding", ["bslz4", "lz4", "none"])
@pytest.mark.parametrize("dtype", ["uint8", "uint16", "uint32"])
def test_every_frame_round_trips(version, encoding, dtype, transport):
    frames = random_frames(20, SHAPE, dtype, seed=version)
    summary, received, events, stats = _round_trip(version, frames, encoding, transport=transport)
    assert stats.transport == transport
    assert summary.end_reason == "complete"
    assert summary.missing == 0 and summary.frames_received == 20
    assert sorted(received) == list(range(20))
    for number, frame in received.items():
        np.testing.assert_array_equal(frame, frames[number])
    assert isinstance(events[0], SeriesStarted) and events[0].header.series_id == 3
    assert stats.frames_received == 20 and stats.error_count == 0


@pytest.mark.parametrize("transport", ["zmtp", "libzmq"])
@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("coalesce", [0.0, 0.002])
def test_frames_round_trip_with_and_without_napping(version, coalesce, transport):
    # 0: woken whenever something arrives; 2 ms: long naps while the stream flows
    frames = random_frames(300, SHAPE, "uint16", seed=7)
    summary, received, _, stats = _round_trip(version, frames, "bslz4", coalesce=coalesce, transport=transport)
    assert summary.end_reason == "complete" and summary.missing == 0
    assert sorted(received) == list(range(300))
    np.testing.assert_array_equal(np.stack([received[n] for n in range(300)]), frames)
    assert stats.error_count == 0


def test_coalesce_out_of_range_is_refused():
    for bad in (-1e-6, 0.5):
        with pytest.raises(ValueError, match="coalesce"):
            StreamReceiver("tcp://127.0.0.1:1", coalesce=bad)


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("detail", ["all", "basic", "none"])
def test_header_detail_and_appendices(version, detail):
    frames = random_frames(9, SHAPE, "uint16")
    appendix = '{"acqID": "test_1"}'
    summary, received, events, _stats = _round_trip(
        version, frames, "bslz4", detail=detail, header_appendix=appendix, image_appendix="frame-note")
    assert events[0].header.appendix == appendix
    assert sorted(received) == list(range(9))
    assert all(np.array_equal(received[i], frames[i]) for i in range(9))
    if version == 1 and detail == "none":
        # no config part: the frame count is unknown, so the end message ends the series
        assert summary.end_reason == "end_message" and summary.expected_frames is None
    else:
        assert summary.end_reason == "complete" and summary.expected_frames == 9
    assert summary.missing == 0


def test_handle_describes_its_stack_and_pickles():
    import pickle

    frames = random_frames(20, SHAPE, "uint16")
    _summary, _received, events, _stats = _round_trip(2, frames, "bslz4")
    handles = [event.handle for event in events if hasattr(event, "handle")]
    assert [h.frames for h in handles] == [8, 8, 4]
    assert [(h.first_frame, h.last_frame) for h in handles] == [(0, 7), (8, 15), (16, 19)]
    copy = pickle.loads(pickle.dumps(handles[0]))
    assert isinstance(copy, FrameStackHandle) and copy == handles[0]
    assert handles[0].shape == SHAPE and handles[0].dtype == "uint16" and handles[0].encoding == "bslz4"


def test_multi_channel_v2_frames_keep_every_channel():
    frames = random_frames(6, SHAPE, "uint16", seed=4)
    second = random_frames(6, SHAPE, "uint16", seed=5)
    channels = ("threshold_1", "threshold_2")
    with StreamProducer(2) as producer, StreamReceiver(producer.endpoint, stream_version=2,
                                                       frame_shape=SHAPE) as receiver:
        receiver.arm(1)
        producer.send(producer.header(1, nimages=6, shape=SHAPE, channels=channels))
        for i in range(6):
            producer.send(producer.image(1, i, [frames[i], second[i]], channels=channels))
        seen = {}
        while True:
            event = receiver.next_event(10)
            assert event is not None
            if hasattr(event, "handle"):
                handle = event.handle
                assert set(handle.index()["channels"]) == {2}
                for channel, source in ((0, frames), (1, second)):
                    out = np.zeros((handle.frames, *SHAPE), np.uint16)
                    numbers = decode_frames_into(handle, 0, handle.frames, out, channel=channel)
                    for number, frame in zip(numbers, out):
                        np.testing.assert_array_equal(frame, source[number])
                        seen[(channel, int(number))] = True
                receiver.release(handle)
            elif hasattr(event, "summary"):
                break
    assert len(seen) == 12


def test_decode_into_float_and_partial_range():
    frames = random_frames(8, SHAPE, "uint16")
    with StreamProducer(1) as producer, StreamReceiver(producer.endpoint, frame_shape=SHAPE,
                                                       frame_stack_size=8) as receiver:
        receiver.arm(2)
        producer.send_all(producer.series(2, frames))
        event = receiver.next_event(10)
        while not hasattr(event, "handle"):
            event = receiver.next_event(10)
        out = np.zeros((3, *SHAPE), np.float32)
        numbers = decode_frames_into(event.handle, 2, 5, out)
        np.testing.assert_array_equal(numbers, [2, 3, 4])
        np.testing.assert_array_equal(out, frames[2:5].astype(np.float32))
        with pytest.raises(ValueError, match="needs"):
            decode_frames_into(event.handle, 0, 2, out)
        receiver.release(event.handle)
