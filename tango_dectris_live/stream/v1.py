"""Stream v1 ("legacy"): multipart ZeroMQ messages with JSON header parts (SIMPLON.md §3).

``parse_v1_message`` turns the parts of one multipart message into a :class:`SeriesHeader`,
:class:`ImageFrame` or :class:`SeriesEnd`. The pixel blob is kept as given (no copy, no decode).
"""
from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .errors import (
    FrameSizeMismatchError,
    MalformedMessageError,
    UnknownMessageError,
    UnsupportedEncodingError,
)
from .messages import Algorithm, Encoding, FrameData, ImageFrame, SeriesEnd, SeriesHeader, StreamMessage

#: dconfig time unit from SIMPLON 1.8 on (nanoseconds).
V1_TICK_S_SIMPLON_1_8 = 1e-9
#: dconfig time unit before SIMPLON 1.8 (50 MHz clock ticks, consistent with the EIGER1 capture).
V1_TICK_S_BEFORE_1_8 = 20e-9

# Parts of a global header without appendix, per header_detail (Lima asserts the same counts).
_HEADER_PARTS = {"none": 1, "basic": 2, "all": 8}
_IMAGE_PARTS = 4

_PIXEL_TYPES = {
    "uint8": np.dtype("<u1"),
    "uint16": np.dtype("<u2"),
    "uint32": np.dtype("<u4"),
    # Not sent by DECTRIS detectors, but Lima accepts them, so some emulators send them.
    "int8": np.dtype("<i1"),
    "int16": np.dtype("<i2"),
    "int32": np.dtype("<i4"),
}
_ARRAY_TYPES = {**_PIXEL_TYPES, "float32": np.dtype("<f4"), "float64": np.dtype("<f8")}

# SIMPLON grammar [bs<BITS>][[-]lz4][<|>]
_ENCODING_PATTERN = re.compile(r"(?:bs(?P<bits>\d+))?(?P<lz4>-?lz4)?(?P<order>[<>])?")

PartLike = Any  # bytes, memoryview, or any object with the buffer protocol (zmq.Frame)


def parse_v1_message(parts: Sequence[PartLike], *, tick_s: float = V1_TICK_S_SIMPLON_1_8) -> StreamMessage:
    """Parse the parts of one stream v1 multipart message.

    ``tick_s`` is the unit of the image ``dconfig`` times; use the ``v1_tick_s`` of the series'
    header (:class:`V1MessageAssembler` does that for you).
    """
    if not parts:
        raise MalformedMessageError("empty stream v1 message (no parts)", reason="part_count")
    first = _json_part(parts[0], "part 1")
    htype = _field(first, "htype", str, "part 1")
    if htype == "dimage-1.0":
        return _parse_image(first, parts, tick_s)
    if htype == "dheader-1.0":
        return _parse_header(first, parts)
    if htype == "dseries_end-1.0":
        if len(parts) != 1:
            raise MalformedMessageError(
                f"dseries_end message has {len(parts)} parts, expected 1", reason="part_count"
            )
        return SeriesEnd(series_id=_field(first, "series", int, "dseries_end"))
    raise UnknownMessageError(
        f"unknown stream v1 message htype {htype!r} (expected dheader-1.0, dimage-1.0 or "
        "dseries_end-1.0); is the detector's stream format set to legacy/v1?"
    )


