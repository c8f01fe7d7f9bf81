"""Stream v2 (CBOR) parsing: the real EIGER2 16M capture and synthetic messages."""
from __future__ import annotations

import struct
from collections import Counter
from contextlib import contextmanager

import bitshuffle
import cbor2
import lz4.block
import numpy as np
import pytest
from cbor2 import CBORTag

from tango_dectris_live.stream import (
    CBOR_SIGNATURE,
    Algorithm,
    CorruptFrameError,
    FrameSizeMismatchError,
    ImageFrame,
    MalformedMessageError,
    SeriesEnd,
    SeriesHeader,
    StreamFormatError,
    UnknownMessageError,
    UnsupportedEncodingError,
    decode_frame,
    parse_v2_message,
)

CAPTURE_SHAPE = (4362, 4148)  # (height, width)
CAPTURE_UNIQUE_ID = "01HBV3JPF9T4ZDPADX6EMK6XMZ"
TYPED_ARRAY_TAGS = {"|u1": 64, ">u2": 65, "<u2": 69, "<u4": 70, "<i4": 78, "<f4": 85, "<f8": 86}


def capture(testdata, name: str) -> bytes:
    return (testdata / "stream_v2_eiger2_16m" / name).read_bytes()


@contextmanager
def raises_with_reason(error_class, reason):
    """pytest.raises that also checks the machine-usable ``reason`` the receiver counts by."""
    with pytest.raises(error_class) as info:
        yield info
    assert isinstance(info.value, StreamFormatError)
    assert info.value.reason == reason


# --- CBOR builders --------------------------------------------------------------------------------

def bslz4_bytes(pixels: np.ndarray) -> bytes:
    return struct.pack(">QI", pixels.nbytes, 8192) + bitshuffle.compress_lz4(pixels).tobytes()


def lz4h5_bytes(raw: bytes, block_size: int) -> bytes:
    """HDF5 filter 32004 framing; a block that LZ4 does not shrink is stored raw."""
    out = [struct.pack(">QI", len(raw), block_size)]
    for start in range(0, len(raw), block_size):
        block = raw[start:start + block_size]
        packed = lz4.block.compress(block, store_size=False)
        if len(packed) >= len(block):
            packed = block
        out.append(struct.pack(">I", len(packed)) + packed)
    return b"".join(out)


def typed_array(pixels: np.ndarray, payload=None) -> CBORTag:
    tag = TYPED_ARRAY_TAGS[pixels.dtype.str]
    return CBORTag(tag, pixels.tobytes() if payload is None else payload)


def multidim(pixels: np.ndarray, payload=None, *, column_major: bool = False) -> CBORTag:
    """Tag 40 (dims [height, width]) or 1040 around a typed array."""
    if column_major:
        return CBORTag(1040, [list(pixels.shape), typed_array(pixels, payload or pixels.tobytes(order="F"))])
    return CBORTag(40, [list(pixels.shape), typed_array(pixels, payload)])


def bslz4_multidim(pixels: np.ndarray) -> CBORTag:
    return multidim(pixels, CBORTag(56500, ["bslz4", pixels.itemsize, bslz4_bytes(pixels)]))


def v2_message(fields: dict, *, signature: bool = True) -> bytes:
    encoded = cbor2.dumps(fields)
    return CBOR_SIGNATURE + encoded if signature else encoded


def image_fields(data: dict, **extra) -> dict:
    return {
        "type": "image", "series_id": 4, "series_unique_id": "01ABC", "image_id": 7,
        "real_time": [1000, 100000], "series_date": CBORTag(0, "2024-01-02T03:04:05.678+01:00"),
        "start_time": [2000, 100000], "stop_time": [3000, 100000], "data": data, **extra,
    }


# --- the real capture -----------------------------------------------------------------------------

