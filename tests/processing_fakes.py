"""An in-memory FrameSource for the processing tests: frame stacks cut from NumPy arrays.

The events are the receiver's own (SeriesStarted, StackReady, SeriesFinished). The frames of a
series are written to a .npy file; a stack handle names the file and the frame numbers it holds,
and :func:`decode_array_stack_into` (module level, so worker processes can import it) reads them
back by memory map -- the role the receiver's shared memory plays live.
"""
from __future__ import annotations

import collections
import queue
import threading
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from libertem.udf.base import UDF

from tango_dectris_live.processing.live_dataset import SourceEvent
from tango_dectris_live.receiver import SeriesFinished, SeriesStarted, SeriesSummary, StackReady
from tango_dectris_live.stream import SeriesHeader


@dataclass(frozen=True)
class ArrayStack:
    """A picklable stack handle: which frames of which series file it holds."""

    path: str
    series: int
    numbers: tuple[int, ...]
    shape: tuple[int, int]
    dtype: str

    @property
    def frames(self) -> int:
        return len(self.numbers)

    def frame_numbers(self) -> np.ndarray:
        return np.asarray(self.numbers, np.int64)


@lru_cache(maxsize=8)
def _series_frames(path: str) -> np.ndarray:
    return np.load(path, mmap_mode="r")


def decode_array_stack_into(stack: ArrayStack, start: int, stop: int, out: np.ndarray) -> np.ndarray:
    """Copy frames [start, stop) of ``stack`` into ``out``; return their frame numbers."""
    numbers = np.asarray(stack.numbers[start:stop], np.int64)
    frames = _series_frames(stack.path)
    # a frame number beyond the file (a corrupt header, in the tests) still gets pixels
    out[...] = frames[numbers % frames.shape[0]]
    return numbers


class ArrayFrameSource:
    """Series as events in a queue; the test decides when each stack arrives."""

    decode_frames_into = staticmethod(decode_array_stack_into)

    def __init__(self, folder: Path):
        self._folder = Path(folder)
        self._events: queue.Queue[SourceEvent] = queue.Queue()
        self._unread: collections.deque[object] = collections.deque()
        self._lock = threading.Lock()
        self.outstanding: set[ArrayStack] = set()
        self.released: list[ArrayStack] = []

    def next_event(self, timeout: float | None) -> SourceEvent | None:
        if self._unread:
            return self._unread.popleft()
        try:
            return self._events.get(timeout=timeout)
        except queue.Empty:
            return None

    def post(self, event: object) -> None:
        self._events.put(event)

    def put_back(self, events: list[object]) -> None:
        self._unread.extendleft(reversed(events))

    def release(self, stack: ArrayStack) -> None:
        with self._lock:
            self.outstanding.remove(stack)  # KeyError: released twice or never handed out
            self.released.append(stack)

    # -- the test's side -----------------------------------------------------------------------

    def begin_series(self, series: int, frames: np.ndarray, image_count: int | None = None,
                     announce_shape: bool = True) -> None:
        """Announce a series whose frames (scan order) are ``frames``."""
        path = self._folder / f"series_{series}.npy"
        np.save(path, frames)
        self._path = str(path)
        self._shape = tuple(frames.shape[1:])
        self._dtype = frames.dtype.str
        self._series = series
        self._image_count = frames.shape[0] if image_count is None else image_count
        self._frames_sent = 0
        self._events.put(SeriesStarted(SeriesHeader(
            series_id=series, number_of_images=self._image_count,
            shape=self._shape if announce_shape else None, dtype=frames.dtype if announce_shape else None)))

    def send_stack(self, frame_numbers: Iterable[int], series: int | None = None) -> ArrayStack:
        stack = ArrayStack(self._path, self._series if series is None else series,
                           tuple(int(n) for n in frame_numbers), self._shape, self._dtype)
        with self._lock:
            self.outstanding.add(stack)
        self._frames_sent += stack.frames
        self._events.put(StackReady(stack))
        return stack

    def send_frames(self, frame_numbers: Sequence[int], stack_size: int) -> None:
        for start in range(0, len(frame_numbers), stack_size):
            self.send_stack(frame_numbers[start:start + stack_size])

    def finish_series(self, missing: Iterable[int] = ()) -> None:
        """End the series as the receiver does once its last frame came; ``missing`` never came."""
        missing_frames = np.asarray(list(missing), np.int64)
        self._events.put(SeriesFinished(SeriesSummary(
            series=self._series, expected_frames=self._image_count,
            frames_received=self._frames_sent, missing_frames=missing_frames,
            end_reason="complete", ended_at=time.monotonic())))


class FrameMaxUDF(UDF):
    """A facility-style custom analysis for the tests: the brightest pixel of each frame."""

    def get_result_buffers(self):
        return {"maximum": self.buffer(kind="nav", dtype=np.float32)}

    def process_frame(self, frame):
        self.results.maximum[:] = np.max(frame)


def make_frame_max_udf(parameters) -> UDF:
    """The entry-point factory of :class:`FrameMaxUDF`."""
    return FrameMaxUDF()


class BrokenUDF(UDF):
    """An analysis that raises in the worker, as a buggy facility UDF would."""

    def get_result_buffers(self):
        return {"value": self.buffer(kind="nav", dtype=np.float32)}

    def process_frame(self, frame):
        raise ZeroDivisionError("broken analysis")