def parse_v1_encoding(text: str, dtype: np.dtype | str) -> Encoding:
    """The :class:`Encoding` of a v1 ``encoding`` field (``bs16-lz4<``, ``lz4<``, ``<``) for
    pixels of ``dtype``."""
    dt = np.dtype(dtype)
    match = _ENCODING_PATTERN.fullmatch(text)
    if match is None:
        raise UnsupportedEncodingError(f"unknown stream v1 encoding {text!r}")
    if match["order"] == ">":
        raise UnsupportedEncodingError(
            f"stream v1 encoding {text!r}: big-endian not supported", reason="big_endian"
        )
    bits, lz4 = match["bits"], match["lz4"]
    if bits is not None:
        if lz4 is None:
            raise UnsupportedEncodingError(f"stream v1 encoding {text!r}: bitshuffle without lz4")
        if int(bits) != dt.itemsize * 8:
            raise UnsupportedEncodingError(
                f"stream v1 encoding {text!r} shuffles {bits}-bit elements but the pixel type "
                f"is {dt.name} ({dt.itemsize * 8} bit)",
                reason="encoding_dtype_mismatch",
            )
        algorithm = Algorithm.BSLZ4
    elif lz4 is not None:
        algorithm = Algorithm.LZ4
    else:
        algorithm = Algorithm.NONE
    return Encoding.for_dtype(algorithm, dt)


def v1_tick_s_for(software_version: str | None) -> float | None:
    """The dconfig time unit for a detector config ``software_version`` (``"1.6.6"``,
    ``"1.8.0"``); ``None`` when unknown."""
    if not isinstance(software_version, str):
        return None
    numbers = re.match(r"(\d+)\.(\d+)", software_version)
    if numbers is None:
        return None
    version = (int(numbers[1]), int(numbers[2]))
    return V1_TICK_S_BEFORE_1_8 if version < (1, 8) else V1_TICK_S_SIMPLON_1_8


class V1MessageAssembler:
    """Collects the parts of v1 multipart messages one by one, as ZeroMQ delivers them with
    ``RCVMORE``, and parses each complete message. It remembers the dconfig time unit of the
    last header for the images that follow."""

    def __init__(self, default_tick_s: float = V1_TICK_S_SIMPLON_1_8) -> None:
        self._default_tick_s = default_tick_s
        self._tick_s = default_tick_s
        self._parts: list[PartLike] = []

    @property
    def pending_parts(self) -> int:
        """Parts received of the message not yet complete."""
        return len(self._parts)

    def add_part(self, part: PartLike, more: bool) -> StreamMessage | None:
        """Add one part; ``more`` is ZeroMQ's RCVMORE. Returns the message when ``more`` is
        false, else ``None``. A malformed message raises and is discarded."""
        self._parts.append(part)
        if more:
            return None
        parts, self._parts = self._parts, []
        message = parse_v1_message(parts, tick_s=self._tick_s)
        if isinstance(message, SeriesHeader):
            self._tick_s = message.v1_tick_s or self._default_tick_s
        return message

    def reset(self) -> None:
        """Drop a partly received message."""
        self._parts = []


