"""The UDFs this project writes itself: analyses LiberTEM has no UDF for, and LiberTEM's own
mask and CoM UDFs with the tile step compiled (same results, same buffers)."""
from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import numpy as np
from libertem.udf.base import UDF
from libertem.udf.com import CoMUDF
from libertem.udf.masks import ApplyMasksUDF

from . import _pixel_sums
from .libertem_internals import COM_MASK_SUMS_BUFFER, dense_float32_masks, partition_frame_count


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


def partition_counts_dtype(input_dtype: np.dtype, frames: int | None) -> np.dtype:
    """The type of :class:`ExactSumUDF`'s ``counts`` for a partition of ``frames`` frames of
    ``input_dtype`` (None: the whole scan, merged): 64-bit integers (float64 for float pixels),
    uint32 where a partition's sum of 8/16-bit pixels always fits (half the bytes to add, send and
    merge). The runner's fused path (stack_sums.py) makes the same buffers."""
    dtype = np.dtype(input_dtype)
    if dtype.kind == "u" and dtype.itemsize <= 2 and frames is not None and frames <= _NARROW_COUNT_FRAMES:
        return np.dtype(np.uint32)
    return np.dtype(np.uint64 if dtype.kind == "u" else np.int64 if dtype.kind == "i" else np.float64)


def fused_sum_roles(udfs: list[UDF]) -> tuple[str, ...] | None:
    """Per UDF, ``"sum"`` or ``"sumsig"`` when ``udfs`` are only this module's
    :class:`ExactSumUDF` and :class:`ExactSumSigUDF` themselves (not subclasses, which may change
    what they compute): then the runner may compute their partition buffers straight from the
    compressed frames (stack_sums.py) instead of through LiberTEM; None otherwise."""
    roles = {ExactSumUDF: "sum", ExactSumSigUDF: "sumsig"}
    if not udfs or any(type(udf) not in roles for udf in udfs):
        return None
    return tuple(roles[type(udf)] for udf in udfs)

# Tiles of ~4 MiB for the compiled sums and mask sums: per-tile costs (decode call, LiberTEM's
# views) spread over more frames; measured against 1 MiB tiles in a worker, sum+sumsig 4.65 ->
# 4.13 us/frame (96x96) and 126 -> 108 (512x512); bf+adf+com 7.7-7.9 -> 6.8-7.1 (96x96) and
# 186-193 -> 158-164 (512x512) (docs/performance.md).
_SUM_TILE_BYTES = 4 << 20


class _ExactSumTiles:
    """Tiling preference of the compiled-sum and mask-sum UDFs."""

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
        # None: the main process' buffers for the whole scan (uint64); a partition's may be uint32
        counts = partition_counts_dtype(self.meta.input_dtype, partition_frame_count(self))
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


# ---------------------------------------------------------------------------------------------
# Masks (bf, adf) and CoM: the compiled weighted sums

_weights_lock = threading.Lock()
_weights_cache: dict[Any, tuple[Any, tuple[np.ndarray, int] | None]] = {}  # key -> (kept alive, weights)
_WEIGHTS_CACHE_SIZE = 16


def compact_weights(mask_stack: np.ndarray) -> tuple[np.ndarray, int]:
    """``(weights, lo)``: the (K, m) float32 weights of the K masks ``mask_stack`` (K, h, w) over
    the flat pixel range ``[lo, lo + m)`` outside which every mask is zero (a 4-pixel disk on a
    1028-pixel-wide frame: 9 rows instead of 1062)."""
    flat = np.asarray(mask_stack, dtype=np.float32).reshape(len(mask_stack), -1)
    used = np.flatnonzero(np.any(flat != 0, axis=0))
    if used.size == 0:
        return np.zeros((flat.shape[0], 0), np.float32), 0
    lo, hi = int(used[0]), int(used[-1]) + 1
    return np.ascontiguousarray(flat[:, lo:hi]), lo


def _cached_weights(key: Any, keep: Any, make: Callable[[], tuple[np.ndarray, int] | None]
                    ) -> tuple[np.ndarray, int] | None:
    """``make()`` (compact weights, or None where the compiled loop does not apply) once per
    worker process and series: a new UDF instance per partition must not build 1M-pixel masks
    again. ``keep`` is stored with the entry so that an ``id()`` in ``key`` cannot be reused while
    the entry lives."""
    with _weights_lock:
        if key in _weights_cache:
            return _weights_cache[key][1]
    made = make()
    with _weights_lock:
        if len(_weights_cache) >= _WEIGHTS_CACHE_SIZE:
            _weights_cache.pop(next(iter(_weights_cache)))
        _weights_cache[key] = (keep, made)
    return made


