"""Frame stacks in shared memory: the slots the receiver fills and the workers read.

One ``multiprocessing.shared_memory`` segment holds ``num_slots`` slots. A slot starts with an
index of ``frame_stack_size`` records (:data:`FRAME_RECORD_DTYPE`: frame number, offset, size,
encoding, element size, channels, pixel type), followed by the frames' compressed bytes, about
``bytes_per_frame`` per frame. A :class:`FrameStackHandle` names one filled slot; it is small and
picklable, and worker processes attach to the segment by its name.

Slot lifecycle: free -> filling (receiver) -> ready (queued) -> in use (a consumer) -> free again
when the consumer calls ``release(handle)``.
"""
from __future__ import annotations

import enum
import math
import mmap
import os
import secrets
import sys
import threading
import time
from dataclasses import dataclass
from multiprocessing import shared_memory

import numpy as np

FRAME_RECORD_DTYPE = np.dtype([
    ("frame", "<i8"),
    ("offset", "<i8"),  # from the start of the slot's data area
    ("size", "<i8"),
    ("encoding", "<i4"),  # tango_dectris_live.stream.Algorithm.code
    ("elem_size", "<i4"),
    ("channels", "<i4"),  # >1: a table of uint64 channel sizes precedes the channels' bytes
    ("dtype_tag", "<i4"),  # RFC 8746 typed-array tag of the decompressed pixels
])

# RFC 8746 typed-array tags (the ones stream v2 uses, and their signed/float relatives).
_DTYPE_TAGS = {
    np.dtype("u1"): 64, np.dtype("<u2"): 69, np.dtype("<u4"): 70, np.dtype("<u8"): 71,
    np.dtype("i1"): 72, np.dtype("<i2"): 77, np.dtype("<i4"): 78, np.dtype("<i8"): 79,
    np.dtype("<f2"): 84, np.dtype("<f4"): 85, np.dtype("<f8"): 86,
    np.dtype(">u2"): 65, np.dtype(">u4"): 66, np.dtype(">i2"): 73, np.dtype(">i4"): 74,
}
_TAG_DTYPES = {tag: dtype for dtype, tag in _DTYPE_TAGS.items()}

_PAGE = 4096
_MAX_STACK_BYTES = 16 << 20  # default stack: about 16 MiB of compressed frames
_MAX_STACK_FRAMES = 4096
_SLOTS_BYTES = 64 << 20  # default number of slots: as many as fit about 64 MiB (4 to 16)


def dtype_tag(dtype: np.dtype | str) -> int:
    """The RFC 8746 tag that names ``dtype`` in the frame index."""
    try:
        return _DTYPE_TAGS[np.dtype(dtype).newbyteorder("<") if np.dtype(dtype).byteorder == "=" else np.dtype(dtype)]
    except KeyError:
        raise ValueError(f"pixel type {np.dtype(dtype)} cannot be stored in a frame stack") from None


def dtype_of_tag(tag: int) -> np.dtype:
    """The numpy dtype of an RFC 8746 typed-array tag."""
    try:
        return _TAG_DTYPES[tag]
    except KeyError:
        raise ValueError(f"frame index names an unknown pixel type (typed-array tag {tag})") from None