def _parse_header(first: Mapping[str, Any], parts: Sequence[PartLike]) -> SeriesHeader:
    series_id = _field(first, "series", int, "dheader")
    detail = _field(first, "header_detail", str, "dheader")
    expected = _HEADER_PARTS.get(detail)
    if expected is None:
        raise MalformedMessageError(
            f"dheader header_detail {detail!r} is not one of all, basic, none", reason="bad_value"
        )
    if len(parts) not in (expected, expected + 1):
        raise MalformedMessageError(
            f"dheader with header_detail {detail!r} has {len(parts)} parts, expected {expected} "
            f"(or {expected + 1} with an appendix)",
            reason="part_count",
        )
    config: Mapping[str, Any] = {}
    if expected >= 2:
        config = _json_part(parts[1], "detector config part 2")
    flatfield: dict[str, np.ndarray] = {}
    pixel_mask: dict[str, np.ndarray] = {}
    countrate_table = None
    if detail == "all":
        flatfield[""] = _header_image(parts[2], parts[3], "dflatfield-1.0", 3)
        pixel_mask[""] = _header_image(parts[4], parts[5], "dpixelmask-1.0", 5)
        # shape [2, N] is [width, height]: N rows of (x, y) pairs.
        countrate_table = _header_image(parts[6], parts[7], "dcountrate_table-1.0", 7)
    appendix = _appendix(parts[expected]) if len(parts) > expected else None

    width, height = config.get("x_pixels_in_detector"), config.get("y_pixels_in_detector")
    shape = (height, width) if _is_int(width) and _is_int(height) else None
    bit_depth = config.get("bit_depth_image")
    dtype = np.dtype(f"<u{bit_depth // 8}") if bit_depth in (8, 16, 32) else None
    nimages, ntrigger = config.get("nimages"), config.get("ntrigger", 1)
    number_of_images = nimages * ntrigger if _is_int(nimages) and _is_int(ntrigger) else None
    beam_x, beam_y = config.get("beam_center_x"), config.get("beam_center_y")
    beam_center = (float(beam_x), float(beam_y)) if _is_number(beam_x) and _is_number(beam_y) else None
    return SeriesHeader(
        series_id=series_id,
        header_detail=detail,
        config=config,
        shape=shape,
        dtype=dtype,
        count_time=_optional_float(config.get("count_time")),
        frame_time=_optional_float(config.get("frame_time")),
        number_of_images=number_of_images,
        beam_center=beam_center,
        flatfield_enabled=_optional_bool(config.get("flatfield_correction_applied")),
        pixel_mask_enabled=_optional_bool(config.get("pixel_mask_applied")),
        countrate_correction_enabled=_optional_bool(config.get("countrate_correction_applied")),
        flatfield=flatfield,
        pixel_mask=pixel_mask,
        countrate_table=countrate_table,
        appendix=appendix,
        v1_tick_s=v1_tick_s_for(config.get("software_version")),
    )


def _header_image(description_part: PartLike, blob: PartLike, htype: str, number: int) -> np.ndarray:
    """A flatfield / pixel mask / count-rate table array from its JSON part and raw blob."""
    where = f"part {number} ({htype})"
    description = _json_part(description_part, where)
    if description.get("htype") != htype:
        raise MalformedMessageError(
            f"header part {number} has htype {description.get('htype')!r}, expected {htype!r}",
            reason="bad_value",
        )
    height, width = _shape_hw(description, where)
    type_name = _field(description, "type", str, where)
    dtype = _ARRAY_TYPES.get(type_name)
    if dtype is None:
        raise UnsupportedEncodingError(f"{where}: unsupported array type {type_name!r}", reason="unsupported_dtype")
    expected = height * width * dtype.itemsize
    nbytes = memoryview(blob).nbytes
    if nbytes != expected:
        raise FrameSizeMismatchError(
            f"{where}: blob has {nbytes} bytes, shape {width}x{height} {type_name} needs {expected}"
        )
    return np.frombuffer(blob, dtype=dtype).reshape(height, width)


