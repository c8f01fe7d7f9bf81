"""Stream v1 parsing: the real EIGER 4M capture and synthetic messages."""
from __future__ import annotations

import json
import struct
from contextlib import contextmanager

import bitshuffle
import lz4.block
import numpy as np
import pytest

from tango_dectris_live.stream import (
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
    V1MessageAssembler,
    V1Regrouper,
    decode_frame,
    parse_v1_encoding,
    parse_v1_message,
)

CAPTURE_SHAPE = (2167, 2070)  # (height, width); the capture's v1 shape field is [2070, 2167]
CAPTURE_BLOB_SIZE = 1_170_446


def capture_part(testdata, number: int) -> bytes:
    return (testdata / "stream_v1_eiger4m" / f"part_{number:02d}").read_bytes()


def capture_header_parts(testdata) -> list[bytes]:
    """Parts 01–09, with the flatfield and pixel-mask blobs (not stored) synthesised at their
    declared size; their values encode the pixel index so that orientation can be checked."""
    height, width = CAPTURE_SHAPE
    index = np.arange(height * width)
    flatfield = (index % 1000).astype("<f4").tobytes()
    pixel_mask = (index % 7).astype("<u4").tobytes()
    parts = [capture_part(testdata, n) for n in (1, 2, 3, 5, 7, 8, 9)]
    return parts[:3] + [flatfield] + parts[3:4] + [pixel_mask] + parts[4:]


def capture_image_parts(testdata, frame: int) -> list[bytes]:
    first = 10 + 4 * frame
    return [capture_part(testdata, n) for n in range(first, first + 4)]


def json_part(obj: dict, **dumps_options) -> bytes:
    """Compact, sorted JSON with the trailing newline, as the DCU sends it."""
    options = {"separators": (",", ":"), "sort_keys": True, **dumps_options}
    return (json.dumps(obj, **options) + "\n").encode()


def bslz4_blob(pixels: np.ndarray) -> bytes:
    return struct.pack(">QI", pixels.nbytes, 8192) + bitshuffle.compress_lz4(pixels).tobytes()


def image_parts(
    pixels: np.ndarray,
    encoding: str,
    blob: bytes,
    *,
    frame: int = 0,
    series: int = 3,
    type_name: str | None = None,
    size: int | None = None,
    appendix: bytes | None = None,
) -> list[bytes]:
    height, width = pixels.shape
    parts = [
        json_part({"frame": frame, "hash": "", "htype": "dimage-1.0", "series": series}),
        json_part({
            "encoding": encoding,
            "htype": "dimage_d-1.0",
            "shape": [width, height],
            "size": len(blob) if size is None else size,
            "type": type_name or pixels.dtype.name,
        }),
        blob,
        json_part({"htype": "dconfig-1.0", "real_time": 1_000_000, "start_time": 5_000_000, "stop_time": 6_000_000}),
    ]
    return parts + ([appendix] if appendix is not None else [])


def eiger2_config(**overrides) -> dict:
    config = {
        "beam_center_x": 10.5, "beam_center_y": 20.25, "bit_depth_image": 16, "count_time": 0.5,
        "countrate_correction_applied": False, "flatfield_correction_applied": True, "frame_time": 0.5,
        "nimages": 4, "ntrigger": 3, "pixel_mask_applied": True, "software_version": "1.8.0",
        "x_pixels_in_detector": 6, "y_pixels_in_detector": 5,
    }
    return {**config, **overrides}


# --- the real capture -----------------------------------------------------------------------------

def test_capture_header_all_parts(testdata):
    header = parse_v1_message(capture_header_parts(testdata))

    assert isinstance(header, SeriesHeader)
    assert header.series_id == 6
    assert header.header_detail == "all"
    assert header.shape == CAPTURE_SHAPE
    assert header.number_of_images == 10
    assert header.count_time == pytest.approx(0.0019925357773900032)
    assert header.frame_time == pytest.approx(0.002)
    assert header.config["number_of_excluded_pixels"] == 250513
    assert header.config["description"] == "Dectris Eiger 4M"
    # EIGER1 sends booleans as 1/0.
    assert header.flatfield_enabled is True
    assert header.pixel_mask_enabled is True
    assert header.countrate_correction_enabled is True
    assert header.appendix == '{"acqID": "test_1"}'
    assert header.v1_tick_s == pytest.approx(20e-9)  # firmware 1.6.6: 50 MHz ticks


