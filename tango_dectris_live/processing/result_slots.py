"""Shared memory the main process lends to the workers for the fused sums' counts.

A stack's partial ``sum`` is a frame-sized array (1 MiB of uint32 at 512x512). Sent back through the
pool's result queue it is pickled, written through a 64 KiB pipe and unpickled again: about 1 ms of
CPU in the worker and 0.5-0.8 ms in the main process per stack (benchmarks: 8 and 6 us per 512x512
frame of 128-frame stacks). Instead the main process lends the worker a slot of this segment with the
stack, the worker sums into it, and the main process merges straight from it; only a
:class:`SlotCounts` reference travels. Which slots are lent is the main process' own bookkeeping
(``runner.SeriesRun``): a slot is lent with one stack and taken back once that stack's outcome is
merged or dropped, so a worker never writes a slot the main process reads.
"""
from __future__ import annotations

import mmap
import os
import secrets
import sys
import threading
from dataclasses import dataclass
from multiprocessing import shared_memory

import numpy as np

_ARENA_BYTES = 64 << 20  # all slots together at most (EIGER2 1M: 7 slots of uint64 counts)


@dataclass(frozen=True)
class SlotCounts:
    """In a worker's partial results instead of the ``counts`` array: it is in slot ``slot`` of
    the segment the series was given, ``dtype`` and ``shape`` from the slot's start."""

    slot: int
    dtype: str
    shape: tuple[int, ...]


class ResultSlots:
    """The main process' side: ``count`` slots of ``slot_bytes`` in one shared-memory segment,
    unlinked at :meth:`close`."""

    def __init__(self, slot_bytes: int, count: int):
        if slot_bytes < 1 or count < 1:
            raise ValueError(f"result slots need a size and a count, got {count} x {slot_bytes} bytes")
        self.slot_bytes = -(-int(slot_bytes) // 64) * 64  # each slot starts on a cache line
        self.count = int(count)
        name = f"tdl_results_{os.getpid()}_{secrets.token_hex(4)}"
        self._memory = shared_memory.SharedMemory(name=name, create=True, size=self.slot_bytes * self.count)
        self._closed = False

    @classmethod
    def for_counts(cls, counts_bytes: int, wanted: int) -> ResultSlots | None:
        """Slots for counts of ``counts_bytes``: ``wanted``, fewer where they would exceed
        64 MiB together, None where not even two fit (the counts then travel as arrays)."""
        count = min(int(wanted), _ARENA_BYTES // max(1, int(counts_bytes)))
        return cls(counts_bytes, count) if count >= 2 else None

    @property
    def name(self) -> str:
        return self._memory.name

    def array(self, counts: SlotCounts) -> np.ndarray:
        """The counts a worker left in a slot (a view into the segment)."""
        return _view(self._memory.buf, self.slot_bytes, counts.slot, counts.dtype, counts.shape)

    def close(self) -> None:
        """Unlink the segment (idempotent); views still held keep their mapping until dropped."""
        if self._closed:
            return
        self._closed = True
        self._memory.unlink()
        try:
            self._memory.close()
        except BufferError:
            pass  # an array into a slot is still referenced; the mapping goes with it


def _view(buffer: memoryview | mmap.mmap, slot_bytes: int, slot: int, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    dtype = np.dtype(dtype)
    size = int(np.prod(shape)) * dtype.itemsize
    if not 0 <= slot or size > slot_bytes or (slot + 1) * slot_bytes > len(buffer):
        raise ValueError(f"{size} bytes of counts do not fit slot {slot} of {slot_bytes} bytes")
    return np.frombuffer(buffer, dtype, count=int(np.prod(shape)), offset=slot * slot_bytes).reshape(shape)


_attached: dict[str, mmap.mmap] = {}  # per worker process: segment name -> writable mapping
_attach_lock = threading.Lock()


def slot_array(name: str, slot_bytes: int, slot: int, dtype: np.dtype | str,
               shape: tuple[int, ...]) -> np.ndarray | None:
    """The worker's side: slot ``slot`` of the segment ``name`` as a writable array, the segment
    mapped once per process; None where shared memory cannot be mapped this way (not Linux), or
    the segment is gone: then the counts travel as an array."""
    if not sys.platform.startswith("linux"):
        return None  # pragma: no cover - elsewhere the stdlib's tracker would unlink it on exit
    with _attach_lock:
        mapping = _attached.get(name)
        if mapping is None:
            # mapped from /dev/shm directly: SharedMemory(name) would register the segment with this
            # process's resource tracker, which unlinks it when the worker exits (Python < 3.13)
            try:
                fd = os.open(f"/dev/shm/{name}", os.O_RDWR)
            except FileNotFoundError:
                return None
            try:
                mapping = mmap.mmap(fd, 0)
            finally:
                os.close(fd)
            for old in list(_attached):  # the pool replaced its segment: the old one is not lent any more
                try:
                    _attached.pop(old).close()
                except BufferError:
                    pass  # an array into it is still referenced; the mapping goes with it
            _attached[name] = mapping
    return _view(mapping, slot_bytes, slot, str(np.dtype(dtype)), shape)
