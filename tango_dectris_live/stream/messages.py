"""The message model shared by stream v1 and v2: series header, image frame, series end.

Shapes are always numpy order ``(height, width)``: the v1 ``shape`` field (``[W, H]``) and the
v2 tag-40 dims (``[H, W]``) are both converted by the parsers. Image frames keep their pixels
compressed; see :mod:`tango_dectris_live.stream.decode` to get arrays.
"""
from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Union

import numpy as np

Blob = Union[bytes, memoryview]

_EMPTY_MAPPING: Mapping[str, Any] = MappingProxyType({})
_LITTLE = np.little_endian


class Algorithm(str, enum.Enum):
    """How a frame's pixel bytes are compressed."""

    BSLZ4 = "bslz4"
    """Bitshuffle + LZ4 with the 12-byte HDF5 framing (v1 ``bsNN-lz4<``, v2 ``bslz4``)."""
    LZ4 = "lz4"
    """Stream v1 ``lz4<``: one raw LZ4 block over the whole frame, no header."""
    LZ4H5 = "lz4h5"
    """Stream v2 ``lz4``: LZ4 with the HDF5 filter 32004 framing."""
    BSZSTD = "bszstd"
    """Bitshuffle + Zstandard with the 12-byte HDF5 framing (v2 only)."""
    NONE = "none"
    """Uncompressed pixels."""

    @property
    def code(self) -> int:
        """A small stable integer for binary frame indexes (shared memory, C code)."""
        return _ALGORITHM_CODES[self]


_ALGORITHM_CODES = {
    Algorithm.NONE: 0,
    Algorithm.BSLZ4: 1,
    Algorithm.LZ4: 2,
    Algorithm.LZ4H5: 3,
    Algorithm.BSZSTD: 4,
}


def algorithm_from_code(code: int) -> Algorithm:
    """The inverse of :attr:`Algorithm.code`."""
    for algorithm, value in _ALGORITHM_CODES.items():
        if value == code:
            return algorithm
    raise ValueError(f"no compression algorithm has code {code}")


@dataclass(frozen=True)
class Encoding:
    """What a decoder needs besides the frame shape: the algorithm and the pixel type of the
    decompressed bytes (element size, byte order ``<``/``>``, numpy kind ``u``/``i``/``f``)."""

    algorithm: Algorithm
    elem_size: int
    byte_order: str = "<"
    kind: str = "u"

    @property
    def dtype(self) -> np.dtype:
        """The numpy dtype of the decompressed pixels."""
        return np.dtype(f"{self.byte_order}{self.kind}{self.elem_size}")

    @classmethod
    def for_dtype(cls, algorithm: Algorithm, dtype: np.dtype | str) -> Encoding:
        """The encoding of pixels of ``dtype`` compressed with ``algorithm``."""
        dt = np.dtype(dtype)
        byte_order = ">" if dt.byteorder == ">" or (dt.byteorder == "=" and not _LITTLE) else "<"
        return cls(Algorithm(algorithm), dt.itemsize, byte_order, dt.kind)



@dataclass(frozen=True)
class FrameData:
    """One channel of one image: the compressed pixels and how to decode them."""

    shape: tuple[int, int]
    """(height, width)."""
    encoding: Encoding
    blob: Blob = field(repr=False)
    order: str = "C"
    """``"C"`` row-major (v1, v2 tag 40) or ``"F"`` column-major (v2 tag 1040)."""

    @property
    def dtype(self) -> np.dtype:
        return self.encoding.dtype

    @property
    def nbytes(self) -> int:
        """Size of the decompressed frame in bytes."""
        return self.shape[0] * self.shape[1] * self.encoding.elem_size