def test_capture_header_arrays_are_height_by_width(testdata):
    header = parse_v1_message(capture_header_parts(testdata))
    height, width = CAPTURE_SHAPE

    flatfield = header.flatfield[""]
    assert flatfield.shape == CAPTURE_SHAPE and flatfield.dtype == np.float32
    # The synthesised blob counts pixels in memory order, so row 1 starts at pixel `width`.
    assert flatfield[1, 0] == width % 1000
    mask = header.pixel_mask[""]
    assert mask.shape == CAPTURE_SHAPE and mask.dtype == np.uint32
    assert mask[height - 1, width - 1] == (height * width - 1) % 7

    table = header.countrate_table
    assert table.shape == (4000, 2) and table.dtype == np.float32
    assert table[0].tolist() == [0.0, 0.0]
    assert table[1, 0] == 1125.0
    assert table[1, 1] == pytest.approx(1124.66, abs=0.01)


def test_capture_header_with_wrong_flatfield_size_is_rejected(testdata):
    parts = capture_header_parts(testdata)
    parts[3] = parts[3][:-4]
    with pytest.raises(FrameSizeMismatchError, match="part 3"):
        parse_v1_message(parts)


@pytest.mark.parametrize("frame", [0, 1, 2])
def test_capture_images(testdata, frame):
    image = parse_v1_message(capture_image_parts(testdata, frame))

    assert isinstance(image, ImageFrame)
    assert (image.series_id, image.frame_number) == (6, frame)
    assert image.shape == CAPTURE_SHAPE
    assert image.dtype == np.uint16
    assert image.encoding.algorithm is Algorithm.BSLZ4
    assert image.encoding.elem_size == 2
    assert len(image.blob) == CAPTURE_BLOB_SIZE
    assert image.raw_times["real_time"] in (99251, 99130, 99129)


def test_capture_frames_decode_with_the_same_masked_pixels(testdata):
    header = parse_v1_message(capture_header_parts(testdata))
    images = [parse_v1_message(capture_image_parts(testdata, frame)) for frame in range(3)]
    frames = [decode_frame(image) for image in images]

    for frame in frames:
        assert frame.shape == CAPTURE_SHAPE and frame.dtype == np.uint16
    masked = [frame == 65535 for frame in frames]
    assert masked[0].sum() == 251297
    # Every excluded pixel reads 65535; a few more pixels are masked in the frames.
    assert masked[0].sum() >= header.config["number_of_excluded_pixels"]
    assert all(np.array_equal(masked[0], other) for other in masked[1:])
    assert not np.array_equal(frames[0], frames[1])


def test_capture_frame_reencodes_byte_identically(testdata):
    """The decode is exact: re-encoding it as the DCU does gives the captured blob back."""
    image = parse_v1_message(capture_image_parts(testdata, 0))
    assert bslz4_blob(decode_frame(image)) == bytes(image.blob)


def test_capture_end(testdata):
    assert parse_v1_message([capture_part(testdata, 22)]) == SeriesEnd(series_id=6)


def test_assembler_takes_the_capture_part_by_part(testdata):
    messages = [capture_header_parts(testdata)]
    messages += [capture_image_parts(testdata, frame) for frame in range(3)]
    messages += [[capture_part(testdata, 22)]]
    assembler = V1MessageAssembler()

    parsed = []
    for parts in messages:
        for index, part in enumerate(parts):
            result = assembler.add_part(memoryview(part), more=index < len(parts) - 1)
            if index < len(parts) - 1:
                assert result is None
                assert assembler.pending_parts == index + 1
        parsed.append(result)

    header, *images, end = parsed
    assert isinstance(header, SeriesHeader) and end == SeriesEnd(series_id=6)
    assert [image.frame_number for image in images] == [0, 1, 2]
    # The header's firmware 1.6.6 sets the 20 ns tick, so the exposure matches count_time.
    assert images[0].real_time == pytest.approx(header.count_time, rel=0.01)
    assert images[1].start_time - images[0].start_time == pytest.approx(header.frame_time, rel=0.01)


