"""Stream v2: single-part ZeroMQ messages, each one CBOR map (SIMPLON.md §4).

Image pixels stay compressed (tag 56500 is not decompressed here); start-message arrays
(flatfield, pixel mask, count-rate table) are decoded eagerly because they are used once.

cbor2 6.x calls a ``tag_hook`` as ``hook(tag, immutable)`` (verified with cbor2 6.3; its
docstring and DECTRIS's tag-56500 page still show the cbor2 5 form ``hook(decoder, tag)``).
"""
from __future__ import annotations

from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Union

import cbor2
import numpy as np

from .decode import decompress_bytes
from .errors import (
    FrameSizeMismatchError,
    MalformedMessageError,
    StreamFormatError,
    UnknownMessageError,
    UnsupportedEncodingError,
)
from .messages import Algorithm, Encoding, FrameData, ImageFrame, SeriesEnd, SeriesHeader, StreamMessage

#: CBOR self-described tag 55799, which every DECTRIS v2 message starts with.
CBOR_SIGNATURE = b"\xd9\xd9\xf7"
#: Warning/error reason for a message without :data:`CBOR_SIGNATURE`.
MISSING_SIGNATURE = "missing_cbor_signature"
#: Warning reason for a start-message array sent as a plain byte string (no type, no shape).
UNTYPED_ARRAY = "untyped_array"

_TAG_ROW_MAJOR = 40
_TAG_COLUMN_MAJOR = 1040
_TAG_COMPRESSED = 56500

# RFC 8746 typed arrays (float16/float128 and the clamped uint8 have no use here but are cheap).
_TYPED_ARRAY_DTYPES = {
    64: "u1", 65: ">u2", 66: ">u4", 67: ">u8", 68: "u1",
    69: "<u2", 70: "<u4", 71: "<u8",
    72: "i1", 73: ">i2", 74: ">i4", 75: ">i8",
    77: "<i2", 78: "<i4", 79: "<i8",
    80: ">f2", 81: ">f4", 82: ">f8",
    84: "<f2", 85: "<f4", 86: "<f8",
}

_V2_ALGORITHMS = {"bslz4": Algorithm.BSLZ4, "lz4": Algorithm.LZ4H5, "bszstd": Algorithm.BSZSTD}

# Fields of the start message that SeriesHeader holds as arrays or ids rather than in `config`.
_START_NON_CONFIG_KEYS = frozenset(
    {"type", "series_id", "series_unique_id", "flatfield", "pixel_mask",
     "countrate_correction_lookup_table", "user_data"}
)


@dataclass(frozen=True)
class _CompressedBytes:
    """Tag 56500: bytes that stand for their decompressed content."""

    algorithm: str
    elem_size: int
    data: bytes


@dataclass(frozen=True)
class _TypedArray:
    dtype: np.dtype
    payload: Union[bytes, _CompressedBytes]


@dataclass(frozen=True)
class _MultiDimArray:
    dims: tuple[int, ...]
    array: _TypedArray
    order: str


