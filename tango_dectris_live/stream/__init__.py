"""DECTRIS stream formats: message model, stream v1 and v2 parsing, frame decoding."""
from .decode import decode_frame, decode_frame_into, decompress_bytes
from .errors import (
    CorruptFrameError,
    FrameSizeMismatchError,
    MalformedMessageError,
    StreamFormatError,
    UnknownMessageError,
    UnsupportedEncodingError,
)
from .messages import (
    Algorithm,
    Encoding,
    FrameData,
    ImageFrame,
    SeriesEnd,
    SeriesHeader,
    StreamMessage,
    algorithm_from_code,
)
from .v1 import V1MessageAssembler, parse_v1_encoding, parse_v1_message, v1_tick_s_for
from .v1_framing import V1Regrouper
from .v2 import CBOR_SIGNATURE, MISSING_SIGNATURE, UNTYPED_ARRAY, parse_v2_message

__all__ = [
    "Algorithm",
    "CBOR_SIGNATURE",
    "MISSING_SIGNATURE",
    "CorruptFrameError",
    "Encoding",
    "FrameData",
    "FrameSizeMismatchError",
    "ImageFrame",
    "MalformedMessageError",
    "SeriesEnd",
    "SeriesHeader",
    "StreamFormatError",
    "StreamMessage",
    "UnknownMessageError",
    "UNTYPED_ARRAY",
    "UnsupportedEncodingError",
    "V1MessageAssembler",
    "V1Regrouper",
    "algorithm_from_code",
    "decode_frame",
    "decode_frame_into",
    "decompress_bytes",
    "parse_v1_encoding",
    "parse_v1_message",
    "parse_v2_message",
    "v1_tick_s_for",
]