# --- synthetic messages ---------------------------------------------------------------------------

def test_basic_header_with_eiger2_booleans():
    parts = [json_part({"header_detail": "basic", "htype": "dheader-1.0", "series": 12}), json_part(eiger2_config())]
    header = parse_v1_message(parts)

    assert header.header_detail == "basic"
    assert header.shape == (5, 6)
    assert header.dtype == np.uint16
    assert header.number_of_images == 12
    assert header.beam_center == (10.5, 20.25)
    assert (header.flatfield_enabled, header.pixel_mask_enabled, header.countrate_correction_enabled) == (
        True, True, False,
    )
    assert header.v1_tick_s == pytest.approx(1e-9)
    assert header.appendix is None
    assert not header.flatfield and header.countrate_table is None


@pytest.mark.parametrize(
    "detail, extra_parts, appendix",
    [
        ("none", [], None),
        ("none", [b"run 7"], "run 7"),
        ("basic", [json_part({"nimages": 1})], None),
        ("basic", [json_part({"nimages": 1}), b'{"sample": "Au"}'], '{"sample": "Au"}'),
    ],
)
def test_header_details_and_appendix(detail, extra_parts, appendix):
    header = parse_v1_message([json_part({"header_detail": detail, "htype": "dheader-1.0", "series": 1})] + extra_parts)
    assert header.header_detail == detail
    assert header.appendix == appendix


def test_header_with_spaced_json_of_the_manual():
    first = b'{"htype": "dheader-1.0", "header_detail": "basic", "series": 5}'
    config = b'{"nimages": 2, "ntrigger": 1, "flatfield_correction_applied": 0}'
    header = parse_v1_message([first, config])
    assert header.series_id == 5
    assert header.number_of_images == 2
    assert header.flatfield_enabled is False


def test_booleans_one_zero_and_true_false_are_equivalent():
    first = json_part({"header_detail": "basic", "htype": "dheader-1.0", "series": 1})
    as_ints = parse_v1_message([first, json_part(eiger2_config(pixel_mask_applied=0, flatfield_correction_applied=1))])
    as_bools = parse_v1_message([first, json_part(eiger2_config(pixel_mask_applied=False, flatfield_correction_applied=True))])
    assert (as_ints.pixel_mask_enabled, as_ints.flatfield_enabled) == (False, True)
    assert (as_bools.pixel_mask_enabled, as_bools.flatfield_enabled) == (False, True)


def test_image_with_appendix():
    pixels = np.arange(12, dtype=np.uint16).reshape(3, 4)
    image = parse_v1_message(image_parts(pixels, "bs16-lz4<", bslz4_blob(pixels), frame=5, appendix=b"pos=1.25"))
    assert image.frame_number == 5
    assert image.appendix == "pos=1.25"
    assert image.shape == (3, 4)
    np.testing.assert_array_equal(decode_frame(image), pixels)


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "uint32", "int16"])
@pytest.mark.parametrize("encoding", ["bs-lz4<", "lz4<", "<"])
def test_image_encodings_and_pixel_types(dtype, encoding):
    rng = np.random.default_rng(7)
    pixels = rng.integers(0, np.iinfo(dtype).max, size=(13, 21), dtype=dtype)  # n % 8 != 0
    if encoding == "bs-lz4<":
        encoding = f"bs{pixels.itemsize * 8}-lz4<"
        blob = bslz4_blob(pixels)
    elif encoding == "lz4<":
        blob = lz4.block.compress(pixels.tobytes(), store_size=False)
    else:
        blob = pixels.tobytes()

    image = parse_v1_message(image_parts(pixels, encoding, blob))

    assert image.dtype == np.dtype(dtype)
    assert image.shape == (13, 21)
    decoded = decode_frame(image)
    assert decoded.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(decoded, pixels)


def test_image_times_use_the_given_tick():
    pixels = np.zeros((2, 2), dtype=np.uint16)
    image = parse_v1_message(image_parts(pixels, "<", pixels.tobytes()), tick_s=20e-9)
    assert image.real_time == pytest.approx(0.02)
    assert image.start_time == pytest.approx(0.1)
    assert image.raw_times == {"real_time": 1_000_000, "start_time": 5_000_000, "stop_time": 6_000_000}


