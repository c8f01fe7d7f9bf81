# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False, cdivision=True
"""Exact integer sums over tiles of frames, for the built-in ``sum`` and ``sumsig`` analyses.

NumPy's mixed-type reductions (uint16 pixels into a uint64 sum) convert through small buffers and
take 50-125 us per 512x512 frame; these loops add the pixels straight into wider integers, a block
of pixels at a time so that the accumulators stay in the L1 cache while the frames stream past.
The loops are C (``pixel_kernels.h``), built for x86-64-v4 (AVX-512), v3 (AVX2) and the baseline
on x86-64 Linux, the CPU's best chosen when the module loads. Both run without the GIL. Signed and
float pixels are left to NumPy by the callers.
"""
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t

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
