"""The live data of one series as LiberTEM sees it.

* :class:`FrameSource`: where series events and frame stacks come from (the receiver through
  :class:`ReceiverFrameSource`, or an in-memory source in the tests); the events are the
  receiver's own :class:`SeriesStarted`, :class:`StackReady` and :class:`SeriesFinished`.
* :class:`LiveDataSet`: the LiberTEM DataSet describing one series (scan shape x frame shape);
  its result buffers are allocated from it in the main process.
* :class:`FrameRunPartition`: a LiberTEM Partition over a run of consecutive frames decoded from
  one stack in a worker process; LiberTEM's ``UDFPartRunner`` runs the UDFs over its tiles.
* :func:`resolve_scan_shape`: the scan shape of a series from its image count.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
import collections
from typing import Any, Callable, Iterator, Protocol, Union

import numpy as np
from libertem.common import Shape, Slice
from sparseconverter import NUMPY
from libertem.io.dataset.base import DataSet, DataSetMeta, DataTile, Partition, TilingScheme

from tango_dectris_live.receiver.decode import decode_frames_into
from tango_dectris_live.receiver.receiver import (ReceiverError, SeriesFinished, SeriesStarted, SeriesSummary,
                                                  StackReady)

from .stack_sums import StackSums


# ---------------------------------------------------------------------------------------------
# Frame sources


class FrameStack(Protocol):
    """What the processing needs of a frame-stack handle (it must be picklable)."""

    series: int
    frames: int
    shape: tuple[int, int]
    dtype: str

    def frame_numbers(self) -> np.ndarray:
        """The frame numbers of the stack's frames, in stack order (without decoding them)."""


# decode_frames_into(stack, start, stop, out) -> frame numbers of out[0..stop-start)
StackDecoder = Callable[[Any, int, int, np.ndarray], np.ndarray]


SourceEvent = Union[SeriesStarted, StackReady, SeriesFinished]


class FrameSource(Protocol):
    """Series events and frame stacks of one stream.

    ``decode_frames_into`` must be a module-level function: it is sent to the worker processes,
    which decode the stacks themselves. A source may also offer ``stack_sums`` (a class, sent to
    the workers too, with the static methods of :class:`~.stack_sums.StackSums`): then a series
    of the built-in exact sums alone is summed straight from its compressed stacks.
    """

    decode_frames_into: StackDecoder

    def next_event(self, timeout: float | None) -> SourceEvent | Any | None:
        """The next event (or one that was posted), or None when nothing happened within
        ``timeout`` seconds (None: wait until something happens)."""

    def post(self, event: Any) -> None:
        """Put the consumer's own event on the same queue (a run's Stop/Abort, the workers'
        outcomes), so that one thread waits on one queue for everything."""

    def put_back(self, events: list[Any]) -> None:
        """Events read but not the reader's (the next series' start and stacks, which came while
        a run waited for its last outcomes): the next :meth:`next_event` calls return them
        first, in their order."""

    def release(self, stack: FrameStack) -> None:
        """Give a stack back once every frame of it has been processed (or dropped)."""


class ReceiverFrameSource:
    """A :class:`FrameSource` over the compiled receiver's :class:`StreamReceiver`: its events as
    they come, less its :class:`ReceiverError` events, which are kept for the status instead."""

    decode_frames_into = staticmethod(decode_frames_into)
    stack_sums = StackSums

    def __init__(self, receiver: Any):
        self._receiver = receiver
        self.receiver_errors: list[tuple[str, str]] = []  # the latest 100 (kind, message)
        self.errors_seen = 0  # all of them, ever
        self.last_summary: SeriesSummary | None = None  # of the last series that ended
        self.on_error: Callable[[], None] = lambda: None  # told of each receiver error recorded
        self._unread: collections.deque[Any] = collections.deque()  # the consumer's thread only

    def next_event(self, timeout: float | None) -> SourceEvent | Any | None:
        if self._unread:
            return self._unread.popleft()
        event = self._receiver.next_event(timeout)
        if isinstance(event, ReceiverError):
            # the receiver counts these itself and keeps going; keep the latest for the status
            self.receiver_errors = [*self.receiver_errors[-99:], (event.kind, event.message)]
            self.errors_seen += 1
            self.on_error()
            return None
        if isinstance(event, SeriesFinished):
            self.last_summary = event.summary
        return event

    def post(self, event: Any) -> None:
        self._receiver.post(event)

    def put_back(self, events: list[Any]) -> None:
        self._unread.extendleft(reversed(events))

    def release(self, stack: FrameStack) -> None:
        self._receiver.release(stack)


# ---------------------------------------------------------------------------------------------
# Scan shape


class ScanShapeError(ValueError):
    """The scan shape of a series cannot be determined."""


@dataclass(frozen=True)
class ScanShape:
    """The scan shape used for a series, and why it was chosen."""

    shape: tuple[int, ...]
    note: str


def resolve_scan_shape(image_count: int | None, nav_shape: tuple[int, ...] | None) -> ScanShape:
    """``nav_shape`` if it holds exactly ``image_count`` frames, otherwise an inferred shape:
    square if ``image_count`` is a perfect square, else one line."""
    if nav_shape is not None:
        nav_shape = tuple(int(n) for n in nav_shape)
        if any(n < 1 for n in nav_shape) or not nav_shape:
            raise ScanShapeError(f"nav_shape {nav_shape} must be one or more positive sizes")
    if image_count is None:
        if nav_shape is None:
            raise ScanShapeError("the series header does not give the number of images; "
                                 "set the scan shape (nav_shape) explicitly")
        return ScanShape(nav_shape, f"scan shape {nav_shape} as configured (image count unknown)")
    if image_count < 1:
        raise ScanShapeError(f"the series announces {image_count} images; nothing to process")
    if nav_shape is not None and math.prod(nav_shape) == image_count:
        return ScanShape(nav_shape, f"scan shape {nav_shape} as configured")
    side = math.isqrt(image_count)
    inferred = (side, side) if side * side == image_count else (1, image_count)
    if nav_shape is None:
        note = f"scan shape {inferred} inferred from {image_count} images"
    else:
        note = (f"configured scan shape {nav_shape} does not hold the series' {image_count} images; "
                f"using {inferred}")
    return ScanShape(inferred, note)


