"""Keep glibc's allocator from handing memory back to the kernel between frames.

A live stream allocates and frees the same sizes over and over: libzmq's I/O thread allocates one
buffer per message part (18 KB per frame at 96x96, 130 KB at 512x512), the receiver thread frees
it a moment later; LiberTEM allocates each partition's result buffers (2 MiB for a 512x512 sum)
in the workers and drops them after the merge. With glibc's defaults, buffers of 128 KiB and up
are mmap'd and unmapped one by one, and a free that leaves more than 128 KiB on top of a heap
trims it (``madvise``): the next allocation page-faults every page again and the kernel zeroes it.
Measured per 96x96 series of 65,536 frames, the receiving process took 5 to 17,363 page faults
(it depends on the heap's state), costing up to 0.04 CPU seconds -- 0.6 us per frame; the
workers took 11,152-12,631 each per 512x512 series of 4,096 frames (docs/performance.md).

:func:`tune_allocator` raises both thresholds once per process (``mallopt``), so freed memory is
reused instead of being returned: the heap stays at its high-water mark, which the frame stack
slots and the stack size bound. Called by the receiver (so in the device server) and the worker
processes. ``TANGO_DECTRIS_LIVE_MALLOC=default`` in the environment leaves glibc's defaults alone;
on other C libraries it does nothing.
"""
from __future__ import annotations

import ctypes
import logging
import os
import platform
import threading

log = logging.getLogger(__name__)

ENV_VARIABLE = "TANGO_DECTRIS_LIVE_MALLOC"
# mallopt parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# glibc's largest mmap threshold on 64-bit (HEAP_MAX_SIZE / 2); blocks above it are mmap'd still
MMAP_THRESHOLD = 32 * 1024 * 1024
TRIM_THRESHOLD = 256 * 1024 * 1024

_lock = threading.Lock()
_outcome: str | None = None


def tune_allocator() -> str:
    """Set the thresholds once per process; returns what was done (also logged):
    ``"tuned"``, ``"disabled"`` (by the environment variable), ``"not glibc"`` or ``"failed"``."""
    global _outcome
    with _lock:
        if _outcome is None:
            _outcome = _tune()
        return _outcome


def _tune() -> str:
    setting = os.environ.get(ENV_VARIABLE, "tuned").strip().lower()
    if setting not in ("tuned", "default"):
        log.warning("%s=%r is neither 'tuned' nor 'default'; using 'tuned'", ENV_VARIABLE, setting)
    if setting == "default":
        return "disabled"
    if platform.libc_ver()[0] != "glibc":
        return "not glibc"
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success, 0 on error; the mmap threshold first (it fixes the trim one
    # too, glibc sets both dynamic thresholds aside once either is set)
    if mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) != 1 or mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) != 1:
        log.warning("mallopt refused the allocator thresholds; glibc's defaults stay")
        return "failed"
    log.debug("allocator thresholds: mmap %d, trim %d bytes", MMAP_THRESHOLD, TRIM_THRESHOLD)
    return "tuned"
