# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False, cdivision=True
"""Exact integer sums over tiles of frames, for the built-in ``sum`` and ``sumsig`` analyses.

NumPy's mixed-type reductions (uint16 pixels into a uint64 sum) convert through small buffers and
take 50-125 us per 512x512 frame; these loops add the pixels straight into wider integers, a block
of pixels at a time so that the accumulators stay in the L1 cache while the frames stream past.
The loops are C (``pixel_kernels.h``), built for x86-64-v4 (AVX-512), v3 (AVX2) and the baseline
on x86-64 Linux, the CPU's best chosen when the module loads. Both run without the GIL. Signed and
float pixels are left to NumPy by the callers.

:class:`FrameSums` is the consumer of the receiver's ``StackDecoder.decode_blocks``: both sums of
each decoded block in one pass, while the block is in the cache (processing/stack_sums.py).
"""
from libc.stddef cimport ptrdiff_t
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, uintptr_t

from tango_dectris_live.receiver._stack_decode cimport block_sink_fn

import numpy as np


cdef extern from "pixel_kernels.h" nogil:
    void tdl_add_u8_u32(const uint8_t *frames, size_t n, size_t pixels, uint32_t *acc)
    void tdl_add_u16_u32(const uint16_t *frames, size_t n, size_t pixels, uint32_t *acc)
    void tdl_add_u32_u64(const uint32_t *frames, size_t n, size_t pixels, uint64_t *acc)
    void tdl_add_u8_u64(const uint8_t *frames, size_t n, size_t pixels, uint64_t *acc)
    void tdl_add_u16_u64(const uint16_t *frames, size_t n, size_t pixels, uint64_t *acc)
    void tdl_totals_u8(const uint8_t *frames, size_t n, size_t pixels, double *totals)
    void tdl_totals_u16(const uint16_t *frames, size_t n, size_t pixels, double *totals)
    void tdl_totals_u32(const uint32_t *frames, size_t n, size_t pixels, double *totals)
    void tdl_weighted_u8_k1(const uint8_t *frames, size_t n, size_t pixels, size_t lo, size_t m,
                            const float *w, double *out)
    void tdl_weighted_u16_k1(const uint16_t *frames, size_t n, size_t pixels, size_t lo, size_t m,
                             const float *w, double *out)
    void tdl_weighted_u32_k1(const uint32_t *frames, size_t n, size_t pixels, size_t lo, size_t m,
                             const float *w, double *out)
    void tdl_weighted_u8_k3(const uint8_t *frames, size_t n, size_t pixels, size_t lo, size_t m,
                            const float *w, double *out)
    void tdl_weighted_u16_k3(const uint16_t *frames, size_t n, size_t pixels, size_t lo, size_t m,
                             const float *w, double *out)
    void tdl_weighted_u32_k3(const uint32_t *frames, size_t n, size_t pixels, size_t lo, size_t m,
                             const float *w, double *out)
    ctypedef struct tdl_frame_sums:
        int pixel_bytes
        int acc_bytes
        void* acc
        double* totals
    void tdl_frame_sums_sink(void* context, const ptrdiff_t* rows, ptrdiff_t nrows, size_t first,
                             const void* pixels, size_t count)


ctypedef fused pixel_t:
    uint8_t
    uint16_t
    uint32_t

ctypedef fused counts_t:
    uint32_t
    uint64_t


def add_frames(const pixel_t[:, ::1] frames, counts_t[::1] acc) -> None:
    """``acc[p] += frames[0, p] + ... + frames[n-1, p]`` (``frames`` is (n, pixels)), exact while
    ``acc`` does not overflow: a uint32 ``acc`` suits a partition of at most 65,537 frames of
    uint16 pixels, and moves half the bytes of a uint64 one. 32-bit pixels need a uint64 ``acc``."""
    cdef size_t n = frames.shape[0], pixels = frames.shape[1]
    if <size_t>acc.shape[0] != pixels:
        raise ValueError(f"accumulator of {acc.shape[0]} pixels for frames of {pixels} pixels")
    if counts_t is uint32_t and pixel_t is uint32_t:
        raise TypeError("32-bit pixels need a uint64 accumulator")
    if n == 0 or pixels == 0:
        return
    with nogil:
        if counts_t is uint32_t:
            if pixel_t is uint8_t:
                tdl_add_u8_u32(&frames[0, 0], n, pixels, &acc[0])
            elif pixel_t is uint16_t:
                tdl_add_u16_u32(&frames[0, 0], n, pixels, &acc[0])
        else:
            if pixel_t is uint8_t:
                tdl_add_u8_u64(&frames[0, 0], n, pixels, &acc[0])
            elif pixel_t is uint16_t:
                tdl_add_u16_u64(&frames[0, 0], n, pixels, &acc[0])
            else:
                tdl_add_u32_u64(&frames[0, 0], n, pixels, &acc[0])


def add_frame_totals(const pixel_t[:, ::1] frames, double[::1] totals) -> None:
    """``totals[f] += frames[f, :].sum()``, the sum taken exactly in 64-bit integers (float64
    holds it exactly up to 2**53 counts)."""
    cdef size_t n = frames.shape[0], pixels = frames.shape[1]
    if <size_t>totals.shape[0] != n:
        raise ValueError(f"{totals.shape[0]} totals for {n} frames")
    if n == 0 or pixels == 0:
        return
    with nogil:
        if pixel_t is uint8_t:
            tdl_totals_u8(&frames[0, 0], n, pixels, &totals[0])
        elif pixel_t is uint16_t:
            tdl_totals_u16(&frames[0, 0], n, pixels, &totals[0])
        else:
            tdl_totals_u32(&frames[0, 0], n, pixels, &totals[0])