def test_capture_image(testdata):
    image = parse_v2_message(capture(testdata, "image.cbor"))

    assert isinstance(image, ImageFrame)
    assert (image.series_id, image.unique_id, image.frame_number) == (15614, CAPTURE_UNIQUE_ID, 0)
    assert image.shape == CAPTURE_SHAPE
    assert image.dtype == np.uint16
    assert image.encoding.algorithm is Algorithm.BSLZ4 and image.encoding.elem_size == 2
    assert image.channels == ("threshold_1",)
    assert image.real_time == pytest.approx(215873 / 50e6)
    assert image.stop_time == pytest.approx(215873 / 50e6)
    assert image.start_time == 0.0
    assert image.raw_times["real_time"] == (215873, 50000000)
    assert image.series_date == "2023-10-03T17:47:49.434+02:00"
    # Still compressed: the bslz4 header states the full frame size.
    assert len(image.blob) == 513082
    assert struct.unpack(">QI", bytes(image.blob[:12])) == (4362 * 4148 * 2, 8192)


def test_capture_image_decodes_with_the_masked_pixel_count(testdata):
    pixels = decode_frame(parse_v2_message(capture(testdata, "image.cbor")))
    assert pixels.shape == CAPTURE_SHAPE and pixels.dtype == np.uint16
    assert int((pixels == 65535).sum()) == 1_253_075  # SIMPLON.md §4.6


def test_capture_end(testdata):
    assert parse_v2_message(capture(testdata, "end.cbor")) == SeriesEnd(15614, CAPTURE_UNIQUE_ID)


def test_capture_start(testdata):
    warning_counts = Counter()
    header = parse_v2_message(capture(testdata, "start.cbor"), warning_counts=warning_counts)

    assert isinstance(header, SeriesHeader)
    assert (header.series_id, header.unique_id) == (15614, CAPTURE_UNIQUE_ID)
    assert header.header_detail is None
    assert header.shape == CAPTURE_SHAPE
    assert header.dtype is None  # image_dtype only exists from 2024.1 on
    assert header.channels == ("threshold_1",)
    assert header.number_of_images == 1
    assert header.count_time == pytest.approx(0.004317472232502031)
    assert header.beam_center == pytest.approx((2049.3840906675064, 2163.621048575148))
    assert header.flatfield_enabled and header.pixel_mask_enabled and header.countrate_correction_enabled
    assert header.config["arm_date"] == "2023-10-03T17:47:48.329000+02:00"
    assert header.config["threshold_energy"]["threshold_2"] == pytest.approx(18900.42, abs=0.01)
    assert header.config["goniometer"]["omega"]["increment"] == pytest.approx(0.1)
    # The source project replaced the arrays by 4-byte placeholders and re-encoded the message
    # without the 55799 prefix: both are accepted and counted.
    assert not header.flatfield and not header.pixel_mask and header.countrate_table is None
    assert warning_counts == {"untyped_array": 3, "missing_cbor_signature": 1}


def test_capture_start_rejected_when_the_signature_is_required(testdata):
    with raises_with_reason(MalformedMessageError, "missing_cbor_signature"):
        parse_v2_message(capture(testdata, "start.cbor"), require_signature=True)


# --- synthetic messages ---------------------------------------------------------------------------

def test_start_message_arrays_are_decoded_eagerly():
    flatfield = np.linspace(0.5, 1.5, 12, dtype=np.float32).reshape(3, 4)
    mask = np.array([[0, 1, 0, 0], [0, 0, 0, 16], [2, 0, 0, 0]], dtype=np.uint32)
    table = np.array([0, 10, 20, 30], dtype=np.uint32)
    fields = {
        "type": "start", "series_id": 9, "series_unique_id": "01XYZ", "arm_date": CBORTag(0, "2024-05-01T00:00:00Z"),
        "channels": ["threshold_1", "threshold_2"], "image_size_x": 4, "image_size_y": 3, "image_dtype": "uint32",
        "flatfield": {"threshold_1": multidim(flatfield), "threshold_2": multidim(flatfield * 2)},
        "pixel_mask": {"threshold_1": bslz4_multidim(mask), "threshold_2": multidim(mask)},
        "countrate_correction_lookup_table": typed_array(table),
        "user_data": {"proposal": 1234}, "frame_time": 0.01, "number_of_images": 100,
    }
    header = parse_v2_message(v2_message(fields))

    assert header.dtype == np.uint32 and header.shape == (3, 4)
    assert header.channels == ("threshold_1", "threshold_2")
    np.testing.assert_array_equal(header.flatfield["threshold_2"], flatfield * 2)
    np.testing.assert_array_equal(header.pixel_mask["threshold_1"], mask)
    np.testing.assert_array_equal(header.pixel_mask["threshold_2"], mask)
    np.testing.assert_array_equal(header.countrate_table, table)
    assert header.appendix == {"proposal": 1234}
    assert header.config["arm_date"] == "2024-05-01T00:00:00Z"
    assert "flatfield" not in header.config and "user_data" not in header.config