def parse_v2_message(
    data: bytes | memoryview,
    *,
    require_signature: bool = False,
    warning_counts: MutableMapping[str, int] | None = None,
) -> StreamMessage:
    """Parse one stream v2 message into a :class:`SeriesHeader`, :class:`ImageFrame` or
    :class:`SeriesEnd`.

    Every DECTRIS message starts with the CBOR self-describe tag 55799, and DECTRIS's own parser
    rejects messages without it. Here such a message is accepted, because it decodes all the
    same (the start message of the EIGER2 16M capture was re-encoded without it), and counted
    as ``warning_counts["missing_cbor_signature"]`` when a counter (e.g. ``collections.Counter``) is
    given; ``require_signature=True`` rejects it instead. Unknown keys are ignored; the key order
    is not checked, but ``type`` must be present.
    """
    if bytes(data[:3]) != CBOR_SIGNATURE:
        if require_signature:
            raise MalformedMessageError(
                "stream v2 message does not start with the CBOR self-describe tag 55799 (d9 d9 f7); "
                "is the detector's stream format set to cbor/v2?",
                reason=MISSING_SIGNATURE,
            )
        if warning_counts is not None:
            warning_counts[MISSING_SIGNATURE] = warning_counts.get(MISSING_SIGNATURE, 0) + 1
    try:
        message = cbor2.loads(data, tag_hook=_decode_tag, semantic_decoders={0: _keep_datetime_text})
    except cbor2.CBORDecodeError as error:
        if isinstance(error.__cause__, StreamFormatError):
            raise error.__cause__ from None
        raise MalformedMessageError(f"stream v2 message is not valid CBOR: {error}", reason="bad_cbor") from None
    if not isinstance(message, Mapping):
        raise MalformedMessageError(
            f"stream v2 message is a CBOR {type(message).__name__}, expected a map", reason="bad_cbor"
        )
    kind = _field(message, "type", str, "message")
    if kind == "image":
        return _parse_image(message)
    if kind == "start":
        return _parse_start(message, warning_counts)
    if kind == "end":
        return SeriesEnd(
            series_id=_field(message, "series_id", int, "end message"),
            unique_id=_optional(message, "series_unique_id", str, "end message"),
        )
    raise UnknownMessageError(f"unknown stream v2 message type {kind!r} (expected start, image or end)")


def _keep_datetime_text(value: Any, immutable: bool) -> Any:
    """Tag 0: keep the RFC 3339 text as sent, instead of cbor2's datetime."""
    return value


def _decode_tag(tag: cbor2.CBORTag, immutable: bool) -> Any:
    """Tags nest inside-out (56500 → typed array → 40), so each level wraps the one below."""
    number, value = tag.tag, tag.value
    if number == _TAG_COMPRESSED:
        if not (isinstance(value, Sequence) and len(value) == 3 and isinstance(value[0], str)
                and _is_int(value[1]) and isinstance(value[2], bytes)):
            raise MalformedMessageError(
                "tag 56500 should hold [algorithm, element size, bytes]", reason="bad_value"
            )
        return _CompressedBytes(value[0], value[1], value[2])
    dtype = _TYPED_ARRAY_DTYPES.get(number)
    if dtype is not None:
        if not isinstance(value, (bytes, _CompressedBytes)):
            raise MalformedMessageError(f"typed array tag {number} does not hold bytes", reason="bad_value")
        return _TypedArray(np.dtype(dtype), value)
    if number in (_TAG_ROW_MAJOR, _TAG_COLUMN_MAJOR):
        if not (isinstance(value, Sequence) and len(value) == 2 and isinstance(value[0], Sequence)
                and all(_is_int(n) and n >= 0 for n in value[0]) and isinstance(value[1], _TypedArray)):
            raise MalformedMessageError(
                f"tag {number} should hold [[dims...], typed array]", reason="bad_value"
            )
        return _MultiDimArray(tuple(value[0]), value[1], "C" if number == _TAG_ROW_MAJOR else "F")
    # An unknown tag may only sit under a key this parser ignores; keep it as it is.
    return tag


def _parse_image(message: Mapping[str, Any]) -> ImageFrame:
    series_id = _field(message, "series_id", int, "image message")
    frame_number = _field(message, "image_id", int, "image message")
    where = f"image {frame_number}"
    if frame_number < 0:
        raise MalformedMessageError(f"image message: negative image_id {frame_number}", reason="bad_value")
    channel_map = _field(message, "data", Mapping, where)
    if not channel_map:
        raise MalformedMessageError(f"{where}: 'data' has no channel", reason="bad_value")
    channels = []
    frames = []
    for channel, array in channel_map.items():
        if not isinstance(array, _MultiDimArray) or len(array.dims) != 2:
            raise MalformedMessageError(
                f"{where}: channel {channel!r} is not a 2-D multi-dimensional array (tag 40)", reason="bad_value"
            )
        channels.append(str(channel))
        frames.append(_frame_data(array, f"{where} channel {channel!r}"))
    times = {key: _rational(message, key, where) for key in ("start_time", "stop_time", "real_time")}
    return ImageFrame(
        series_id=series_id,
        frame_number=frame_number,
        data=tuple(frames),
        channels=tuple(channels),
        unique_id=_optional(message, "series_unique_id", str, where),
        start_time=_seconds(times["start_time"]),
        stop_time=_seconds(times["stop_time"]),
        real_time=_seconds(times["real_time"]),
        raw_times=MappingProxyType({key: value for key, value in times.items() if value is not None}),
        series_date=_optional(message, "series_date", str, where),
        appendix=message.get("user_data"),
    )