# ---------------------------------------------------------------------------------------------
# LiberTEM DataSet / Partition


def dataset_shape(scan_shape: tuple[int, ...], frame_shape: tuple[int, int]) -> Shape:
    return Shape(tuple(scan_shape) + tuple(frame_shape), sig_dims=2)


class LiveDataSet(DataSet):
    """One live series: its shape and pixel type for LiberTEM.

    Partitions are not known in advance: they are the frame runs of the stacks as they arrive
    (see :class:`FrameRunPartition`), so :meth:`get_partitions` yields none.
    """

    def __init__(self, scan_shape: tuple[int, ...], frame_shape: tuple[int, int], dtype: np.dtype | str):
        super().__init__()
        self._shape = dataset_shape(scan_shape, frame_shape)
        self._dtype = np.dtype(dtype)
        self._meta = DataSetMeta(shape=self._shape, array_backends=(NUMPY,),
                                 image_count=math.prod(scan_shape), raw_dtype=self._dtype)

    def initialize(self, executor) -> LiveDataSet:
        return self

    @property
    def dtype(self) -> np.dtype:
        return self._dtype

    @property
    def shape(self) -> Shape:
        return self._shape

    @property
    def meta(self) -> DataSetMeta:
        return self._meta

    @property
    def array_backends(self):
        return (NUMPY,)

    def check_valid(self) -> bool:
        return True

    def get_partitions(self) -> Iterator[Partition]:
        return iter(())

    def partition_for_run(self, first_frame: int, frames: np.ndarray | StackTileSource | None,
                          count: int) -> FrameRunPartition:
        """The partition of ``count`` consecutive scan positions from ``first_frame``."""
        return FrameRunPartition(self._meta, first_frame, count, frames)


class StackTileSource:
    """The frames of a partition still compressed in a stack: stack positions ``first``,
    ``first + 1``, ... decoded a tile at a time into ``tile_buffer`` (reused for every tile,
    so a tile is still in the CPU cache when the UDFs read it)."""

    def __init__(self, decode_frames_into: StackDecoder, stack: Any, first: int, tile_buffer: np.ndarray,
                 check_numbers: bool = True):
        self._check_numbers = check_numbers  # False: frames numbered by stack position (compact)
        self._decode = decode_frames_into
        self._stack = stack
        self._first = first
        self._buffer = tile_buffer

    @property
    def dtype(self) -> np.dtype:
        return self._buffer.dtype

    def tiles(self, count: int, depth: int, expected_first: int) -> Iterator[tuple[int, np.ndarray]]:
        """(offset in the partition, decoded frames) for ``count`` frames, ``depth`` at a time."""
        depth = min(depth, self._buffer.shape[0])
        for start in range(0, count, depth):
            tile = self._buffer[:min(depth, count - start)]
            position = self._first + start
            numbers = self._decode(self._stack, position, position + tile.shape[0], tile)
            if self._check_numbers and numbers[0] != expected_first + start:
                raise RuntimeError(f"stack position {position} holds frame {numbers[0]}, "
                                   f"expected {expected_first + start}: the stack changed while decoding")
            yield start, tile


class FrameRunPartition(Partition):
    """Consecutive scan positions ``[first_frame, first_frame + count)`` with their frames:
    decoded already (an array), or decoded as the tiles are read (a :class:`StackTileSource`).

    In the main process it is created without frames, only to place partial results.
    """

    def __init__(self, meta: DataSetMeta, first_frame: int, count: int,
                 frames: np.ndarray | StackTileSource | None):
        sig = tuple(meta.shape.sig)
        partition_slice = Slice(origin=(first_frame, 0, 0), shape=Shape((count, *sig), sig_dims=2))
        super().__init__(meta=meta, partition_slice=partition_slice, io_backend=None, decoder=None)
        self._frames = frames

    def set_corrections(self, corrections) -> None:
        if corrections is not None and corrections.have_corrections():
            raise ValueError("live frames are processed as received: detector corrections are "
                             "applied by the DCU, not here")

    def set_io_backend(self, backend) -> None:
        pass

    def get_locations(self):
        return None

    def get_tiles(self, tiling_scheme: TilingScheme, dest_dtype="float32", roi=None, array_backend=None):
        if roi is not None:
            raise ValueError("live processing does not support a region of interest")
        if self._frames is None:
            raise RuntimeError("this partition only places results; it holds no frames")
        depth = tiling_scheme.depth
        origin = self.slice.origin[0]
        sig = tuple(self.meta.shape.sig)
        if isinstance(self._frames, StackTileSource):
            if self._frames.dtype != np.dtype(dest_dtype):
                raise ValueError(f"frames are decoded as {self._frames.dtype}, the UDFs want {np.dtype(dest_dtype)}")
            tiles = self._frames.tiles(self.shape[0], depth, origin)
        else:
            frames = self._frames.astype(dest_dtype, copy=False)
            tiles = ((start, frames[start:start + depth]) for start in range(0, frames.shape[0], depth))
        for start, tile in tiles:
            tile_slice = Slice(origin=(origin + start, 0, 0), shape=Shape((tile.shape[0], *sig), sig_dims=2))
            yield DataTile(tile, tile_slice=tile_slice, scheme_idx=0)
