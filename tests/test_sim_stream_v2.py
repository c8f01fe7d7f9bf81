"""Stream v2 (CBOR) of the simulator's sink, held against the real EIGER2 16M capture."""
from __future__ import annotations

import dataclasses
import json
import threading
from collections.abc import Mapping
from datetime import datetime

import cbor2
import dectris.compression
import numpy as np
import pytest

from sim import encode
from tests.test_sim_stream_v1 import make_series, stream_under_test

V2_CAPTURE = "stream_v2_eiger2_16m"
DTYPE_OF_TAG = {64: "<u1", 69: "<u2", 70: "<u4", 85: "<f4"}


def raw_tags(data: bytes):
    """Decode keeping every tag as a CBORTag, to compare structure (cbor2 itself strips the
    self-describe tag 55799 and turns tag 0 into a datetime)."""
    return cbor2.loads(data, tag_hook=lambda tag, immutable=False: tag)


def decode_multidim(tag: cbor2.CBORTag) -> np.ndarray:
    assert tag.tag == 40
    (height, width), typed = tag.value
    dtype = np.dtype(DTYPE_OF_TAG[typed.tag])
    payload = typed.value
    if isinstance(payload, cbor2.CBORTag):
        assert payload.tag == 56500
        algorithm, elem_size, blob = payload.value
        payload = dectris.compression.decompress(blob, algorithm, elem_size=elem_size)
    return np.frombuffer(payload, dtype=dtype).reshape(height, width)


