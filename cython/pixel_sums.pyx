# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False, cdivision=True
"""Exact integer sums over tiles of frames, for the built-in ``sum`` and ``sumsig`` analyses.

NumPy's mixed-type reductions (uint16 pixels into a uint64 sum) convert through small buffers and
take 50-125 us per 512x512 frame; these loops add the pixels straight into wider integers, a block
of pixels at a time so that the accumulators stay in the L1 cache while the frames stream past.
Both run without the GIL. Signed and float pixels are left to NumPy by the callers.
"""
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t

ctypedef fused pixel_t:
    uint8_t
    uint16_t
    uint32_t

cdef enum:
    BLOCK = 4096            # pixels per block: a 16 KiB uint32 block of partial sums stays in L1
    NARROW_TERMS = 65537    # uint16 (or uint8) values that always fit a uint32 partial sum


ctypedef fused counts_t:
    uint32_t
    uint64_t


def add_frames(const pixel_t[:, ::1] frames, counts_t[::1] acc) -> None:
    """``acc[p] += frames[0, p] + ... + frames[n-1, p]`` (``frames`` is (n, pixels)), exact while
    ``acc`` does not overflow: a uint32 ``acc`` suits a partition of at most 65,537 frames of
    uint16 pixels, and moves half the bytes of a uint64 one."""
    cdef Py_ssize_t n = frames.shape[0], pixels = frames.shape[1]
    cdef Py_ssize_t block, end, f, p, first, last
    cdef Py_ssize_t block_pixels = BLOCK, narrow_terms = NARROW_TERMS
    cdef uint32_t partial[BLOCK]
    if acc.shape[0] != pixels:
        raise ValueError(f"accumulator of {acc.shape[0]} pixels for frames of {pixels} pixels")
    with nogil:
        block = 0
        while block < pixels:
            end = min(block + block_pixels, pixels)
            if pixel_t is uint32_t:
                for f in range(n):
                    for p in range(block, end):
                        acc[p] += frames[f, p]
            else:
                # narrow partial sums vectorise twice as wide; flushed before they could overflow
                first = 0
                while first < n:
                    last = min(first + narrow_terms, n)
                    for p in range(end - block):
                        partial[p] = 0
                    for f in range(first, last):
                        for p in range(block, end):
                            partial[p - block] += frames[f, p]
                    for p in range(block, end):
                        acc[p] += partial[p - block]
                    first = last
            block = end


def add_frame_totals(const pixel_t[:, ::1] frames, double[::1] totals) -> None:
    """``totals[f] += frames[f, :].sum()``, the sum taken exactly in 64-bit integers (float64
    holds it exactly up to 2**53 counts)."""
    cdef Py_ssize_t n = frames.shape[0], pixels = frames.shape[1]
    cdef Py_ssize_t f, p, block, end
    cdef Py_ssize_t chunk = NARROW_TERMS - 1
    cdef uint64_t total
    cdef uint32_t partial
    if totals.shape[0] != n:
        raise ValueError(f"{totals.shape[0]} totals for {n} frames")
    with nogil:
        for f in range(n):
            total = 0
            if pixel_t is uint32_t:
                for p in range(pixels):
                    total += frames[f, p]
            else:
                block = 0
                while block < pixels:
                    end = min(block + chunk, pixels)
                    partial = 0
                    for p in range(block, end):
                        partial += frames[f, p]
                    total += partial
                    block = end
            totals[f] += <double>total
