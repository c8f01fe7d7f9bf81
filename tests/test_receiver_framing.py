"""Stream v1 taken by content, whatever the ZeroMQ message boundaries (stream/v1_framing.py and the
receiver's routing): a DCU's one multipart message per v1 message, every part alone, LiberTEM-live's
zmqdump replay, parts regrouped across message boundaries; through both transports."""
from __future__ import annotations

import json

import numpy as np
import pytest

from tango_dectris_live.receiver import SeriesStarted, StreamReceiver, decode_frames_into
from tango_dectris_live.stream import decode_frame, parse_v1_message
from tango_dectris_live.testing.stream_producer import (FRAMINGS, StreamProducer, collect_series, random_frames,
                                                       reframe)

SHAPE = (16, 24)
TRANSPORTS = ("zmtp", "libzmq")
HEADER_APPENDIX = '{"acqID": "test_1"}'


def _receiver(producer: StreamProducer, transport: str, **kwargs) -> StreamReceiver:
    options = {"frame_shape": SHAPE, "frame_stack_size": 4, "num_slots": 4, "transport": transport, **kwargs}
    return StreamReceiver(producer.endpoint, **options)


def _check_series(receiver: StreamReceiver, series: int, frames: np.ndarray, detail: str, appendix: str | None):
    summary, received, events = collect_series(receiver, decode_frames_into)
    started = events[0]
    assert isinstance(started, SeriesStarted)
    header = started.header
    assert (header.series_id, header.header_detail, header.appendix) == (series, detail, appendix)
    if detail == "none":  # no config: the frame count is unknown, the end message ends the series
        assert summary.end_reason == "end_message" and summary.expected_frames is None
    else:
        assert header.shape == SHAPE and header.number_of_images == len(frames)
        assert summary.end_reason == "complete" and summary.expected_frames == len(frames)
    if detail == "all":
        assert header.flatfield[""].shape == SHAPE and header.pixel_mask[""].shape == SHAPE
        assert header.countrate_table.shape == (4, 2)
    assert summary.missing == 0 and summary.frames_received == len(frames)
    assert sorted(received) == list(range(len(frames)))
    np.testing.assert_array_equal(np.stack([received[i] for i in range(len(frames))]), frames)
    assert sum(isinstance(event, SeriesStarted) for event in events) == 1


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("framing", FRAMINGS)
@pytest.mark.parametrize("detail", ["none", "basic", "all"])
@pytest.mark.parametrize("appendices", [False, True], ids=["plain", "appendices"])
def test_series_is_taken_whatever_the_framing(transport, framing, detail, appendices):
    header_appendix = HEADER_APPENDIX if appendices else None
    image_appendix = "frame-note" if appendices else None
    first, second = random_frames(9, SHAPE, seed=1), random_frames(6, SHAPE, seed=2)
    with StreamProducer(1) as producer, _receiver(producer, transport) as receiver:
        for series, frames in ((3, first), (4, second)):
            receiver.arm(series)
            messages = producer.series(series, frames, detail=detail, header_appendix=header_appendix,
                                       image_appendix=image_appendix)
            producer.send_all(reframe(messages, framing))
            _check_series(receiver, series, frames, detail, header_appendix)
        stats = receiver.stats()
    # nothing counted: series 3's end message (read at arm(4)) was recognised as the expected one
    assert dict(stats.errors) == {} and stats.frames_received == 15
    assert stats.series_finished == 2 and stats.transport == transport


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_framings_mixed_in_one_passive_session(transport):
    sent = {series: random_frames(5 + series % 3, SHAPE, seed=series) for series in range(10, 10 + len(FRAMINGS))}
    with StreamProducer(1) as producer, _receiver(producer, transport) as receiver:
        receiver.listen()
        for (series, frames), framing in zip(sent.items(), FRAMINGS):
            producer.send_all(reframe(producer.series(series, frames, header_appendix=HEADER_APPENDIX), framing))
        for series, frames in sent.items():
            _check_series(receiver, series, frames, "basic", HEADER_APPENDIX)
        assert dict(receiver.stats().errors) == {}


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_header_whose_config_part_never_comes_is_counted_and_the_next_series_works(transport):
    frames = random_frames(4, SHAPE, seed=5)
    with StreamProducer(1) as producer, _receiver(producer, transport) as receiver:
        receiver.listen()
        broken = producer.series(3, frames)
        producer.send([broken[0][0]])  # the dheader part alone; its config part never comes
        producer.send_all(broken[1:])  # the images (each one multipart message) and the end
        producer.send_all(reframe(producer.series(4, frames), "single_parts"))
        _check_series(receiver, 4, frames, "basic", None)
        errors = dict(receiver.stats().errors)
    # series 3 never started: its 4 images had no header, its end is of no series being received
    assert errors == {"incomplete_header": 1, "no_header": 4, "stale": 1}


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_image_cut_short_by_the_next_message_is_counted_as_truncated(transport):
    frames = random_frames(5, SHAPE, seed=6)
    with StreamProducer(1) as producer, _receiver(producer, transport) as receiver:
        receiver.arm(3)
        messages = producer.series(3, frames)
        cut = [part for message in messages for part in message]
        del cut[1 + 2 * 4 + 2:1 + 2 * 4 + 4]  # frame 2 loses its blob and dconfig parts
        producer.send_all([[part] for part in cut])
        summary, received, _events = collect_series(receiver, decode_frames_into)
        np.testing.assert_array_equal(summary.missing_frames, [2])
        assert summary.end_reason == "end_message" and sorted(received) == [0, 1, 3, 4]
        assert dict(receiver.stats().errors) == {"truncated": 1}


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_stray_parts_are_counted_once_per_run(transport):
    frames = random_frames(3, SHAPE, seed=7)
    with StreamProducer(1) as producer, _receiver(producer, transport) as receiver:
        receiver.listen()
        image = producer.image(3, 0, frames[0])
        producer.send(image[1:2])  # an image without its dimage part: one run of three parts,
        producer.send(image[2:])  # whatever the ZeroMQ messages, until a part starts a message
        producer.send_all(producer.series(3, frames))
        _check_series(receiver, 3, frames, "basic", None)
        assert dict(receiver.stats().errors) == {"unexpected_part": 1}
        producer.send([b"\xd9\xd9\xf7\xa1\x64typeeimage"])  # a stream v2 message
        producer.send_all(producer.series(4, frames))
        _check_series(receiver, 4, frames, "basic", None)
        assert dict(receiver.stats().errors) == {"unexpected_part": 1, "unknown_message": 1}


