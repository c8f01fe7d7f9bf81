"""The UDFs this project writes itself, for analyses LiberTEM has no UDF for."""
from __future__ import annotations

import math

import numpy as np
from libertem.udf.base import UDF

from . import _pixel_sums


class LastFrameUDF(UDF):
    """The frame with the highest scan index seen so far (the most recent one of a scan).

    The scan index is kept next to the frame, so that partial results merged in any order
    still end with the latest frame.
    """

    def get_preferred_input_dtype(self):
        return self.USE_NATIVE_DTYPE  # the frame as the detector sent it (mask values included)

    def get_result_buffers(self):
        return {
            "frame": self.buffer(kind="sig", dtype=self.meta.input_dtype),
            # flat scan index + 1 of the frame held; 0 = no frame yet
            "position": self.buffer(kind="single", dtype=np.int64),
        }

    def process_tile(self, tile):
        position = self.meta.slice.origin[0] + tile.shape[0]
        if position > self.results.position[0]:
            self.results.frame[:] = tile[-1]
            self.results.position[0] = position

    def merge(self, dest, src):
        if src.position[0] > dest.position[0]:
            dest.frame[:] = src.frame
            dest.position[:] = src.position


def exact_accumulator(dtype: np.dtype, terms: int) -> np.dtype:
    """The narrowest type that adds ``terms`` values of integer ``dtype`` without overflow.

    Integer sums with a 32-bit accumulator run 2-4x faster than float64 ones (measured with
    numpy 2.4: 96x96 uint16 frames, 571k vs 147k frames/s); the float64 result buffer takes the
    exact integer afterwards. Float pixels are summed in float64."""
    dtype = np.dtype(dtype)
    if dtype.kind not in "ui":
        return np.dtype(np.float64)
    bits = dtype.itemsize * 8 + max(1, int(terms - 1).bit_length())
    if dtype.kind == "u":
        return np.dtype(np.uint32 if bits <= 32 else np.uint64)
    return np.dtype(np.int32 if bits < 32 else np.int64)


_NARROW_COUNT_FRAMES = (2**32 - 1) // (2**16 - 1)  # uint16 values a uint32 sum always holds

# Tiles of ~4 MiB for the compiled sums: per-tile costs (decode call, LiberTEM's views) spread
# over more frames; measured 4.65 -> 4.13 us/frame (96x96) and 126 -> 108 us/frame (512x512)
# against 1 MiB tiles for sum+sumsig in a worker (docs/performance.md).
_SUM_TILE_BYTES = 4 << 20


class _ExactSumTiles:
    """Tiling preference of the compiled-sum UDFs."""

    def get_tiling_preferences(self):
        return {"depth": UDF.TILE_DEPTH_DEFAULT, "total_size": _SUM_TILE_BYTES}


def _native_pixels(tile: np.ndarray) -> np.ndarray | None:
    """``tile`` as (frames, pixels) if the compiled sums take it (unsigned 8/16/32-bit, C order)."""
    if tile.dtype.kind != "u" or tile.dtype.itemsize > 4 or not tile.dtype.isnative:
        return None
    if not tile.flags.c_contiguous:
        return None
    return tile.reshape(tile.shape[0], -1)


class ExactSumUDF(_ExactSumTiles, UDF):
    """Sum of all frames, exact for integer pixels: frames come in their native type (no
    conversion, no float32 rounding) and are added into 64-bit integers (the private buffer
    ``counts``); the result ``intensity`` is float64, exact to 2**53 counts per pixel."""

    def get_preferred_input_dtype(self):
        return self.USE_NATIVE_DTYPE

    def get_result_buffers(self):
        dtype = np.dtype(self.meta.input_dtype)
        counts = np.uint64 if dtype.kind == "u" else np.int64 if dtype.kind == "i" else np.float64
        if dtype.kind == "u" and dtype.itemsize <= 2 and self._partition_frames() <= _NARROW_COUNT_FRAMES:
            counts = np.uint32  # a partition's counts fit; the merged total is uint64
        return {
            "counts": self.buffer(kind="sig", dtype=counts, use="private"),
            "intensity": self.buffer(kind="sig", dtype=np.float64, use="result_only"),
        }

    def process_tile(self, tile):
        pixels = _native_pixels(tile)
        counts = self.results.counts
        if pixels is not None and counts.flags.c_contiguous:
            _pixel_sums.add_frames(pixels, counts.reshape(-1))
        else:
            counts[:] += np.sum(tile, axis=0, dtype=exact_accumulator(tile.dtype, tile.shape[0]))

    def _partition_frames(self) -> float:
        """Frames of the partition being processed (infinite for the whole-scan buffers)."""
        try:
            return self.meta.partition_shape.nav.size
        except ValueError:  # no partition: the main process' buffers for the whole scan
            return math.inf

    def merge(self, dest, src):
        dest.counts[:] += src.counts

    def get_results(self):
        return {"intensity": self.results.counts.astype(np.float64)}


class ExactSumSigUDF(_ExactSumTiles, UDF):
    """Total counts of each frame, exact for integer pixels (native type in, float64 out)."""

    def get_preferred_input_dtype(self):
        return self.USE_NATIVE_DTYPE

    def get_result_buffers(self):
        return {"intensity": self.buffer(kind="nav", dtype=np.float64)}

    def process_tile(self, tile):
        pixels = _native_pixels(tile)
        totals = self.results.intensity
        if pixels is not None and totals.flags.c_contiguous:
            _pixel_sums.add_frame_totals(pixels, totals)
        else:
            flat = tile.reshape(tile.shape[0], -1)
            totals[:] += np.sum(flat, axis=1, dtype=exact_accumulator(tile.dtype, flat.shape[1]))