@dataclass(frozen=True)
class FrameStackLayout:
    """Sizes of the shared-memory slots (the tuning parameters LiberTEM-live also has)."""

    num_slots: int
    frame_stack_size: int
    bytes_per_frame: int

    def __post_init__(self) -> None:
        for name in ("num_slots", "frame_stack_size", "bytes_per_frame"):
            if getattr(self, name) < 1:
                raise ValueError(f"frame stack layout: {name} must be at least 1, got {getattr(self, name)}")

    @classmethod
    def for_frames(cls, shape: tuple[int, int], dtype: np.dtype | str = "uint16", *,
                   num_slots: int | None = None, frame_stack_size: int | None = None,
                   bytes_per_frame: int | None = None) -> FrameStackLayout:
        """Defaults from the detector geometry: a quarter of the uncompressed frame per frame
        (bslz4 typically compresses 4-10x), as many frames per stack as fit in ~16 MiB (at most
        4096: 3640 at 96x96), and as many slots (4 to 16) as fit in ~64 MiB.

        Why stacks this big: a worker pays a fixed cost per stack (LiberTEM allocates each
        partition's result buffers from fresh pages, the partial results travel to the main
        process); at 512x512, 128-frame stacks took 30 % less worker CPU than 64-frame ones
        (benchmarks/bench_pipeline.py --scenario quadro512 --frame-stack-size 64/128), and at
        96x96 2048-frame stacks ran 1.38x faster than 512-frame ones (benchmarks/sweep.py); 3640-frame
        ones took 3-10 % less worker CPU than 2048 in four interleaved rounds of 8 series.

        Why 4 slots (not 8, as up to session 6) for these stacks: with two workers, a slot being
        filled and one ready to hand over keep the pipeline full; more slots only hold a longer
        backlog when the sender outruns processing. Three interleaved rounds of
        ``benchmarks/bench_pipeline.py --analyses sum+sumsig --runs 3 --num-slots 4/8``: QUADRO
        512x512 median latency 82-124 ms vs 116-192 ms at the same frames/s (10,243-11,079 vs
        8,233-11,662); ARINA 96x96 208k vs 205k frames/s (medians of 9), latency ~35 vs ~62 ms."""
        uncompressed = int(shape[0]) * int(shape[1]) * np.dtype(dtype).itemsize
        if bytes_per_frame is None:
            bytes_per_frame = max(64, math.ceil(uncompressed / 4))
            if frame_stack_size is not None:
                # a slot of few frames must still hold one frame that does not compress
                bytes_per_frame = max(bytes_per_frame, math.ceil(uncompressed / frame_stack_size))
        if frame_stack_size is None:
            frame_stack_size = max(1, min(_MAX_STACK_FRAMES, _MAX_STACK_BYTES // bytes_per_frame))
        if num_slots is None:
            num_slots = max(4, min(16, _SLOTS_BYTES // (frame_stack_size * bytes_per_frame)))
        return cls(num_slots=num_slots, frame_stack_size=frame_stack_size, bytes_per_frame=bytes_per_frame)

    @property
    def index_bytes(self) -> int:
        return self.frame_stack_size * FRAME_RECORD_DTYPE.itemsize

    @property
    def slot_bytes(self) -> int:
        """Stride of one slot: index + data, rounded up to whole pages."""
        raw = self.index_bytes + self.frame_stack_size * self.bytes_per_frame
        return -(-raw // _PAGE) * _PAGE

    @property
    def data_bytes(self) -> int:
        """Room for compressed frames in one slot (a frame may use more than bytes_per_frame)."""
        return self.slot_bytes - self.index_bytes

    @property
    def total_bytes(self) -> int:
        return self.num_slots * self.slot_bytes


@dataclass(frozen=True)
class FrameStackHandle:
    """One filled slot, as handed to a consumer (picklable: send it to a worker process)."""

    segment: str
    slot: int
    layout: FrameStackLayout
    frames: int
    first_frame: int  # smallest frame number in the stack
    last_frame: int  # largest frame number in the stack
    series: int
    shape: tuple[int, int]  # (height, width)
    dtype: str  # pixel type of the decompressed frames
    encoding: str  # stream Algorithm value of the stack's first frame

    def index(self) -> np.ndarray:
        """The stack's frame records (a read-only view into the shared memory)."""
        buf = attach_segment(self.segment)
        start = self.slot * self.layout.slot_bytes
        records = np.frombuffer(buf, dtype=FRAME_RECORD_DTYPE, count=self.frames, offset=start)
        return records

    def frame_numbers(self) -> np.ndarray:
        """Frame numbers in stack order (the order of arrival, not necessarily sorted)."""
        return self.index()["frame"].copy()

    def frame_bytes(self, position: int, channel: int = 0) -> memoryview:
        """The compressed bytes of the frame at ``position`` in the stack (no copy)."""
        if not 0 <= position < self.frames:
            raise IndexError(f"stack of {self.frames} frames has no position {position}")
        return record_bytes(self, self.index()[position], channel)


def record_bytes(handle: FrameStackHandle, record: np.void, channel: int = 0) -> memoryview:
    """The compressed bytes of one channel of the frame described by ``record`` (no copy)."""
    buf = attach_segment(handle.segment)
    begin = handle.slot * handle.layout.slot_bytes + handle.layout.index_bytes + int(record["offset"])
    size = int(record["size"])
    channels = int(record["channels"])
    if channels <= 1:
        if channel != 0:
            raise IndexError(f"frame {int(record['frame'])} has one channel, no channel {channel}")
        return buf[begin:begin + size]
    if not 0 <= channel < channels:
        raise IndexError(f"frame {int(record['frame'])} has {channels} channels, no channel {channel}")
    sizes = np.frombuffer(buf, dtype="<u8", count=channels, offset=begin)
    start = begin + 8 * channels + int(sizes[:channel].sum())
    return buf[start:start + int(sizes[channel])]


class SlotState(enum.IntEnum):
    FREE = 0
    FILLING = 1
    READY = 2
    IN_USE = 3


_SEGMENTS_CREATED_HERE: dict[str, shared_memory.SharedMemory] = {}
_ATTACHED: dict[str, memoryview] = {}
_ATTACH_LOCK = threading.Lock()


class SharedFrameStacks:
    """The receiver's side: creates the segment, keeps each slot's state, unlinks at close()."""

    def __init__(self, layout: FrameStackLayout) -> None:
        self.layout = layout
        name = f"tdl_{os.getpid()}_{secrets.token_hex(4)}"
        self._memory = shared_memory.SharedMemory(name=name, create=True, size=layout.total_bytes)
        _SEGMENTS_CREATED_HERE[self._memory.name] = self._memory
        self._states = [SlotState.FREE] * layout.num_slots
        self._changed = threading.Condition()
        self._closed = False
        self.backpressure_seconds = 0.0

    @property
    def name(self) -> str:
        return self._memory.name

    @property
    def buffer(self) -> memoryview:
        return self._memory.buf

    def take_free_slot(self, wait: float) -> int | None:
        """A free slot (now FILLING), waiting at most ``wait`` seconds; the time spent waiting
        is counted as back-pressure."""
        with self._changed:
            for slot, state in enumerate(self._states):
                if state is SlotState.FREE:
                    self._states[slot] = SlotState.FILLING
                    return slot
            started = time.monotonic()
            self._changed.wait(wait)
            self.backpressure_seconds += time.monotonic() - started
            for slot, state in enumerate(self._states):
                if state is SlotState.FREE:
                    self._states[slot] = SlotState.FILLING
                    return slot
        return None

    def mark(self, slot: int, state: SlotState, *, expected: tuple[SlotState, ...]) -> None:
        with self._changed:
            if self._closed:
                return
            if self._states[slot] not in expected:
                raise ValueError(f"frame stack slot {slot} is {self._states[slot].name.lower()}, "
                                 f"cannot become {state.name.lower()} (released twice?)")
            self._states[slot] = state
            self._changed.notify_all()

    def count(self, state: SlotState) -> int:
        with self._changed:
            return sum(1 for s in self._states if s is state)

    def close(self) -> None:
        """Unlink the segment; handles still held by consumers become unusable."""
        with self._changed:
            if self._closed:
                return
            self._closed = True
            self._changed.notify_all()
        _SEGMENTS_CREATED_HERE.pop(self._memory.name, None)
        with _ATTACH_LOCK:
            view = _ATTACHED.pop(self._memory.name, None)
        # Unlink first: it frees the name in /dev/shm whatever happens to the mapping.
        self._memory.unlink()
        try:
            if view is not None:
                view.release()
            self._memory.close()
        except BufferError:
            # A consumer still holds arrays into a stack; the mapping goes away with them.
            pass


def attach_segment(name: str) -> memoryview:
    """The whole segment ``name`` as a memoryview, attached once per process and cached.

    In the creating process this is the creator's own mapping. Elsewhere the segment is mapped
    from /dev/shm directly rather than through ``SharedMemory(name)``: on Python < 3.13 that
    registers the segment with this process's resource tracker, which would unlink it under the
    receiver's feet when the worker exits.
    """
    with _ATTACH_LOCK:
        view = _ATTACHED.get(name)
        if view is not None:
            return view
        created = _SEGMENTS_CREATED_HERE.get(name)
        if created is not None:
            view = created.buf.toreadonly()
        elif sys.platform.startswith("linux"):
            try:
                fd = os.open(f"/dev/shm/{name}", os.O_RDONLY)
            except FileNotFoundError:
                raise FileNotFoundError(f"frame stack segment {name!r} does not exist any more "
                                        "(was the receiver stopped?)") from None
            try:
                mapping = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
            finally:
                os.close(fd)
            view = memoryview(mapping)
        else:  # pragma: no cover - other platforms use the stdlib's tracking behaviour
            view = shared_memory.SharedMemory(name=name).buf.toreadonly()
        _ATTACHED[name] = view
        return view


def detach_all() -> None:
    """Drop this process's cached attachments (workers call it before they exit)."""
    with _ATTACH_LOCK:
        names = list(_ATTACHED)
        for name in names:
            view = _ATTACHED.pop(name)
            try:
                view.release()
            except BufferError:
                pass  # arrays into the segment still exist; the mapping goes away with them