def test_memoryview_parts_are_not_copied():
    pixels = np.arange(16, dtype=np.uint16).reshape(4, 4)
    parts = [memoryview(part) for part in image_parts(pixels, "<", pixels.tobytes())]
    image = parse_v1_message(parts)
    assert image.blob is parts[2]


def test_stale_series_end_is_just_a_series_end():
    assert parse_v1_message([json_part({"htype": "dseries_end-1.0", "series": 41})]) == SeriesEnd(series_id=41)


@pytest.mark.parametrize(
    "text, algorithm, elem_size",
    [("bs32-lz4<", Algorithm.BSLZ4, 4), ("bs32lz4<", Algorithm.BSLZ4, 4), ("lz4<", Algorithm.LZ4, 4),
     ("<", Algorithm.NONE, 4), ("lz4", Algorithm.LZ4, 4)],
)
def test_encoding_grammar(text, algorithm, elem_size):
    encoding = parse_v1_encoding(text, "uint32")
    assert (encoding.algorithm, encoding.elem_size, encoding.byte_order) == (algorithm, elem_size, "<")


# --- errors ---------------------------------------------------------------------------------------

@contextmanager
def raises_with_reason(error_class, reason):
    """pytest.raises that also checks the machine-usable ``reason`` the receiver counts by."""
    with pytest.raises(error_class) as info:
        yield info
    assert isinstance(info.value, StreamFormatError)
    assert info.value.reason == reason


def test_unknown_htype():
    with raises_with_reason(UnknownMessageError, "unknown_message") as info:
        parse_v1_message([json_part({"htype": "dimagex-1.0"})])
    assert "dimagex-1.0" in str(info.value)


def test_tickit_style_flatfield_htype_is_rejected():
    parts = [
        json_part({"header_detail": "all", "htype": "dheader-1.0", "series": 1}), json_part({}),
        json_part({"htype": "flatfield-1.0", "shape": [1, 1], "type": "float32"}), bytes(4),
        json_part({"htype": "dpixelmask-1.0", "shape": [1, 1], "type": "uint32"}), bytes(4),
        json_part({"htype": "dcountrate_table-1.0", "shape": [2, 1], "type": "float32"}), bytes(8),
    ]
    with raises_with_reason(MalformedMessageError, "bad_value"):
        parse_v1_message(parts)


def test_size_field_differs_from_blob_length():
    pixels = np.zeros((4, 4), dtype=np.uint16)
    blob = bslz4_blob(pixels)
    with raises_with_reason(FrameSizeMismatchError, "size_mismatch") as info:
        parse_v1_message(image_parts(pixels, "bs16-lz4<", blob, size=len(blob) + 1, frame=9))
    assert "frame 9" in str(info.value)


def test_uncompressed_blob_of_wrong_size():
    pixels = np.zeros((4, 4), dtype=np.uint16)
    with raises_with_reason(FrameSizeMismatchError, "size_mismatch"):
        parse_v1_message(image_parts(pixels, "<", bytes(30)))


@pytest.mark.parametrize("bad", [b"{not json", b"\xff\xfe", b"[1, 2]"])
def test_bad_json(bad):
    with raises_with_reason(MalformedMessageError, "bad_json"):
        parse_v1_message([bad])


def test_bad_json_in_a_later_part():
    parts = image_parts(np.zeros((2, 2), np.uint8), "<", bytes(4))
    parts[3] = b'{"htype":"dconfig-1.0",'
    with raises_with_reason(MalformedMessageError, "bad_json"):
        parse_v1_message(parts)


def test_corrupt_blob_fails_on_decode_with_frame_number_and_encoding():
    pixels = np.arange(4096, dtype=np.uint16).reshape(64, 64)
    blob = bytearray(bslz4_blob(pixels))
    blob[16:40] = b"\xff" * 24
    image = parse_v1_message(image_parts(pixels, "bs16-lz4<", bytes(blob), frame=17))
    with raises_with_reason(CorruptFrameError, "corrupt_blob") as info:
        decode_frame(image)
    assert "frame 17" in str(info.value) and "bslz4" in str(info.value)


