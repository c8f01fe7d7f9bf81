"""Exceptions for malformed or unsupported stream data.

Every exception carries a short machine-usable ``reason`` (e.g. ``"corrupt_blob"``) that the
receiver uses as a counter key; the message is meant for a beamline scientist.
"""
from __future__ import annotations


class StreamFormatError(ValueError):
    """A stream message or frame that cannot be used as it is."""

    default_reason = "stream_format"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason: str = reason or self.default_reason


class UnknownMessageError(StreamFormatError):
    """The message kind (v1 ``htype``, v2 ``type``) is not one this parser knows."""

    default_reason = "unknown_message"


class MalformedMessageError(StreamFormatError):
    """Bad JSON/CBOR, a missing or mistyped key, or the wrong number of message parts."""

    default_reason = "malformed_message"


class UnsupportedEncodingError(StreamFormatError):
    """A frame encoding or pixel type this project cannot decode (e.g. big-endian data)."""

    default_reason = "unsupported_encoding"


class FrameSizeMismatchError(StreamFormatError):
    """A declared size disagrees with the data: ``size`` field vs. blob length, or the
    decompressed size vs. height × width × element size."""

    default_reason = "size_mismatch"


class CorruptFrameError(StreamFormatError):
    """The compressed pixel data could not be decompressed."""

    default_reason = "corrupt_blob"