def _weighted_sums(udf: UDF, tile: np.ndarray, weights: np.ndarray, lo: int) -> np.ndarray | None:
    """(frames, K) float64 mask sums of ``tile`` by the compiled loop, or None when it does not
    apply (float or signed pixels, a tile that is not whole frames)."""
    pixels = _native_pixels(tile)
    sig = udf.meta.sig_slice
    if pixels is None or tuple(sig.shape) != tuple(udf.meta.dataset_shape.sig) or any(sig.origin):
        return None
    out = np.zeros((pixels.shape[0], weights.shape[0]))
    _pixel_sums.add_weighted_sums(pixels, weights, lo, out)
    return out


def _compact_masks(udf: UDF) -> tuple[np.ndarray, int] | None:
    """:func:`compact_weights` of the UDF's masks if they are dense float32 (None otherwise)."""
    masks = dense_float32_masks(udf)
    return None if masks is None else compact_weights(masks)


class _CompiledMaskSums(_ExactSumTiles):
    """The tile step of a LiberTEM mask UDF through the compiled weighted sums: unsigned frames
    come as they are (no float copy) and the sums land in the buffer ``_sums_buffer``; anything
    the compiled loop does not take goes to the LiberTEM class' own ``process_tile``."""

    _sums_buffer = "intensity"

    def get_preferred_input_dtype(self):
        return self.USE_NATIVE_DTYPE

    def _weights(self) -> tuple[np.ndarray, int] | None:
        raise NotImplementedError

    def process_tile(self, tile):
        weights = self._weights()
        sums = None if weights is None else _weighted_sums(self, tile, *weights)
        if sums is None:
            super().process_tile(tile)
        else:
            getattr(self.results, self._sums_buffer)[:] += sums


class CompiledMasksUDF(_CompiledMaskSums, ApplyMasksUDF):
    """LiberTEM's ApplyMasksUDF (``intensity``: one value per frame and mask) for dense float32
    masks, with unsigned 8/16/32-bit frames taken as they come and multiplied in a compiled loop
    over the masks' pixel range only -- no float copy of the frames, no matrix product over the
    masks' zeros. Other frames and masks go through LiberTEM's own code. The result type is the
    one LiberTEM gives (float32, float64 for 32-bit pixels)."""

    def get_result_buffers(self):
        dtype = np.result_type(np.float32, self.meta.input_dtype, self.get_mask_dtype())
        return {"intensity": self.buffer(kind="nav", extra_shape=(self.get_mask_count(),), dtype=dtype,
                                         where="device")}

    def _weights(self) -> tuple[np.ndarray, int] | None:
        factories = self.params.mask_factories
        key = ("masks", id(factories), tuple(self.meta.dataset_shape.sig))
        return _cached_weights(key, factories, lambda: _compact_masks(self))


class CompiledCoMUDF(_CompiledMaskSums, CoMUDF):
    """LiberTEM's CoMUDF with its three mask sums per frame (total, y- and x-weighted) taken by the
    compiled loop on unsigned 8/16/32-bit frames as they come; results and their types are
    LiberTEM's (``get_results`` is CoMUDF's)."""

    _sums_buffer = COM_MASK_SUMS_BUFFER

    def get_field_results(self, field_y: np.ndarray, field_x: np.ndarray) -> dict[str, np.ndarray]:
        """LiberTEM's magnitude, divergence and curl; divergence and curl need a gradient along
        both scan axes (NumPy refuses one of fewer than 2 positions): NaN for a line scan, a
        single point (a step scan's point, ``ct``) or a 1-D scan, where LiberTEM's raises."""
        if field_y.ndim == 2 and min(field_y.shape) >= 2:
            return super().get_field_results(field_y, field_x)
        nan = np.full(field_y.shape, np.nan)
        return {"magnitude": np.sqrt(field_y ** 2 + field_x ** 2), "divergence": nan, "curl": nan.copy()}

    def _weights(self) -> tuple[np.ndarray, int] | None:
        params = self.get_params()
        key = ("com", tuple(self.meta.dataset_shape.sig), float(params.cy), float(params.cx), float(params.r),
               None if params.ri is None else float(params.ri))
        return _cached_weights(key, None, lambda: _compact_masks(self))