@dataclass(frozen=True)
class SeriesHeader:
    """The start of a series (v1 global header, v2 start message)."""

    series_id: int
    unique_id: str | None = None
    """v2 ``series_unique_id``; ``None`` for v1."""
    header_detail: str | None = None
    """v1 ``all``/``basic``/``none``; ``None`` for v2, which has no such field."""
    config: Mapping[str, Any] = field(default_factory=lambda: _EMPTY_MAPPING)
    """v1: the detector config part; v2: the scalar fields of the start message."""
    shape: tuple[int, int] | None = None
    """Detector image (height, width) when the header says it."""
    dtype: np.dtype | None = None
    """Pixel type of the images when the header says it (v1 ``bit_depth_image``, v2
    ``image_dtype``); frames always carry their own."""
    count_time: float | None = None
    frame_time: float | None = None
    number_of_images: int | None = None
    """Frames in the series (v1 ``nimages·ntrigger``, v2 ``number_of_images``)."""
    channels: tuple[str, ...] = ()
    """v2 channel names in data order; empty for v1 (one unnamed channel)."""
    beam_center: tuple[float, float] | None = None
    """(x, y) in pixels."""
    flatfield_enabled: bool | None = None
    pixel_mask_enabled: bool | None = None
    countrate_correction_enabled: bool | None = None
    flatfield: Mapping[str, np.ndarray] = field(default_factory=lambda: _EMPTY_MAPPING)
    """Per channel (v1: key ``""``), (height, width) float32; empty unless header_detail all."""
    pixel_mask: Mapping[str, np.ndarray] = field(default_factory=lambda: _EMPTY_MAPPING)
    """Per channel (v1: key ``""``), (height, width) uint32; empty unless header_detail all."""
    countrate_table: np.ndarray | None = None
    """v1: (N, 2) float32 pairs; v2: the 1-D lookup table as sent."""
    appendix: Any = None
    """v1 header appendix (text), v2 ``user_data``."""
    v1_tick_s: float | None = None
    """v1 only: the unit of the image ``dconfig`` times in seconds (20 ns before SIMPLON 1.8,
    1 ns from 1.8 on)."""


@dataclass(frozen=True)
class ImageFrame:
    """One image of a series, pixels still compressed."""

    series_id: int
    frame_number: int
    """0-based, continuous over the whole series (v1 ``frame``, v2 ``image_id``)."""
    data: tuple[FrameData, ...]
    """One entry per channel, in channel order; v1 has exactly one."""
    channels: tuple[str, ...] = ()
    """v2 channel names matching ``data``; empty for v1."""
    unique_id: str | None = None
    start_time: float | None = None
    """Seconds (v2: since ``series_date``; v1: detector clock, arbitrary origin)."""
    stop_time: float | None = None
    real_time: float | None = None
    """Exposure time in seconds."""
    raw_times: Mapping[str, Any] = field(default_factory=lambda: _EMPTY_MAPPING)
    """The times as sent: v1 integers (ticks or ns), v2 ``(numerator, denominator)``."""
    series_date: str | None = None
    appendix: Any = None
    """v1 image appendix (text), v2 ``user_data``."""

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width) of the first channel."""
        return self.data[0].shape

    @property
    def dtype(self) -> np.dtype:
        return self.data[0].dtype

    @property
    def encoding(self) -> Encoding:
        return self.data[0].encoding

    @property
    def blob(self) -> Blob:
        """Compressed pixels of the first channel."""
        return self.data[0].blob

    def channel_data(self, channel: str | int | None = None) -> FrameData:
        """The data of one channel, by name or index; ``None`` is the first channel."""
        if channel is None:
            return self.data[0]
        if isinstance(channel, int):
            if not -len(self.data) <= channel < len(self.data):
                raise IndexError(f"frame has {len(self.data)} channel(s), no index {channel}")
            return self.data[channel]
        try:
            return self.data[self.channels.index(channel)]
        except ValueError:
            raise KeyError(
                f"frame has no channel {channel!r}; channels: {list(self.channels)}"
            ) from None


@dataclass(frozen=True)
class SeriesEnd:
    """The end of a series (v1 ``dseries_end``, v2 end message). It may be stale, from a series
    before the current header: the caller compares ``series_id``."""

    series_id: int
    unique_id: str | None = None


StreamMessage = Union[SeriesHeader, ImageFrame, SeriesEnd]