def test_multi_channel_image():
    low = np.arange(20, dtype=np.uint16).reshape(4, 5)
    high = (low * 3).astype(np.uint16)
    image = parse_v2_message(v2_message(image_fields({"threshold_1": bslz4_multidim(low), "threshold_2": bslz4_multidim(high)})))

    assert image.channels == ("threshold_1", "threshold_2")
    assert len(image.data) == 2
    np.testing.assert_array_equal(decode_frame(image), low)
    np.testing.assert_array_equal(decode_frame(image, "threshold_2"), high)
    np.testing.assert_array_equal(decode_frame(image, 1), high)
    with pytest.raises(KeyError, match="difference"):
        decode_frame(image, "difference")


def test_image_fields():
    pixels = np.ones((2, 3), dtype=np.uint8)
    image = parse_v2_message(v2_message(image_fields({"threshold_1": multidim(pixels)}, user_data="scan 3")))
    assert (image.series_id, image.unique_id, image.frame_number) == (4, "01ABC", 7)
    assert (image.start_time, image.stop_time, image.real_time) == pytest.approx((0.02, 0.03, 0.01))
    assert image.series_date == "2024-01-02T03:04:05.678+01:00"
    assert image.appendix == "scan 3"


def test_lz4_framed_image_with_a_raw_stored_block():
    rng = np.random.default_rng(3)
    # Compressible zeros, then random bytes that LZ4 cannot shrink: stored raw.
    pixels = np.concatenate([np.zeros(64, np.uint16), rng.integers(0, 65535, 64, dtype=np.uint16)]).reshape(8, 16)
    blob = lz4h5_bytes(pixels.tobytes(), block_size=128)
    assert struct.unpack_from(">I", blob, 12 + 4 + struct.unpack_from(">I", blob, 12)[0])[0] == 128  # raw block
    image = parse_v2_message(v2_message(image_fields({"threshold_1": multidim(pixels, CBORTag(56500, ["lz4", 0, blob]))})))

    assert image.encoding.algorithm is Algorithm.LZ4H5
    assert image.encoding.elem_size == 2
    np.testing.assert_array_equal(decode_frame(image), pixels)


def test_uncompressed_typed_array_image():
    pixels = np.arange(30, dtype=np.uint32).reshape(5, 6)
    image = parse_v2_message(v2_message(image_fields({"threshold_1": multidim(pixels)})))
    assert image.encoding.algorithm is Algorithm.NONE
    np.testing.assert_array_equal(decode_frame(image), pixels)


def test_big_endian_typed_array_decodes_to_native_values():
    pixels = np.arange(6, dtype=">u2").reshape(2, 3) * 300
    image = parse_v2_message(v2_message(image_fields({"threshold_1": multidim(pixels)})))
    decoded = decode_frame(image)
    assert decoded.dtype == np.uint16 and decoded.dtype.isnative
    np.testing.assert_array_equal(decoded, pixels)


def test_column_major_image():
    pixels = np.arange(12, dtype=np.uint16).reshape(3, 4)
    image = parse_v2_message(v2_message(image_fields({"threshold_1": multidim(pixels, column_major=True)})))
    assert image.shape == (3, 4) and image.data[0].order == "F"
    np.testing.assert_array_equal(decode_frame(image), pixels)


def test_unknown_keys_and_tags_are_ignored_and_key_order_is_free():
    pixels = np.arange(6, dtype=np.uint16).reshape(2, 3)
    fields = {"future_field": CBORTag(12345, [1, 2]), "data": {"threshold_1": bslz4_multidim(pixels)},
              "series_id": 4, "type": "image", "image_id": 0, "extra": {"nested": [1, 2]}}
    image = parse_v2_message(v2_message(fields))
    assert image.frame_number == 0
    np.testing.assert_array_equal(decode_frame(image), pixels)