def _frame_data(array: _MultiDimArray, where: str) -> FrameData:
    """The pixels of one channel, still compressed; tag-40 dims are already [height, width]."""
    height, width = array.dims
    dtype = array.array.dtype
    payload = array.array.payload
    if isinstance(payload, _CompressedBytes):
        algorithm = _V2_ALGORITHMS.get(payload.algorithm)
        if algorithm is None:
            raise UnsupportedEncodingError(
                f"{where}: unknown compression {payload.algorithm!r} (known: {', '.join(_V2_ALGORITHMS)})"
            )
        if algorithm is not Algorithm.LZ4H5 and payload.elem_size != dtype.itemsize:
            raise UnsupportedEncodingError(
                f"{where}: {payload.algorithm} element size {payload.elem_size} does not match the "
                f"typed array's {dtype.itemsize}-byte {dtype.name}",
                reason="encoding_dtype_mismatch",
            )
        blob = payload.data
    else:
        algorithm = Algorithm.NONE
        blob = payload
        if len(blob) != height * width * dtype.itemsize:
            raise FrameSizeMismatchError(
                f"{where}: uncompressed array has {len(blob)} bytes, {width}x{height} {dtype.name} "
                f"needs {height * width * dtype.itemsize}"
            )
    return FrameData(shape=(height, width), encoding=Encoding.for_dtype(algorithm, dtype), blob=blob, order=array.order)


def _parse_start(message: Mapping[str, Any], warning_counts: MutableMapping[str, int] | None) -> SeriesHeader:
    where = "start message"
    series_id = _field(message, "series_id", int, where)
    channels = _optional(message, "channels", Sequence, where) or ()
    width = _optional(message, "image_size_x", int, where)
    height = _optional(message, "image_size_y", int, where)
    dtype_name = _optional(message, "image_dtype", str, where)
    try:
        dtype = np.dtype(dtype_name).newbyteorder("<") if dtype_name else None
    except TypeError:
        raise UnsupportedEncodingError(
            f"{where}: unknown image_dtype {dtype_name!r}", reason="unsupported_dtype"
        ) from None
    beam_x = _optional(message, "beam_center_x", (int, float), where)
    beam_y = _optional(message, "beam_center_y", (int, float), where)
    countrate_table = _correction_array(
        message.get("countrate_correction_lookup_table"), "countrate_correction_lookup_table", warning_counts
    )
    return SeriesHeader(
        series_id=series_id,
        unique_id=_optional(message, "series_unique_id", str, where),
        config=MappingProxyType(
            {key: _plain(value) for key, value in message.items() if key not in _START_NON_CONFIG_KEYS}
        ),
        shape=(height, width) if height is not None and width is not None else None,
        dtype=dtype,
        count_time=_optional_float(message, "count_time", where),
        frame_time=_optional_float(message, "frame_time", where),
        number_of_images=_optional(message, "number_of_images", int, where),
        channels=tuple(str(name) for name in channels),
        beam_center=(float(beam_x), float(beam_y)) if beam_x is not None and beam_y is not None else None,
        flatfield_enabled=_optional(message, "flatfield_enabled", bool, where),
        pixel_mask_enabled=_optional(message, "pixel_mask_enabled", bool, where),
        countrate_correction_enabled=_optional(message, "countrate_correction_enabled", bool, where),
        flatfield=_channel_arrays(message, "flatfield", warning_counts),
        pixel_mask=_channel_arrays(message, "pixel_mask", warning_counts),
        countrate_table=countrate_table,
        appendix=message.get("user_data"),
    )