def structure(value):
    """Tags, key order and types of a decoded message, with values left out."""
    if isinstance(value, cbor2.CBORTag):
        return ("tag", value.tag, structure(value.value))
    if isinstance(value, Mapping):  # a dict, or cbor2's frozendict inside tag 55799
        return {k: structure(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [structure(v) for v in value]
    if isinstance(value, bytes):
        return "bytes"
    return type(value).__name__


@pytest.mark.parametrize("fast_path", [False, True])
def test_v2_image_and_end_match_the_real_capture(testdata, fast_path):
    real_image = (testdata / V2_CAPTURE / "image.cbor").read_bytes()
    real_end = (testdata / V2_CAPTURE / "end.cbor").read_bytes()
    series = make_series("cbor", nimages=4, width=36, height=20)
    with stream_under_test("cbor", fast_path=fast_path) as stream:
        messages = stream.run_series(series)
    assert all(len(m) == 1 and m[0].startswith(b"\xd9\xd9\xf7") for m in messages)
    start, *images, end = (m[0] for m in messages)
    assert len(images) == 4
    real = raw_tags(real_image)
    for number, image in enumerate(images):
        ours = raw_tags(image)
        assert image[:3] == real_image[:3] == b"\xd9\xd9\xf7"
        assert structure(ours) == structure(real)
        assert list(ours) == list(real)
        assert ours["image_id"] == number
        assert list(ours["data"]["threshold_1"].value[0]) == [20, 36]
        start_ticks, stop_ticks = ours["start_time"][0], ours["stop_time"][0]
        assert stop_ticks - start_ticks == ours["real_time"][0] == 50_000
        assert start_ticks == number * 55_000
    assert structure(raw_tags(end)) == structure(raw_tags(real_end))
    assert raw_tags(end) == {"type": "end", "series_id": 7,
                                   "series_unique_id": "01HBV3JPF9T4ZDPADX6EMK6XMZ"}


def test_v2_start_message_key_order_and_types(testdata):
    real_start = cbor2.loads((testdata / V2_CAPTURE / "start.cbor").read_bytes())
    series = make_series("cbor", header_detail="basic", nimages=1,
                         detector_config={"chi_start": 30.0, "chi_increment": 0.0})
    with stream_under_test("cbor") as stream:
        start = stream.run_series(series)[0][0]
    ours = cbor2.loads(start)
    assert list(ours)[:4] == ["type", "series_id", "series_unique_id", "arm_date"]
    assert list(ours)[4:] == sorted(list(ours)[4:])
    assert isinstance(ours["arm_date"], datetime)
    # basic: no big arrays; everything else the capture has is present with the same type
    missing = set(real_start) - set(ours) - {"flatfield", "pixel_mask", "countrate_correction_lookup_table"}
    assert not missing
    for key in set(real_start) & set(ours):
        assert structure(ours[key]) == structure(real_start[key]) or key in ("goniometer", "threshold_energy"), key
    assert ours["image_size_x"] == 40 and ours["image_size_y"] == 24
    assert structure(ours["threshold_energy"]) == structure(real_start["threshold_energy"])
    assert list(ours["channels"]) == ["threshold_1"] and ours["image_dtype"] == "uint16"
    assert structure(ours["goniometer"]["chi"]) == structure(real_start["goniometer"]["chi"])
    assert dict(ours["goniometer"]["chi"]) == {"increment": 0.0, "start": 30.0}


def test_v2_header_detail_all_has_flatfield_and_mask_per_channel():
    series = make_series("cbor", header_detail="all", nimages=1, header_appendix="user header")
    with stream_under_test("cbor") as stream:
        start = raw_tags(stream.run_series(series)[0][0])
        truth = stream.sink.generator_for(series)
    assert start["user_data"] == "user header"
    np.testing.assert_array_equal(decode_multidim(start["pixel_mask"]["threshold_1"]), truth.pixel_mask())
    assert start["flatfield"]["threshold_1"].value[1].tag == 85
    assert start["countrate_correction_lookup_table"].tag == 70


@pytest.mark.parametrize("fast_path", [False, True])
@pytest.mark.parametrize("compression", ["bslz4", "lz4", "none"])
@pytest.mark.parametrize("bit_depth", [8, 16, 32])
def test_every_v2_frame_decodes_to_ground_truth(compression, bit_depth, fast_path):
    series = make_series("cbor", compression=compression, bit_depth=bit_depth, nimages=5, width=29, height=13,
                         image_appendix="img-user")
    with stream_under_test("cbor", fast_path=fast_path, pool_size=3) as stream:
        messages = stream.run_series(series)
        truth = stream.sink.generator_for(series)
    images = [raw_tags(m[0]) for m in messages[1:-1]]
    assert len(images) == 5
    for number, image in enumerate(images):
        assert image["image_id"] == number and image["user_data"] == "img-user"
        array = image["data"]["threshold_1"]
        typed = array.value[1]
        if compression == "none":
            assert isinstance(typed.value, bytes)
        else:
            assert list(typed.value.value[:2]) == [compression, bit_depth // 8 if compression == "bslz4" else 0]
        np.testing.assert_array_equal(decode_multidim(array), truth.frame(number))


def test_two_thresholds_send_two_channels():
    series = make_series("cbor", nimages=3, detector_config={"threshold/2/mode": "enabled"})
    with stream_under_test("cbor") as stream:
        messages = stream.run_series(series)
        truth = stream.sink.generator_for(series)
    start = cbor2.loads(messages[0][0])
    assert list(start["channels"]) == ["threshold_1", "threshold_2"]
    for number, message in enumerate(messages[1:-1]):
        data = raw_tags(message[0])["data"]
        assert list(data) == ["threshold_1", "threshold_2"]
        np.testing.assert_array_equal(decode_multidim(data["threshold_1"]), truth.frame(number))
        np.testing.assert_array_equal(decode_multidim(data["threshold_2"]), truth.high_threshold_frame(number))


def test_v2_fast_and_python_paths_send_identical_bytes():
    series = make_series("cbor", nimages=30, header_detail="none")
    results = []
    for fast_path in (False, True):
        with stream_under_test("cbor", fast_path=fast_path, pool_size=4) as stream:
            stream.sink.start_series(series)
            stream.sink.send_frames(series, 0, 30, 0.0, threading.Event())
            date = stream.sink._current.series_date
            stream.sink.end_series(series)
            # The series date is the time of the first trigger: take it out of the comparison.
            results.append([m[0].replace(date.encode(), b"DATE") for m in stream.collect()])
    assert results[0] == results[1]


def test_reencoding_the_captured_v2_frame_is_byte_identical(testdata):
    blob = (testdata / V2_CAPTURE / "frame_bslz4_uint16_4148x4362.bin").read_bytes()
    raw = dectris.compression.decompress(blob, "bslz4", elem_size=2)
    frame = np.frombuffer(raw, dtype="<u2").reshape(4362, 4148)
    encoded = encode.encode_frame(frame, "bslz4", "cbor")
    assert encoded.v2_blob == blob
    # The captured image message holds another frame: re-encoding it gives the whole
    # MultiDimArray byte for byte (it is the last item of the message).
    real_image = (testdata / V2_CAPTURE / "image.cbor").read_bytes()
    captured = decode_multidim(raw_tags(real_image)["data"]["threshold_1"])
    assert real_image.endswith(cbor2.dumps(encode.v2_image_array(encode.encode_frame(captured, "bslz4", "cbor"))))


def test_lz4_hdf5_framing_stores_incompressible_blocks_raw():
    sentence = b"The quick brown fox jumps over the lazy dog, again and again and again!!"
    assert len(sentence) == 72
    framed = encode.compress_lz4_hdf5(sentence, block_bytes=64)
    assert framed[:12] == (72).to_bytes(8, "big") + (64).to_bytes(4, "big")
    assert framed[12:16] == (64).to_bytes(4, "big") and framed[16:80] == sentence[:64]
    assert framed[80:84] == (8).to_bytes(4, "big") and framed[84:] == sentence[64:]
    assert dectris.compression.decompress(framed, "lz4") == sentence


def _rational_ticks(value) -> int:
    """Ticks of a v2 rational [ticks, 50 MHz timebase]."""
    ticks, timebase = value
    assert timebase == encode.V2_TIMEBASE
    return ticks


@pytest.mark.parametrize("stream_format", ["legacy", "cbor"])
def test_inte_trigger_count_time_is_the_images_real_time(stream_format):
    """inte: each trigger's value is that image's exposure, in v1 dconfig (ns) and v2 (ticks)."""
    series = make_series(stream_format, nimages=1)
    series = dataclasses.replace(series, trigger_mode="inte", ntrigger=3)
    exposures = [0.002, 0.0005, 0.004]
    with stream_under_test(stream_format) as stream:
        stream.sink.start_series(series)
        for frame, exposure in enumerate(exposures):
            stream.sink.send_frames(dataclasses.replace(series, count_time=exposure), frame, 1,
                                    exposure, threading.Event())
        stream.sink.end_series(series)
        messages = stream.collect()
    images = messages[1:-1]
    assert len(images) == 3
    starts = []
    for message, exposure in zip(images, exposures):
        if stream_format == "legacy":
            dconfig = json.loads(message[3])
            real, start, stop, unit = dconfig["real_time"], dconfig["start_time"], dconfig["stop_time"], 1e9
        else:
            image = cbor2.loads(message[0])
            real, start, stop = (_rational_ticks(image[k]) for k in ("real_time", "start_time", "stop_time"))
            unit = encode.V2_TIMEBASE
        assert real == round(exposure * unit)
        assert stop - start == real
        starts.append(start)
    # each image starts when its trigger came, after the previous image's exposure
    assert starts[1] - starts[0] >= round(exposures[0] * (1e9 if stream_format == "legacy" else encode.V2_TIMEBASE))