def test_missing_signature_is_counted_but_accepted():
    warning_counts = Counter()
    end = parse_v2_message(v2_message({"type": "end", "series_id": 3}, signature=False), warning_counts=warning_counts)
    assert end == SeriesEnd(3)
    assert warning_counts["missing_cbor_signature"] == 1
    parse_v2_message(v2_message({"type": "end", "series_id": 3}), warning_counts=warning_counts)
    assert warning_counts["missing_cbor_signature"] == 1


# --- errors ---------------------------------------------------------------------------------------

def test_missing_type():
    with raises_with_reason(MalformedMessageError, "missing_key") as info:
        parse_v2_message(v2_message({"series_id": 1}))
    assert "'type'" in str(info.value)


def test_unknown_type():
    with raises_with_reason(UnknownMessageError, "unknown_message") as info:
        parse_v2_message(v2_message({"type": "calibration", "series_id": 1}))
    assert "calibration" in str(info.value)


@pytest.mark.parametrize("data", [CBOR_SIGNATURE + b"\xa1\x64type", b"", CBOR_SIGNATURE + b"\xff\xff"])
def test_not_cbor(data):
    with raises_with_reason(MalformedMessageError, "bad_cbor"):
        parse_v2_message(data)


def test_not_a_map():
    with raises_with_reason(MalformedMessageError, "bad_cbor"):
        parse_v2_message(CBOR_SIGNATURE + cbor2.dumps([1, 2, 3]))


def test_unknown_compression():
    pixels = np.zeros((2, 2), np.uint16)
    data = {"threshold_1": multidim(pixels, CBORTag(56500, ["trpx9", 2, b"\x00" * 20]))}
    with raises_with_reason(UnsupportedEncodingError, "unsupported_encoding") as info:
        parse_v2_message(v2_message(image_fields(data)))
    assert "trpx9" in str(info.value)


def test_compression_element_size_must_match_the_typed_array():
    pixels = np.zeros((2, 2), np.uint16)
    data = {"threshold_1": multidim(pixels, CBORTag(56500, ["bslz4", 4, bslz4_bytes(pixels)]))}
    with raises_with_reason(UnsupportedEncodingError, "encoding_dtype_mismatch"):
        parse_v2_message(v2_message(image_fields(data)))


def test_uncompressed_array_of_wrong_size():
    pixels = np.zeros((4, 4), np.uint16)
    with raises_with_reason(FrameSizeMismatchError, "size_mismatch"):
        parse_v2_message(v2_message(image_fields({"threshold_1": multidim(pixels, pixels.tobytes()[:-2])})))


def test_malformed_compressed_tag():
    pixels = np.zeros((2, 2), np.uint16)
    data = {"threshold_1": multidim(pixels, CBORTag(56500, ["bslz4", b"\x00"]))}
    with raises_with_reason(MalformedMessageError, "bad_value") as info:
        parse_v2_message(v2_message(image_fields(data)))
    assert "56500" in str(info.value)


def test_image_without_a_multidim_array():
    with raises_with_reason(MalformedMessageError, "bad_value"):
        parse_v2_message(v2_message(image_fields({"threshold_1": b"\x00" * 8})))


def test_bad_rational():
    pixels = np.zeros((2, 2), np.uint8)
    with raises_with_reason(MalformedMessageError, "bad_value"):
        parse_v2_message(v2_message(image_fields({"threshold_1": multidim(pixels)}, real_time=[1, 0])))


def test_corrupt_compressed_image_fails_on_decode():
    pixels = np.arange(4096, dtype=np.uint16).reshape(64, 64)
    blob = bytearray(bslz4_bytes(pixels))
    blob[16:40] = b"\xff" * 24
    data = {"threshold_1": multidim(pixels, CBORTag(56500, ["bslz4", 2, bytes(blob)]))}
    image = parse_v2_message(v2_message(image_fields(data)))
    with raises_with_reason(CorruptFrameError, "corrupt_blob") as info:
        decode_frame(image)
    assert "frame 7" in str(info.value)