def _channel_arrays(
    message: Mapping[str, Any], key: str, warning_counts: MutableMapping[str, int] | None
) -> Mapping[str, np.ndarray]:
    value = message.get(key)
    if value is None:
        return MappingProxyType({})
    if not isinstance(value, Mapping):
        raise MalformedMessageError(f"start message: {key!r} should map channel to array", reason="bad_value")
    arrays = {
        str(channel): _correction_array(array, f"{key} {channel!r}", warning_counts) for channel, array in value.items()
    }
    return MappingProxyType({channel: array for channel, array in arrays.items() if array is not None})


def _correction_array(value: Any, where: str, warning_counts: MutableMapping[str, int] | None) -> np.ndarray | None:
    """A start-message array; an untagged byte string has no type or shape, so it is dropped
    and counted as ``warning_counts["untyped_array"]`` (the 16M capture has 4-byte placeholders)."""
    if value is None:
        return None
    if isinstance(value, bytes):
        if warning_counts is not None:
            warning_counts[UNTYPED_ARRAY] = warning_counts.get(UNTYPED_ARRAY, 0) + 1
        return None
    return _to_array(value, where)


def _to_array(value: Any, where: str) -> np.ndarray:
    """Materialise a (possibly compressed) typed or multi-dimensional array."""
    if isinstance(value, _MultiDimArray):
        flat = _to_array(value.array, where)
        if flat.size != int(np.prod(value.dims)):
            raise FrameSizeMismatchError(f"{where}: {flat.size} elements do not fill dims {list(value.dims)}")
        return flat.reshape(value.dims, order=value.order)
    if isinstance(value, _TypedArray):
        payload = value.payload
        if isinstance(payload, _CompressedBytes):
            algorithm = _V2_ALGORITHMS.get(payload.algorithm)
            if algorithm is None:
                raise UnsupportedEncodingError(f"{where}: unknown compression {payload.algorithm!r}")
            payload = decompress_bytes(payload.data, Encoding.for_dtype(algorithm, value.dtype), where=where)
        if len(payload) % value.dtype.itemsize:
            raise FrameSizeMismatchError(f"{where}: {len(payload)} bytes is not a whole number of {value.dtype.name}")
        return np.frombuffer(payload, dtype=value.dtype)
    raise MalformedMessageError(f"{where}: expected a typed array, got {type(value).__name__}", reason="bad_value")


def _plain(value: Any) -> Any:
    """A config value as plain Python: maps to dicts, arrays to lists, typed arrays to numpy."""
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, (_TypedArray, _MultiDimArray)):
        return _to_array(value, "start message field")
    return value


def _field(message: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in message:
        raise MalformedMessageError(f"{where}: missing key {key!r}", reason="missing_key")
    return _checked(message[key], key, kind, where)


def _optional(message: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    value = message.get(key)
    return None if value is None else _checked(value, key, kind, where)


def _checked(value: Any, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    bool_mismatch = isinstance(value, bool) and kind is not bool
    if not isinstance(value, kind) or bool_mismatch or (kind is Sequence and isinstance(value, str)):
        raise MalformedMessageError(f"{where}: {key!r} has an unexpected type: {value!r:.80}", reason="bad_value")
    return value


def _optional_float(message: Mapping[str, Any], key: str, where: str) -> float | None:
    value = _optional(message, key, (int, float), where)
    return None if value is None else float(value)


def _rational(message: Mapping[str, Any], key: str, where: str) -> tuple[int, int] | None:
    value = message.get(key)
    if value is None:
        return None
    if not (isinstance(value, Sequence) and len(value) == 2 and all(_is_int(n) for n in value) and value[1] > 0):
        raise MalformedMessageError(
            f"{where}: {key!r} should be a rational [numerator, denominator > 0], got {value!r:.80}",
            reason="bad_value",
        )
    return (value[0], value[1])


def _seconds(rational: tuple[int, int] | None) -> float | None:
    return None if rational is None else rational[0] / rational[1]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