def _parse_image(first: Mapping[str, Any], parts: Sequence[PartLike], tick_s: float) -> ImageFrame:
    frame_number = _field(first, "frame", int, "dimage")
    series_id = _field(first, "series", int, "dimage")
    where = f"frame {frame_number}"
    if frame_number < 0:
        raise MalformedMessageError(f"dimage: negative frame number {frame_number}", reason="bad_value")
    if len(parts) not in (_IMAGE_PARTS, _IMAGE_PARTS + 1):
        raise MalformedMessageError(
            f"{where}: image message has {len(parts)} parts, expected {_IMAGE_PARTS} "
            f"(or {_IMAGE_PARTS + 1} with an appendix)",
            reason="part_count",
        )
    description = _json_part(parts[1], f"{where} dimage_d part")
    if description.get("htype") != "dimage_d-1.0":
        raise MalformedMessageError(
            f"{where}: part 2 has htype {description.get('htype')!r}, expected 'dimage_d-1.0'",
            reason="bad_value",
        )
    height, width = _shape_hw(description, f"{where} dimage_d")
    type_name = _field(description, "type", str, f"{where} dimage_d")
    dtype = _PIXEL_TYPES.get(type_name)
    if dtype is None:
        raise UnsupportedEncodingError(
            f"{where}: pixel type {type_name!r} is not one of {', '.join(_PIXEL_TYPES)}",
            reason="unsupported_dtype",
        )
    encoding = parse_v1_encoding(_field(description, "encoding", str, f"{where} dimage_d"), dtype)
    size = _field(description, "size", int, f"{where} dimage_d")
    blob = parts[2] if isinstance(parts[2], (bytes, memoryview)) else memoryview(parts[2])
    nbytes = blob.nbytes if isinstance(blob, memoryview) else len(blob)
    if nbytes != size:
        raise FrameSizeMismatchError(f"{where}: blob has {nbytes} bytes but dimage_d says size {size}")
    if encoding.algorithm is Algorithm.NONE and nbytes != height * width * dtype.itemsize:
        raise FrameSizeMismatchError(
            f"{where}: uncompressed blob has {nbytes} bytes, {width}x{height} {type_name} needs "
            f"{height * width * dtype.itemsize}"
        )

    times = _json_part(parts[3], f"{where} dconfig part")
    if times.get("htype") != "dconfig-1.0":
        raise MalformedMessageError(
            f"{where}: part 4 has htype {times.get('htype')!r}, expected 'dconfig-1.0'", reason="bad_value"
        )
    raw_times = {key: times[key] for key in ("start_time", "stop_time", "real_time") if _is_number(times.get(key))}

    def seconds(key: str) -> float | None:
        return raw_times[key] * tick_s if key in raw_times else None

    return ImageFrame(
        series_id=series_id,
        frame_number=frame_number,
        data=(FrameData(shape=(height, width), encoding=encoding, blob=blob),),
        start_time=seconds("start_time"),
        stop_time=seconds("stop_time"),
        real_time=seconds("real_time"),
        raw_times=raw_times,
        appendix=_appendix(parts[4]) if len(parts) > _IMAGE_PARTS else None,
    )


def _json_part(part: PartLike, where: str) -> dict[str, Any]:
    try:
        value = json.loads(bytes(part))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise MalformedMessageError(f"{where} is not valid JSON: {error}", reason="bad_json") from None
    except RecursionError:  # the parser's own limit, reached by absurdly deep nesting
        raise MalformedMessageError(f"{where} is JSON nested too deep to parse", reason="bad_json") from None
    except TypeError as error:
        raise MalformedMessageError(f"{where} is not a byte buffer: {error}", reason="bad_json") from None
    if not isinstance(value, dict):
        raise MalformedMessageError(f"{where} is JSON but not an object: {value!r:.80}", reason="bad_json")
    return value


def _field(obj: Mapping[str, Any], key: str, kind: type, where: str) -> Any:
    if key not in obj:
        raise MalformedMessageError(f"{where}: missing key {key!r}", reason="missing_key")
    value = obj[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise MalformedMessageError(
            f"{where}: {key!r} should be {kind.__name__}, got {value!r:.80}", reason="bad_value"
        )
    return value


def _shape_hw(description: Mapping[str, Any], where: str) -> tuple[int, int]:
    """(height, width) from a v1 ``shape`` field, which is [width, height]."""
    shape = _field(description, "shape", list, where)
    if len(shape) != 2 or not all(_is_int(n) and n >= 0 for n in shape):
        raise MalformedMessageError(
            f"{where}: shape {shape!r} should be [width, height] (2 non-negative integers)", reason="bad_value"
        )
    width, height = shape
    return height, width


def _appendix(part: PartLike) -> str | bytes:
    raw = bytes(part)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _optional_float(value: Any) -> float | None:
    return float(value) if _is_number(value) else None


def _optional_bool(value: Any) -> bool | None:
    """EIGER1 sends booleans as 1/0, EIGER2 as true/false."""
    if isinstance(value, bool):
        return value
    if value in (0, 1):
        return bool(value)
    return None