def test_big_endian_is_not_supported():
    pixels = np.zeros((2, 2), dtype=">u2")
    with raises_with_reason(UnsupportedEncodingError, "big_endian") as info:
        parse_v1_message(image_parts(pixels, ">", pixels.tobytes(), type_name="uint16"))
    assert "big-endian not supported" in str(info.value)


def test_bitshuffle_bits_must_match_the_pixel_type():
    pixels = np.zeros((4, 4), dtype=np.uint16)
    with raises_with_reason(UnsupportedEncodingError, "encoding_dtype_mismatch") as info:
        parse_v1_message(image_parts(pixels, "bs32-lz4<", bslz4_blob(pixels)))
    assert "bs32" in str(info.value) or "32-bit" in str(info.value)


@pytest.mark.parametrize("type_name", ["float32", "uint64", "rgb"])
def test_unsupported_pixel_type(type_name):
    pixels = np.zeros((2, 2), dtype=np.uint32)
    with raises_with_reason(UnsupportedEncodingError, "unsupported_dtype"):
        parse_v1_message(image_parts(pixels, "<", pixels.tobytes(), type_name=type_name))


def test_unknown_encoding():
    pixels = np.zeros((2, 2), dtype=np.uint16)
    with raises_with_reason(UnsupportedEncodingError, "unsupported_encoding"):
        parse_v1_message(image_parts(pixels, "zstd<", pixels.tobytes()))


def test_shape_must_have_two_elements():
    parts = image_parts(np.zeros((2, 2), np.uint8), "<", bytes(4))
    parts[1] = json_part({"encoding": "<", "htype": "dimage_d-1.0", "shape": [2, 2, 1], "size": 4, "type": "uint8"})
    with raises_with_reason(MalformedMessageError, "bad_value"):
        parse_v1_message(parts)


@pytest.mark.parametrize("count", [3, 6])
def test_image_part_count(count):
    parts = image_parts(np.zeros((2, 2), np.uint8), "<", bytes(4), appendix=b"x") + [b"y"]
    with raises_with_reason(MalformedMessageError, "part_count"):
        parse_v1_message(parts[:count])


def test_header_part_count():
    parts = [json_part({"header_detail": "all", "htype": "dheader-1.0", "series": 1}), json_part({})]
    with raises_with_reason(MalformedMessageError, "part_count") as info:
        parse_v1_message(parts)
    assert "expected 8" in str(info.value)


def test_missing_key():
    with raises_with_reason(MalformedMessageError, "missing_key") as info:
        parse_v1_message([json_part({"htype": "dseries_end-1.0"})])
    assert "'series'" in str(info.value)


def test_assembler_discards_a_bad_message_and_goes_on():
    assembler = V1MessageAssembler()
    assembler.add_part(b"{broken", more=True)
    with pytest.raises(MalformedMessageError):
        assembler.add_part(b"{}", more=False)
    assert assembler.pending_parts == 0
    assert assembler.add_part(json_part({"htype": "dseries_end-1.0", "series": 2}), more=False) == SeriesEnd(2)


# --- regrouping parts by content (stream/v1_framing.py) ---------------------------------------------

def _regrouped(zeromq_messages, follows_image=None):
    regrouper = V1Regrouper()
    for parts in zeromq_messages:
        regrouper.add(parts, follows_image=follows_image)
    taken = []
    while (item := regrouper.take()) is not None:
        taken.append(item)
    return regrouper, taken


def _header(series=1, detail="basic"):
    parts = [json_part({"header_detail": detail, "htype": "dheader-1.0", "series": series})]
    return parts + ([json_part(eiger2_config())] if detail != "none" else [])


def test_regrouper_takes_the_capture_part_by_part_as_multipart(testdata):
    messages = [capture_header_parts(testdata)]
    messages += [capture_image_parts(testdata, frame) for frame in range(3)]
    messages += [[capture_part(testdata, 22)]]
    _regrouper, whole = _regrouped(messages)
    regrouper, single = _regrouped([[part] for message in messages for part in message])
    assert whole == messages and single == messages and not regrouper.busy