# ---- the real EIGER 4M capture -------------------------------------------------------------------

CAPTURE_SHAPE = (2167, 2070)


def _capture_messages(testdata) -> list[list[bytes]]:
    """The capture's header (flatfield and pixel mask blobs, not stored, made at their declared
    size), its three images and its end, each a list of parts."""
    folder = testdata / "stream_v1_eiger4m"

    def part(number: int) -> bytes:
        return (folder / f"part_{number:02d}").read_bytes()

    height, width = CAPTURE_SHAPE
    index = np.arange(height * width)
    flatfield = (index % 1000).astype("<f4").tobytes()
    pixel_mask = (index % 7).astype("<u4").tobytes()
    header = [part(1), part(2), part(3), flatfield, part(5), pixel_mask, part(7), part(8), part(9)]
    images = [[part(n) for n in range(first, first + 4)] for first in (10, 14, 18)]
    return [header, *images, [part(22)]]


def _take_capture(messages: list[list[bytes]], framing: str, transport: str):
    with StreamProducer(1) as producer, StreamReceiver(
            producer.endpoint, frame_shape=CAPTURE_SHAPE, frame_stack_size=4, num_slots=2,
            transport=transport) as receiver:
        receiver.arm(6)
        producer.send_all(reframe(messages, framing))
        summary, received, events = collect_series(receiver, decode_frames_into)
        return summary, received, events[0].header, receiver.stats()


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("framing", ["single_parts", "libertem_sim", "regrouped"])
def test_real_capture_split_is_taken_as_its_multipart_framing(testdata, transport, framing):
    messages = _capture_messages(testdata)
    reference = _take_capture(messages, "multipart", transport)
    split = _take_capture(messages, framing, transport)
    for summary, received, header, stats in (reference, split):
        assert header.series_id == 6 and header.header_detail == "all"
        assert header.appendix == '{"acqID": "test_1"}'
        assert header.config == json.loads(messages[0][1]) and header.flatfield[""].shape == CAPTURE_SHAPE
        assert summary.end_reason == "end_message" and sorted(received) == [0, 1, 2]
        np.testing.assert_array_equal(summary.missing_frames, np.arange(3, 10))  # nimages is 10
        assert dict(stats.errors) == {} and stats.frames_received == 3
    summary, received, header, _stats = split
    np.testing.assert_array_equal(header.flatfield[""], reference[2].flatfield[""])
    np.testing.assert_array_equal(header.countrate_table, reference[2].countrate_table)
    for number in range(3):
        np.testing.assert_array_equal(received[number], reference[1][number])
    # and what the receiver stored decodes to the capture's own frame
    frame0 = decode_frame(parse_v1_message(messages[1]))
    np.testing.assert_array_equal(received[0], frame0)


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("framing, to_python", [("multipart", 2), ("libertem_sim", 3)])
def test_images_of_one_multipart_message_each_stay_on_the_compiled_path(transport, framing, to_python):
    """Only what needs Python goes there: the header (its parts), and the first image, whose
    dimage_d part the C loop learns from; every other image is placed by the C loop itself."""
    frames = random_frames(12, SHAPE, seed=8)
    with StreamProducer(1) as producer, _receiver(producer, transport) as receiver:
        handed_to_python = []
        take_in_python = receiver._on_message
        receiver._on_message = lambda parts, kind: (handed_to_python.append(len(parts)),
                                                    take_in_python(parts, kind))
        receiver.arm(3)
        producer.send_all(reframe(producer.series(3, frames), framing))
        _check_series(receiver, 3, frames, "basic", None)
    assert len(handed_to_python) == to_python, handed_to_python
