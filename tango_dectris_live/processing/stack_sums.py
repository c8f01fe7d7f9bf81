"""The built-in exact ``sum`` and ``sumsig`` straight from a compressed frame stack (the fused path).

Through LiberTEM, a worker decodes a tile of frames into memory and the UDFs read it back, twice
for sum + sumsig: at 512x512 the decoded tile (4 MiB) does not fit the core's L2 cache, so every
pixel goes to memory and back three times, and each partition pays for LiberTEM's per-partition and
per-tile steps. Here the receiver's compiled decoder (``StackDecoder.decode_blocks``) decodes each
bslz4 frame an 8 KiB bitshuffle block at a time, for a few frames side by side, and hands every
decoded block to the compiled sums (``_pixel_sums.FrameSums``) while it is still in the L1 cache;
the sum's accumulator for that block's pixels stays in L1 too. No decoded frame is written to
memory at all. The results are the same integers the UDFs compute (the tests compare them bit for
bit); the runner takes this path only when ExactSumUDF and ExactSumSigUDF themselves are all a
series runs (``runner._fused_sums``), so any other analysis, a facility's own included, and any
subclass of these two go through LiberTEM's UDF interface as before.
"""
from __future__ import annotations

import threading

import dectris.compression
import numpy as np

from tango_dectris_live.receiver import _stack_decode
from tango_dectris_live.receiver.framestack import FrameStackHandle, attach_segment, dtype_tag
from tango_dectris_live.receiver.native import function_addresses

from . import _pixel_sums

_FUNCTIONS = ("compression_decompress_buffer", "LZ4_decompress_safe", "bitshuf_decode_block")
# Frames decoded block after block together (a whole QUADRO stack: the sum's accumulator for a
# block stays in L1 while its block of every frame is added) and handed to the sums 4 at a time (four
# 8 KiB blocks, the sums' four-frame loop); measured with benchmarks/bench_worker_stack.py.
_CHUNK_FRAMES = 256
_GROUP_ROWS = 4
_decoders = threading.local()  # a StackDecoder owns scratch buffers: one per thread


def _decoder() -> _stack_decode.StackDecoder:
    decoder = getattr(_decoders, "decoder", None)
    if decoder is None:
        addresses = function_addresses(dectris.compression.__file__, _FUNCTIONS,
                                       "the fused sums were written for dectris-compression 0.4")
        decoder = _decoders.decoder = _stack_decode.StackDecoder(addresses)
    return decoder


class StackSums:
    """The fused path over the receiver's frame stacks (:class:`FrameStackHandle`), as a
    :class:`~.live_dataset.FrameSource` offers it (``stack_sums``); both methods are static, so
    the class itself travels to the worker processes."""

    @staticmethod
    def accepts(handle: FrameStackHandle, begin: int, end: int, dtype: np.dtype | str) -> bool:
        """Whether the frames at the stack's positions ``[begin, end)`` can be summed here: all of
        them in ``dtype`` (unsigned 8/16/32-bit, native), the series' pixel type."""
        dtype = np.dtype(dtype)
        if dtype.kind != "u" or dtype.itemsize > 4 or not dtype.isnative or not isinstance(handle, FrameStackHandle):
            return False
        if not 0 <= begin <= end <= handle.frames:
            raise IndexError(f"frames [{begin}, {end}) are outside the stack of {handle.frames} frames")
        return bool(np.all(handle.index()["dtype_tag"][begin:end] == dtype_tag(dtype)))

    @staticmethod
    def add(handle: FrameStackHandle, positions: np.ndarray, frame_shape: tuple[int, int], dtype: np.dtype | str,
            counts: np.ndarray | None, totals: np.ndarray | None) -> None:
        """Add the frames (``frame_shape``, pixels of ``dtype``: see :meth:`accepts`) at the stack
        positions ``positions`` into ``counts`` (``frame_shape``, uint32 or uint64: the exact sum)
        and their exact pixel sums into ``totals[i]`` (float64, one per position); either may be
        None. Raises the stream error of a frame that cannot be decoded, naming it (the sums then
        hold part of the frames: the stack failed)."""
        dtype = np.dtype(dtype)
        positions = np.ascontiguousarray(positions, dtype=np.int64)
        pixels = int(np.prod(frame_shape))
        flat_counts = None
        if counts is not None:
            if counts.shape != tuple(frame_shape) or not counts.flags.c_contiguous:
                raise ValueError(f"counts of shape {counts.shape} for frames of shape {tuple(frame_shape)}")
            flat_counts = counts.reshape(-1)
        if totals is not None and (totals.shape != (positions.size,) or totals.dtype != np.float64):
            raise ValueError(f"totals must be float64 of shape ({positions.size},), not {totals.dtype} {totals.shape}")
        if positions.size == 0:
            return
        sums = _pixel_sums.FrameSums(dtype, flat_counts, totals)
        layout = handle.layout
        slot_start = handle.slot * layout.slot_bytes
        kind = _stack_decode.PIXEL_TYPES[dtype.name]
        _decoder().decode_blocks(attach_segment(handle.segment), slot_start, slot_start + layout.index_bytes,
                                 handle.frames, positions, kind, pixels, 0, sums.sink, sums.context,
                                 _GROUP_ROWS, _CHUNK_FRAMES)