def test_regrouper_holds_a_split_header_until_the_next_part_tells():
    header = _header() + [b"appendix"]
    regrouper, taken = _regrouped([[part] for part in header[:2]])
    assert taken == [] and regrouper.holds_header and regrouper.busy
    regrouper.add([header[2]])  # not a start part: the header's appendix
    assert regrouper.take() == header and not regrouper.busy
    regrouper, _ = _regrouped([[part] for part in _header()])
    end = json_part({"htype": "dseries_end-1.0", "series": 1})
    regrouper.add([end])  # a start part: the header had no appendix
    assert [regrouper.take(), regrouper.take()] == [_header(), [end]]
    regrouper, _ = _regrouped([[part] for part in _header()])
    assert regrouper.finish_held() and regrouper.take() == _header()


def test_regrouper_takes_a_header_of_one_multipart_message_at_once():
    for detail in ("basic", "all"):
        parts = _header(detail=detail)
        if detail == "all":
            parts = capture_header_parts_like(parts)
        regrouper, taken = _regrouped([parts])
        assert taken == [parts] and not regrouper.holds_header


def capture_header_parts_like(first_two):
    """An ``all`` header of a 2x3 detector: the flatfield, pixel mask and count-rate table."""
    arrays = [("dflatfield-1.0", [3, 2], "float32", 24), ("dpixelmask-1.0", [3, 2], "uint32", 24),
              ("dcountrate_table-1.0", [2, 4], "float32", 32)]
    parts = list(first_two)
    for htype, shape, type_name, size in arrays:
        parts += [json_part({"htype": htype, "shape": shape, "type": type_name}), bytes(size)]
    return parts


def test_regrouper_takes_a_blob_by_its_declared_size_whatever_it_looks_like():
    looks_like_a_start = json_part({"frame": 9, "hash": "", "htype": "dimage-1.0", "series": 1})
    parts = image_parts(np.zeros((2, 2), np.uint8), "lz4<", looks_like_a_start, series=1)
    regrouper, taken = _regrouped([[part] for part in parts])
    assert taken == [parts] and regrouper.image_appendix_may_follow


def test_regrouper_image_appendix_may_come_in_the_next_zeromq_message():
    parts = image_parts(np.zeros((2, 2), np.uint8), "<", bytes(4), series=1)
    end = json_part({"htype": "dseries_end-1.0", "series": 1})
    regrouper, taken = _regrouped([parts, [b"frame-note", end]])
    assert taken == [parts, [end]]  # the appendix of an image already given out is dropped
    # the caller took the image itself and says so
    regrouper, taken = _regrouped([[b"frame-note", end]], follows_image=True)
    assert taken == [[end]]
    regrouper, taken = _regrouped([[b"frame-note", end]], follows_image=False)
    assert [item.reason for item in taken[:1]] == ["unexpected_part"] and taken[1:] == [[end]]


def test_regrouper_reports_cut_messages_and_stray_runs_by_name():
    image = image_parts(np.zeros((2, 2), np.uint8), "<", bytes(4), series=1)
    end = json_part({"htype": "dseries_end-1.0", "series": 1})
    zeromq_messages = [
        [_header()[0]], image,  # a header whose config part never came
        image[:2], [end],  # an image cut short
        [image[1]], [image[2], image[3]], [b"{not json"],  # one stray run
        [end], [b'{"htype":"dsomething-1.0"}'], [end],
    ]
    regrouper, taken = _regrouped(zeromq_messages)
    reasons = [item.reason if isinstance(item, StreamFormatError) else item for item in taken]
    assert reasons == ["incomplete_header", image, "truncated", [end], "unexpected_part", [end],
                       "unknown_message", [end]]
    regrouper.add(image[:3])
    regrouper.reset()  # the connection was cut
    assert regrouper.take().reason == "truncated" and not regrouper.busy


def test_absurdly_deep_json_is_bad_json_not_a_crash():
    deep = b'{"htype":"dheader-1.0","header_detail":"basic","series":1,"x":' + b"[" * 100_000 + b"\n"
    with raises_with_reason(MalformedMessageError, "bad_json"):
        parse_v1_message([json_part({"header_detail": "basic", "htype": "dheader-1.0", "series": 1}), deep])
    _regrouper, taken = _regrouped([[deep[:4000]]])
    assert [item.reason for item in taken] == ["bad_json"]