def add_weighted_sums(const pixel_t[:, ::1] frames, const float[:, ::1] weights, size_t lo,
                      double[:, ::1] out) -> None:
    """``out[f, k] += frames[f, lo:lo + m] @ weights[k]`` for the (K, m) ``weights`` of K masks
    that are zero outside the pixel range ``[lo, lo + m)``; 8/16-bit pixels are multiplied in
    float32 (exact conversion), 32-bit ones in float64, and each frame's sum is added in float64.
    K is 1 or 3 (one mask; CoM's three), other counts go one mask at a time."""
    cdef size_t n = frames.shape[0], pixels = frames.shape[1], masks = weights.shape[0]
    cdef size_t m = weights.shape[1], k, f
    if lo + m > pixels:
        raise ValueError(f"weights for pixels [{lo}, {lo + m}) of frames of {pixels} pixels")
    if <size_t>out.shape[0] != n or <size_t>out.shape[1] != masks:
        raise ValueError(f"out has shape ({out.shape[0]}, {out.shape[1]}), needs ({n}, {masks})")
    if n == 0 or m == 0 or masks == 0:
        return
    if masks == 3:
        with nogil:
            if pixel_t is uint8_t:
                tdl_weighted_u8_k3(&frames[0, 0], n, pixels, lo, m, &weights[0, 0], &out[0, 0])
            elif pixel_t is uint16_t:
                tdl_weighted_u16_k3(&frames[0, 0], n, pixels, lo, m, &weights[0, 0], &out[0, 0])
            else:
                tdl_weighted_u32_k3(&frames[0, 0], n, pixels, lo, m, &weights[0, 0], &out[0, 0])
        return
    cdef double[:, ::1] column = np.zeros((n, 1))
    for k in range(masks):
        column[:, :] = 0.0
        with nogil:
            if pixel_t is uint8_t:
                tdl_weighted_u8_k1(&frames[0, 0], n, pixels, lo, m, &weights[k, 0], &column[0, 0])
            elif pixel_t is uint16_t:
                tdl_weighted_u16_k1(&frames[0, 0], n, pixels, lo, m, &weights[k, 0], &column[0, 0])
            else:
                tdl_weighted_u32_k1(&frames[0, 0], n, pixels, lo, m, &weights[k, 0], &column[0, 0])
        for f in range(n):
            out[f, k] += column[f, 0]


cdef class FrameSums:
    """Where the fused decode-and-sum path adds frames: the consumer (``sink``, ``context``) that
    ``StackDecoder.decode_blocks`` hands each decoded piece of a frame to, while it is in the cache.

    ``counts`` (flat, ``pixels`` long, uint32 or uint64; None: no sum) gets every frame's pixels
    added, exact while it does not overflow (uint32: at most 65,537 frames of 8/16-bit pixels;
    32-bit pixels need uint64); ``totals`` (float64, one per frame handed to decode_blocks; None:
    none) gets each frame's exact pixel sum added at that frame's index. Keeps both arrays alive
    for as long as the consumer may be called."""
    cdef tdl_frame_sums sums
    cdef object counts_array
    cdef object totals_array

    def __init__(self, pixel_dtype, counts=None, totals=None):
        dtype = np.dtype(pixel_dtype)
        if dtype.kind != "u" or dtype.itemsize not in (1, 2, 4) or not dtype.isnative:
            raise TypeError(f"the fused sums take unsigned 8/16/32-bit native pixels, not {dtype}")
        if counts is None and totals is None:
            raise ValueError("the fused sums need counts, totals or both")
        self.sums.pixel_bytes = dtype.itemsize
        self.sums.acc = NULL
        self.sums.totals = NULL
        self.sums.acc_bytes = 8
        cdef uint32_t[::1] narrow
        cdef uint64_t[::1] wide
        cdef double[::1] frame_totals
        if counts is not None:
            if counts.dtype == np.uint32:
                if dtype.itemsize == 4:
                    raise TypeError("32-bit pixels need a uint64 accumulator")
                narrow = counts
                self.sums.acc_bytes = 4
                self.sums.acc = &narrow[0] if narrow.shape[0] else NULL
            elif counts.dtype == np.uint64:
                wide = counts
                self.sums.acc = &wide[0] if wide.shape[0] else NULL
            else:
                raise TypeError(f"counts must be uint32 or uint64, not {counts.dtype}")
            if self.sums.acc == NULL:
                raise ValueError("counts holds no pixels")
            self.counts_array = counts
        if totals is not None:
            frame_totals = totals
            if frame_totals.shape[0] == 0:
                raise ValueError("totals holds no frames")
            self.sums.totals = &frame_totals[0]
            self.totals_array = totals

    @property
    def pixels(self) -> int:
        """Pixels per frame ``counts`` holds (0: no counts)."""
        return 0 if self.counts_array is None else self.counts_array.shape[0]

    @property
    def frames(self) -> int:
        """Frames ``totals`` holds (0: no totals)."""
        return 0 if self.totals_array is None else self.totals_array.shape[0]

    @property
    def sink(self) -> int:
        """Address of the consumer function (a ``block_sink_fn``)."""
        cdef block_sink_fn sink = tdl_frame_sums_sink
        return <uintptr_t>sink

    @property
    def context(self) -> int:
        """Address of this object's sums, the consumer's ``context``."""
        return <uintptr_t>&self.sums
