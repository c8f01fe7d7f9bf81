"""Run the selected analyses on a live series in worker processes, merging results in order.

Design (and why it is not LiberTEM's PipelinedExecutor): a LiberTEM DataSet fixes its partitions
when a run starts, but the frame stacks of a live series have frame ranges known only when they
arrive, and stop/abort must act on pending work at any moment. So this module keeps its own pool
of worker processes (started once, reused for every series) and lets LiberTEM do the UDF work:
each worker cuts a stack into runs of consecutive frame numbers and runs LiberTEM's
``UDFPartRunner`` on a :class:`~.live_dataset.FrameRunPartition` per run, whose tiles are decoded
(the source's ``decode_frames_into``) one at a time as the UDFs ask for them. The main process merges the partial results
with each UDF's own ``merge``, in dispatch order, into buffers allocated from a
:class:`~.live_dataset.LiveDataSet` -- the same steps LiberTEM's ``UDFRunner`` takes (through
``libertem_internals``, the one module that uses LiberTEM's private API).

One exception, for speed: when a series runs the built-in exact ``sum`` / ``sumsig`` and nothing
else (:class:`FusedSums`), a worker makes their partition buffers itself, decoding and summing each
frame a bitshuffle block at a time while it is in the CPU cache (``stack_sums.py``), and the main
process lends it a shared-memory slot for the sum's counts with each stack (``result_slots.py``);
the buffers and the merge are the ones LiberTEM's run of the two UDFs gives.

Main process and workers talk in the messages below (frozen dataclasses, pickled through the
queues): :class:`BeginSeries` and :class:`ProcessStack` to a worker, ``None`` to stop it;
:class:`StackDone`, :class:`StackFailed` or :class:`StackSkipped` back for every
:class:`ProcessStack`. On the run's own queue (the frame source's), besides the receiver's events:
:class:`RunControl`, :class:`WorkersLost`, and the outcomes; :class:`Wake` ends a run's bridge.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import multiprocessing
import multiprocessing.connection
import os
import queue
import threading
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Iterable, NamedTuple, Union

import cloudpickle
import numpy as np
from libertem.udf.base import UDF

from tango_dectris_live.allocator import tune_allocator
from tango_dectris_live.receiver.decode import decode_frames_into as receiver_decode_frames_into
from tango_dectris_live.saving import SeriesFileSpec

from .analyses import AnalysisParameters, AnalysisRegistry, SelectedAnalysis
from .libertem_internals import (Environment, TilingScheme, allocate_full_results, merge_partial, results_of,
                                 run_udfs_on_partition, single_thread_environment, udf_constructor_kwargs,
                                 udf_input_dtype, whole_frame_tiling)
from .live_dataset import (FrameRunPartition, FrameSource, LiveDataSet, ScanShape, SeriesFinished,
                           SeriesStarted, StackDecoder, StackReady, StackTileSource, resolve_scan_shape)
from .partials import PartialResults, partial_of
from .result_slots import ResultSlots, SlotCounts, slot_array
from .series_saving import SeriesSaving
from .stack_sums import StackSums
from .udfs import fused_sum_roles, partition_counts_dtype
from .snapshot import ResultSnapshot, RunState, blank_unprocessed, empty_snapshot

log = logging.getLogger(__name__)

_TILE_BYTES = 1 << 20  # tiles of whole frames, about 1 MiB each, unless the UDFs prefer other sizes
_MAX_TILE_BYTES = 64 << 20
_NO_RUN = -1
_MIN_PART_FRAMES = 16  # a stack is split for idle workers into parts of at least this many frames
_SLOT_FRAMES = 65537  # frames whose 8/16-bit counts a result slot's uint32 always holds
# while no outcome comes, the bridge checks this often that the workers are alive (a dead worker
# answers nothing); outcomes themselves are forwarded the moment they come
_LIVENESS_CHECK = 0.5
# "off" in the server's environment: the built-in sums go through LiberTEM like every other UDF
# (to compare, or should the fused path ever be suspected); read when a series is set up
FUSED_SUMS_ENV = "TANGO_DECTRIS_LIVE_FUSED_SUMS"


class WorkerStartError(RuntimeError):
    """The worker processes could not be started (file descriptors, memory, processes)."""


class WorkerFailed(RuntimeError):
    """A worker process died; the pool cannot go on."""


# ---------------------------------------------------------------------------------------------
# Messages between the main process and the workers


@dataclass(frozen=True)
class BeginSeries:
    """To every worker: the series that the next stacks belong to (a :class:`_SeriesSpec`,
    cloudpickled once for all workers: it holds the UDF classes, which may be a facility's own)."""

    pickled_spec: bytes


@dataclass(frozen=True)
class ProcessStack:
    """To one worker: run the series' UDFs on the stack's positions ``[begin, end)`` (None: to
    its end). ``seq`` numbers the stacks (and parts of stacks) of a run in dispatch order."""

    run_id: int
    seq: int
    stack: Any
    begin: int = 0
    end: int | None = None
    # a slot of the series' result_slots lent for this stack's sum counts (None: none free)
    result_slot: int | None = None
    # compact numbering (a receiver node): the scan index of position ``begin``; the part's frames
    # are then indices local_first, local_first + 1, ... in stack order (None: their frame numbers)
    local_first: int | None = None


class FrameRunResult(NamedTuple):
    """The partial results of the scan positions ``[first_frame, first_frame + count)``: per UDF
    (in the series' order), its partition buffers by name (the fused sums' ``counts`` may be a
    :class:`~.result_slots.SlotCounts`: in the slot lent with the stack)."""

    first_frame: int
    count: int
    buffers: list[dict[str, np.ndarray]]


@dataclass(frozen=True)
class StackDone:
    """From a worker: the partial results of a :class:`ProcessStack`, and how many of its frames
    had numbers outside the scan (not placed)."""

    run_id: int
    seq: int
    runs: list[FrameRunResult]
    out_of_scan: int


@dataclass(frozen=True)
class StackFailed:
    """From a worker: an analysis raised on this stack; ``error`` is the exception and its
    traceback (the first line is the exception)."""

    run_id: int
    seq: int
    error: str


@dataclass(frozen=True)
class StackSkipped:
    """From a worker: the stack's run was cancelled (stop/abort) or is not the worker's current
    series; nothing was processed."""

    run_id: int
    seq: int


@dataclass(frozen=True)
class Wake:
    """From a run to its own bridge thread, through the pool's result queue: the run is over."""

    run_id: int


@dataclass(frozen=True)
class RunControl:
    """On the run's queue: :meth:`SeriesRun.stop` (``abort`` False) or :meth:`SeriesRun.abort`."""

    run_id: int
    abort: bool


@dataclass(frozen=True)
class StackSaved:
    """On the run's queue, from the series file's writer: it is done with ``handle``'s frames."""

    run_id: int
    handle: Any


@dataclass(frozen=True)
class WorkersLost:
    """On the run's queue, from its bridge: a worker process died; the run fails."""

    run_id: int
    error: WorkerFailed


StackOutcome = Union[StackDone, StackFailed, StackSkipped]


# ---------------------------------------------------------------------------------------------
# Worker side


@dataclass
class _SeriesSpec:
    """Everything a worker needs for one series (sent once per series, with cloudpickle)."""

    run_id: int
    udf_classes: list[type[UDF]]
    udf_kwargs: list[dict]
    scan_shape: tuple[int, ...]
    frame_shape: tuple[int, int]
    raw_dtype: str
    # (input dtype, indices of the UDFs that get their frames in it): LiberTEM's dtype rule per UDF,
    # so that an exact float64 sum is not degraded by a float32 mask analysis in the same run
    dtype_groups: list[tuple[str, list[int]]]
    tile_depth: int
    decode_frames_into: StackDecoder
    frames_per_partition: int  # frames decoded and processed at once (bounds a worker's memory)
    # the UDFs are the built-in exact sums alone and the source can sum its stacks compressed
    fused_sums: FusedSums | None = None
    # (segment name, slot bytes) of the shared memory lent for the fused sums' counts
    result_slots: tuple[str, int] | None = None
    # the slot lent with the stack being processed (a worker sets it per task, see _serve_tasks)
    result_slot: int | None = None
    # compact numbering of the task being processed (ProcessStack.local_first; set per task)
    local_first: int | None = None


@dataclass(frozen=True)
class FusedSums:
    """A series whose UDFs are only the built-in ExactSumUDF / ExactSumSigUDF (``roles``, per UDF
    "sum" or "sumsig"): a worker makes their partition buffers with the source's ``stack_sums``
    (stack_sums.py: decoded and summed a block at a time, in the cache) instead of through LiberTEM
    -- the same buffers, the same integers, a third less CPU per frame at 512x512."""

    roles: tuple[str, ...]
    stack_sums: Any  # the FrameSource's stack_sums: accepts(stack, begin, end, dtype), add(...)


def tile_bytes(udfs: list[UDF]) -> int:
    """The tile size (bytes) for a set of UDFs, from their tiling preferences: the smallest
    ``total_size`` one of them asks for (at most 64 MiB). UDFs that leave it to LiberTEM
    (``TILE_SIZE_MAX``, the default, or ``TILE_SIZE_BEST_FIT``) get ~1 MiB, the size measured best
    here for LiberTEM's mask and CoM UDFs (docs/performance.md); the exact sums ask for 4 MiB.
    A tile always holds at least one whole frame."""
    sizes = []
    for udf in udfs:
        size = udf.get_tiling_preferences().get("total_size", UDF.TILE_SIZE_MAX)
        if isinstance(size, (int, float, np.number)) and math.isfinite(size) and size > 0:
            sizes.append(int(min(size, _MAX_TILE_BYTES)))
        else:
            sizes.append(_TILE_BYTES)
    return min(sizes, default=_TILE_BYTES)


def _frame_runs(numbers: np.ndarray) -> list[tuple[int, int]]:
    """(start, stop) index ranges of consecutive values in sorted unique ``numbers``."""
    if numbers.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(numbers) != 1) + 1
    bounds = [0, *breaks.tolist(), numbers.size]
    return list(zip(bounds[:-1], bounds[1:]))


_buffers: dict[tuple, np.ndarray] = {}  # per worker process: decode/convert buffers, reused


def _buffer(role: str, frames: int, frame_shape: tuple[int, int], dtype: Any) -> np.ndarray:
    """A reusable (frames, *frame_shape) array: a fresh one per stack would page-fault every
    byte of it again (at 512x512, a 32 MiB stack costs more to fault in than to decode)."""
    dtype = np.dtype(dtype)
    key = (role, tuple(frame_shape), dtype.str)
    buffer = _buffers.get(key)
    if buffer is None or buffer.shape[0] < frames:
        buffer = _buffers[key] = np.empty((frames, *frame_shape), dtype=dtype)
    return buffer[:frames]


def _run_udfs(spec: _SeriesSpec, env: Environment, tiling_scheme: TilingScheme, members: list[int],
              partition: FrameRunPartition) -> list[dict]:
    """The UDFs ``members`` over one partition; their buffers."""
    return run_udfs_on_partition([spec.udf_classes[i] for i in members], [spec.udf_kwargs[i] for i in members],
                                 partition, tiling_scheme, env)


def _process_stack(spec: _SeriesSpec, stack: Any, env: Environment, begin: int = 0,
                   end: int | None = None) -> tuple[list[FrameRunResult], int]:
    """Run the UDFs on each run of consecutive frame numbers of ``stack`` (its positions
    ``[begin, end)``, default all), at most ``spec.frames_per_partition`` frames per partition.

    The usual stack holds frames in increasing order: then each partition decodes its frames a
    tile at a time, right before the UDFs read them (the tile is still in the CPU cache).
    Disordered stacks are decoded whole, then sorted.

    Returns (the partial results, frames outside the scan)."""
    dataset = LiveDataSet(spec.scan_shape, spec.frame_shape, spec.raw_dtype)
    tiling_scheme = whole_frame_tiling(spec.tile_depth, dataset.shape)
    end = stack.frames if end is None else end
    if spec.local_first is not None:  # compact numbering: the frames in stack order
        numbers = np.arange(spec.local_first, spec.local_first + end - begin, dtype=np.int64)
    else:
        numbers = np.asarray(stack.frame_numbers(), dtype=np.int64)[begin:end]
    scan_size = int(np.prod(spec.scan_shape))
    in_scan = (numbers >= 0) & (numbers < scan_size)
    out_of_scan = int(np.count_nonzero(~in_scan))
    increasing = out_of_scan == 0 and bool(np.all(np.diff(numbers) > 0))
    fused = spec.fused_sums
    if fused is not None and fused.stack_sums.accepts(stack, begin, end, spec.raw_dtype):
        return _sum_fused(spec, fused, stack, numbers, in_scan, increasing, begin), out_of_scan
    if increasing and len(spec.dtype_groups) == 1:
        return _process_in_tiles(spec, stack, env, dataset, tiling_scheme, numbers, begin), 0
    return _process_decoded(spec, stack, env, dataset, tiling_scheme, begin, end), out_of_scan


def _partitions(spec: _SeriesSpec, numbers: np.ndarray, in_scan: np.ndarray, increasing: bool,
                begin: int) -> list[tuple[int, np.ndarray]]:
    """(first frame number, stack positions of its frames in scan order) of each partition of the
    stack's positions from ``begin`` on (``numbers``: their frame numbers): the partitions the
    LiberTEM path makes of them, runs of consecutive frame numbers of at most
    ``spec.frames_per_partition`` frames; frames outside the scan left out and, of frames that came
    twice, the first kept, as there."""
    chunk = max(1, spec.frames_per_partition)
    partitions = []
    if increasing:
        for run_start, run_stop in _frame_runs(numbers):
            for start in range(run_start, run_stop, chunk):
                stop = min(run_stop, start + chunk)
                partitions.append((int(numbers[start]), np.arange(begin + start, begin + stop, dtype=np.int64)))
        return partitions
    for first in range(0, numbers.size, chunk):
        inside = in_scan[first:first + chunk]
        ordered, first_index = np.unique(numbers[first:first + chunk][inside], return_index=True)
        positions = begin + first + np.flatnonzero(inside)[first_index]
        for start, stop in _frame_runs(ordered):
            partitions.append((int(ordered[start]), positions[start:stop]))
    return partitions


def _sum_fused(spec: _SeriesSpec, fused: FusedSums, stack: Any, numbers: np.ndarray, in_scan: np.ndarray,
               increasing: bool, begin: int) -> list[FrameRunResult]:
    """The partition buffers of the built-in exact sums (``fused.roles``), as LiberTEM's run of
    ExactSumUDF / ExactSumSigUDF gives them -- ``counts`` (frame-shaped, the partition's counts
    type) and ``intensity`` (one float64 per frame) -- computed from the compressed frames. The
    counts of a stack that is one partition (the usual case) go into ``spec.result_slot``, if lent."""
    partial: list[FrameRunResult] = []
    input_dtype = np.dtype(spec.raw_dtype)
    partitions = _partitions(spec, numbers, in_scan, increasing, begin)
    result_slot = spec.result_slot
    for first_frame, positions in partitions:
        count = positions.size
        counts, sum_buffer = None, None
        if "sum" in fused.roles:
            dtype = partition_counts_dtype(input_dtype, count)
            nbytes = int(np.prod(spec.frame_shape)) * dtype.itemsize
            if (result_slot is not None and spec.result_slots is not None and nbytes <= spec.result_slots[1]
                    and len(partitions) == 1):
                counts = slot_array(*spec.result_slots, result_slot, dtype, spec.frame_shape)
            if counts is None:
                counts = sum_buffer = np.zeros(spec.frame_shape, dtype)
            else:
                counts[...] = 0
                sum_buffer = SlotCounts(result_slot, dtype.str, tuple(spec.frame_shape))
        totals = np.zeros(count) if "sumsig" in fused.roles else None
        fused.stack_sums.add(stack, positions, spec.frame_shape, input_dtype, counts, totals)
        buffers = [{"counts": sum_buffer} if role == "sum" else {"intensity": totals} for role in fused.roles]
        partial.append(FrameRunResult(first_frame, count, buffers))
    return partial


def _process_in_tiles(spec: _SeriesSpec, stack: Any, env: Environment, dataset: LiveDataSet,
                      tiling_scheme: TilingScheme, numbers: np.ndarray, begin: int) -> list[FrameRunResult]:
    """Frames in increasing order, one input dtype: stack positions of a run are contiguous
    (``numbers`` are those of the stack's positions from ``begin`` on)."""
    dtype, members = spec.dtype_groups[0]  # one group: every UDF, in order
    chunk = max(1, spec.frames_per_partition)
    tile_buffer = _buffer("tile", max(1, min(spec.tile_depth, numbers.size)), spec.frame_shape, dtype)
    partial: list[FrameRunResult] = []
    for run_start, run_stop in _frame_runs(numbers):
        for start in range(run_start, run_stop, chunk):
            stop = min(run_stop, start + chunk)
            source = StackTileSource(spec.decode_frames_into, stack, begin + start, tile_buffer,
                                     check_numbers=spec.local_first is None)
            partition = dataset.partition_for_run(int(numbers[start]), source, stop - start)
            partial.append(FrameRunResult(int(numbers[start]), stop - start,
                                          _run_udfs(spec, env, tiling_scheme, members, partition)))
    return partial


def _process_decoded(spec: _SeriesSpec, stack: Any, env: Environment, dataset: LiveDataSet,
                     tiling_scheme: TilingScheme, first: int, end: int) -> list[FrameRunResult]:
    """Decode ``spec.frames_per_partition`` of the stack's positions ``[first, end)`` at a time,
    drop those outside the scan, sort the rest, convert them once per input dtype, run each
    dtype's UDFs."""
    partial: list[FrameRunResult] = []
    chunk = max(1, spec.frames_per_partition)
    # one group: decode straight into its dtype; several: decode the raw pixels once, convert per group
    decode_dtype = spec.dtype_groups[0][0] if len(spec.dtype_groups) == 1 else spec.raw_dtype
    frames = _buffer("decoded", max(1, min(chunk, end - first)), spec.frame_shape, decode_dtype)
    udf_count = len(spec.udf_classes)
    scan_size = int(np.prod(spec.scan_shape))
    for begin in range(first, end, chunk):
        chunk_end = min(end, begin + chunk)
        decoded = frames[:chunk_end - begin]
        numbers = np.asarray(spec.decode_frames_into(stack, begin, chunk_end, decoded), dtype=np.int64)
        if spec.local_first is not None:  # compact numbering: the frames in stack order
            numbers = np.arange(spec.local_first + begin - first, spec.local_first + chunk_end - first, dtype=np.int64)
        in_scan = (numbers >= 0) & (numbers < scan_size)
        # stacks hold frames in arrival order; LiberTEM wants them in scan order
        numbers, first_index = np.unique(numbers[in_scan], return_index=True)
        already_ordered = numbers.size == decoded.shape[0] and np.array_equal(first_index, np.arange(numbers.size))
        ordered = decoded if already_ordered else decoded[in_scan][first_index]
        for start, stop in _frame_runs(numbers):
            buffers: list[dict | None] = [None] * udf_count
            for dtype, members in spec.dtype_groups:
                data = ordered[start:stop]
                if data.dtype != np.dtype(dtype):
                    data = _buffer("converted", stop - start, spec.frame_shape, dtype)
                    np.copyto(data, ordered[start:stop], casting="unsafe")
                partition = dataset.partition_for_run(int(numbers[start]), data, stop - start)
                for i, result in zip(members, _run_udfs(spec, env, tiling_scheme, members, partition)):
                    buffers[i] = result
            partial.append(FrameRunResult(int(numbers[start]), stop - start, buffers))
    return partial


def _end_with_parent() -> None:
    """A worker must not outlive the device server: killed (SIGKILL, a crash), the server sends no
    ``None`` and the worker would wait on its task queue for ever (seen under Debian's Starter,
    which leaves no process group to end). A thread waits for the parent to go and ends this one."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        multiprocessing.connection.wait([parent.sentinel])
        os._exit(0)

    threading.Thread(target=watch, name="worker-parent-watch", daemon=True).start()


def _worker_main(tasks: multiprocessing.Queue, results: multiprocessing.Queue, active_run) -> None:
    """A worker process: series and stacks in, their outcomes out, until ``None``."""
    _end_with_parent()
    tune_allocator()  # LiberTEM's per-partition result buffers: reuse freed memory (allocator.py)
    env = single_thread_environment()
    # one thread per worker for the numeric libraries, set once: LiberTEM enters the environment
    # again for every partition, and when it is already entered that costs nothing, while a
    # first entry scans the loaded libraries (threadpoolctl) -- 5 % of a worker's time at 96x96
    with env.enter():
        _serve_tasks(tasks, results, active_run, env)


def _serve_tasks(tasks: multiprocessing.Queue, results: multiprocessing.Queue, active_run,
                 env: Environment) -> None:
    spec: _SeriesSpec | None = None
    while True:
        match tasks.get():
            case None:
                return
            case BeginSeries(pickled_spec):
                spec = cloudpickle.loads(pickled_spec)
            case ProcessStack(run_id, seq) as task:
                if spec is None or spec.run_id != run_id or active_run.value != run_id:
                    results.put(StackSkipped(run_id, seq))
                    continue
                # the slot lent with this stack travels in the spec: _process_stack keeps the
                # signature the benchmarks' probes wrap
                task_spec = (spec if task.result_slot is None and task.local_first is None
                             else dataclasses.replace(spec, result_slot=task.result_slot,
                                                      local_first=task.local_first))
                try:
                    runs, out_of_scan = _process_stack(task_spec, task.stack, env, task.begin, task.end)
                except Exception as error:  # reported to the main process, which fails the run with it
                    results.put(StackFailed(run_id, seq, f"{type(error).__name__}: {error}\n{traceback.format_exc()}"))
                else:
                    results.put(StackDone(run_id, seq, runs, out_of_scan))
            case unknown:
                raise TypeError(f"a worker got {type(unknown).__name__}, not a task message")


class WorkerPool:
    """``workers`` processes that decode stacks and run UDFs; started once, reused per series."""

    def __init__(self, workers: int = 2, start_method: str = "spawn"):
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        context = multiprocessing.get_context(start_method)
        self._closed = False
        self._tasks: list[multiprocessing.Queue] = []
        self._processes: list[multiprocessing.Process] = []
        self._in_flight = [0] * workers
        self._result_slots: ResultSlots | None = None
        self._free_slots: list[int] = []  # result slots not lent now (the current series')
        self._lent: dict[int, int] = {}  # seq -> the result slot lent with it
        try:
            self.active_run = context.Value("q", _NO_RUN, lock=False)
            self.results: multiprocessing.Queue = context.Queue()
            for i in range(workers):
                tasks = context.Queue()
                self._tasks.append(tasks)
                process = context.Process(target=_worker_main, args=(tasks, self.results, self.active_run),
                                          name=f"tango-dectris-live-worker-{i}", daemon=True)
                process.start()
                self._processes.append(process)
        except OSError as error:
            # e.g. EMFILE: whatever started must not outlive the failure, or the next pool
            # finds the descriptors still taken
            started = len(self._processes)
            self._discard()
            raise WorkerStartError(f"could not start {workers} worker processes ({started} started): "
                                   f"{error.strerror or error}") from error

    @property
    def size(self) -> int:
        return len(self._processes)

    @property
    def closed(self) -> bool:
        return self._closed

    def lend_result_slots(self, counts_bytes: int | None) -> tuple[str, int] | None:
        """At a series' set-up: from now on lend a shared-memory slot for fused sums' counts of
        ``counts_bytes`` with each dispatched stack while one is free (None: lend none); the
        (segment name, slot bytes) for the series' spec, None when none are lent (too large).
        The segment is kept from series to series, made anew when a series needs larger slots;
        no slot of the previous series may still be lent."""
        self._lent.clear()
        self._free_slots = []
        if counts_bytes is None:
            return None
        slots = self._result_slots
        if slots is None or slots.slot_bytes < counts_bytes:
            if slots is not None:
                slots.close()
            slots = self._result_slots = ResultSlots.for_counts(counts_bytes, max(16, 8 * self.size))
        if slots is None:
            return None
        self._free_slots = list(range(slots.count))
        return slots.name, slots.slot_bytes

    def result_counts(self, counts: SlotCounts) -> np.ndarray:
        """The counts a worker left in a lent slot (a view: merge it before the slot is returned)."""
        if self._result_slots is None:
            raise RuntimeError("a worker answered with counts in a result slot, but none are lent")
        return self._result_slots.array(counts)

    def return_slot(self, seq: int) -> None:
        """The outcome of stack ``seq`` is merged or dropped: its result slot (if any) is free."""
        slot = self._lent.pop(seq, None)
        if slot is not None:
            self._free_slots.append(slot)

    @property
    def slots_lent(self) -> int:
        return len(self._lent)

    def begin_series(self, spec: _SeriesSpec) -> None:
        message = BeginSeries(cloudpickle.dumps(spec))
        for tasks in self._tasks:
            tasks.put(message)
        self.active_run.value = spec.run_id

    def cancel_series(self) -> None:
        """Workers skip every queued stack from now on (they still answer for each)."""
        self.active_run.value = _NO_RUN

    def dispatch(self, run_id: int, seq: int, stack: Any, begin: int = 0, end: int | None = None,
                 local_first: int | None = None) -> int:
        """Queue ``stack`` (its positions ``[begin, end)``, default all) on the least busy
        worker, with a result slot if the series lends them and one is free; returns that
        worker's index."""
        frames = (stack.frames if end is None else end) - begin
        # a part of at most 65,537 frames: its counts of 8/16-bit pixels are the slots' uint32
        slot = self._free_slots.pop() if self._free_slots and frames <= _SLOT_FRAMES else None
        if slot is not None:
            self._lent[seq] = slot
        worker = min(range(self.size), key=self._in_flight.__getitem__)
        self._in_flight[worker] += 1
        self._tasks[worker].put(ProcessStack(run_id, seq, stack, begin, end, slot, local_first))
        return worker

    def idle(self) -> int:
        """How many workers have nothing queued."""
        return self._in_flight.count(0)

    def completed(self, worker: int) -> None:
        self._in_flight[worker] -= 1

    def check_alive(self) -> None:
        dead = [p.name for p in self._processes if not p.is_alive()]
        if dead and not self._closed:
            raise WorkerFailed(f"worker process(es) {', '.join(dead)} died; restart live processing")

    def close(self, timeout: float = 10.0) -> None:
        """Stop the workers (idempotent); kills those that do not exit within ``timeout``."""
        if self._closed:
            return
        self._closed = True
        for tasks in self._tasks:
            tasks.put(None)
        for process in self._processes:
            process.join(timeout)
            if process.is_alive():
                process.kill()
                process.join()
        for q in (*self._tasks, self.results):
            q.close()
            q.join_thread()
        if self._result_slots is not None:
            self._result_slots.close()

    def _discard(self) -> None:
        """Kill what a failed start left, close every queue made so far."""
        self._closed = True
        for process in self._processes:
            process.kill()
            process.join()
        queues = list(self._tasks)
        if hasattr(self, "results"):
            queues.append(self.results)
        for q in queues:
            q.close()
            q.join_thread()


def _fused_sums(udfs: list[UDF], source: FrameSource) -> FusedSums | None:
    """The fused path for these UDFs, if they are the built-in exact sums alone and ``source``
    offers one: its ``stack_sums``, or, for a source that decodes the receiver's frame stacks
    (``decode_frames_into`` is the receiver's: a ReceiverFrameSource or a wrapper of one that
    passes its decoder on), :class:`~.stack_sums.StackSums`."""
    roles = fused_sum_roles(udfs)
    if os.environ.get(FUSED_SUMS_ENV, "").strip().lower() in ("off", "0", "no", "false"):
        return None
    stack_sums = getattr(source, "stack_sums", None)
    if stack_sums is None and getattr(source, "decode_frames_into", None) is receiver_decode_frames_into:
        stack_sums = StackSums
    return None if roles is None or stack_sums is None else FusedSums(roles, stack_sums)


# ---------------------------------------------------------------------------------------------
# Main side


class SeriesRun:
    """The processing of one series; created by :meth:`LiveRunner.process`.

    One thread consumes one queue, the frame source's: the receiver's events (series start,
    stacks, series end), the workers' outcomes (forwarded from the pool's result queue by a
    bridge thread, the only thread that waits on a process queue) and this run's Stop/Abort. It
    dispatches, releases slots and merges in that order; nothing polls. :meth:`snapshot` may be
    called at any moment from any thread.
    """

    def __init__(self, runner: LiveRunner, run_id: int, source: FrameSource, analyses: list[str],
                 parameters: AnalysisParameters, nav_shape: tuple[int, ...] | None, series: int | None,
                 frames_per_partition: int | None = None, on_change: Callable[[], None] | None = None,
                 saving: SeriesSaving | None = None,
                 detector_config: Callable[[], dict[str, tuple[Any, Any]]] | None = None, compact: bool = False):
        self._runner = runner
        # compact numbering (a receiver node, which gets every n-th frame of the scan): frames are
        # processed as scan indices 0, 1, 2, ... in the order they are dispatched, so that a
        # partition is a run of many frames, not of one; _order maps an index to its frame number
        self._compact = compact
        self._order = np.zeros(0, np.int64)
        self._dispatched = 0
        self._saving = saving
        self._detector_config = detector_config or dict  # read only when a series is saved
        self._held_by_writer: dict[int, Any] = {}  # id(stack) -> stack the series file's writer has
        # told when the series starts and when the run ends (whoever follows the run waits on it)
        self._on_change = on_change if on_change is not None else (lambda: None)
        self._frames_per_partition = frames_per_partition
        self._pool = runner.pool
        self._run_id = run_id
        self._source = source
        self._analysis_names = analyses
        self._parameters = parameters
        self._nav_shape = nav_shape
        self._wanted_series = series
        # set by stop()/abort() from any thread: read by the consumer on every event, so that a
        # queue full of stacks is dropped at once rather than after the control event's turn
        self._stop = threading.Event()
        self._abort = threading.Event()
        self._ended = threading.Event()
        self._lock = threading.Lock()  # the results and counters, against snapshot()/counters()
        self._state = RunState.WAITING
        self._error: str | None = None
        self._series: int | None = None
        self._started: SeriesStarted | None = None
        self._scan: ScanShape | None = None
        self._selected: list[SelectedAnalysis] = []
        self._done: np.ndarray = np.zeros(0, bool)
        self._frames_processed = 0
        self._frames_out_of_scan = 0
        self._dropped = np.zeros(0, np.int64)
        self._finished = False  # the series' end came
        self._stacks_merged = 0
        self._stale_stacks = 0
        # the consumer thread's own: seq -> (stack or the part of it, worker)
        self._in_flight: dict[int, tuple[Any, int]] = {}
        self._dispatch_closed = False  # no more stacks will be dispatched
        self._pending: dict[int, StackOutcome] = {}  # outcomes waiting for earlier ones (by seq)
        self._next_merge = 0
        self._seq = itertools.count()
        self._bridge: threading.Thread | None = None
        # read while the last outcomes came, not this run's: the next run's (see _take)
        self._not_ours: list[Any] = []
        self._thread = threading.Thread(target=self._run, name=f"series-run-{run_id}", daemon=True)

    # -- control ---------------------------------------------------------------------------

    def start(self) -> SeriesRun:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Graceful: take no more stacks, finish those already taken, then a final snapshot."""
        self._stop.set()
        self._source.post(RunControl(self._run_id, abort=False))

    def abort(self) -> None:
        """Drop every stack not processed yet; results merged so far stay in the snapshot."""
        self._abort.set()
        self._pool.cancel_series()  # the workers skip what is queued from now on
        self._source.post(RunControl(self._run_id, abort=True))

    def wait(self, timeout: float | None = None) -> ResultSnapshot:
        """The final snapshot once the run has ended; TimeoutError if it has not within ``timeout``."""
        if not self._ended.wait(timeout):
            raise TimeoutError(f"series processing still {self._state.value} after {timeout} s")
        self._thread.join()
        return self.snapshot()

    @property
    def state(self) -> RunState:
        return self._state

    @property
    def ended(self) -> bool:
        return self._ended.is_set()

    def wait_until_ended(self, timeout: float) -> bool:
        """True once the run has ended; waits at most ``timeout`` seconds."""
        return self._ended.wait(timeout)

    @property
    def series(self) -> int | None:
        """The series being processed (None while waiting for one)."""
        return self._series

    def counters(self) -> tuple[int, int]:
        """(frames expected, frames processed) without copying any result: cheap enough to poll."""
        with self._lock:
            return int(self._done.size), self._frames_processed

    # -- results -----------------------------------------------------------------------------

    def snapshot(self) -> ResultSnapshot:
        """A copy of the results merged so far (does not stop or slow the pipeline beyond a copy)."""
        with self._lock:
            if self._scan is None or not self._selected:
                return empty_snapshot(self._state, self._series, self._error)
            done = self._global_done().reshape(self._scan.shape)
            buffers: dict[str, np.ndarray] = {}
            for selected in self._selected:
                buffers.update(self._extract(selected, self._done.reshape(self._scan.shape)))
            final = self._state.is_final
            return ResultSnapshot(
                series=self._series, state=self._state, scan_shape=self._scan.shape,
                scan_shape_note=self._scan.note, buffers=buffers, done=done.copy(),
                frames_expected=done.size, frames_processed=self._frames_processed,
                frames_missing=int(done.size - np.count_nonzero(done)) if final else 0,
                frames_dropped=int(self._dropped.size), frames_out_of_scan=self._frames_out_of_scan,
                stacks_merged=self._stacks_merged, error=self._error)

    def partial(self, **fields) -> PartialResults | None:
        """The raw whole-scan buffers of the analyses and the map of processed positions, as a
        node sends them to the merging device (None before the series is set up); ``fields``:
        ``end_seen``, ``frames_received``, ``sequence``."""
        with self._lock:
            if self._scan is None or not self._selected or self._series is None:
                return None
            order = self._order[:self._dispatched].copy() if self._compact else None
            return partial_of(self._selected, self._global_done(), series=int(self._series), state=self._state.value,
                              frames_processed=self._frames_processed, error=self._error or "", order=order,
                              **fields)

    def _global_done(self) -> np.ndarray:
        """The flat map of scan positions processed, by frame number (compact numbering: mapped)."""
        if not self._compact:
            return self._done
        done = np.zeros(self._done.size, bool)
        done[self._order[np.flatnonzero(self._done[:self._dispatched])]] = True
        return done

    def _extract(self, selected: SelectedAnalysis, done: np.ndarray) -> dict[str, np.ndarray]:
        """One analysis' results as published: copies, NaN where a scan position has no frame
        (compact numbering: scan-shaped results placed by frame number -- values a UDF derives from
        neighbouring positions, such as CoM's divergence, mean something only once merged)."""
        results = results_of(selected.udf, self._done)
        own = {name: blank_unprocessed(np.array(buf.data), done) if buf.kind == "nav"
               else np.array(buf.data) for name, buf in results.items()}
        extracted = {k: np.ascontiguousarray(v) for k, v in selected.extract_results(own).items()}
        if self._compact:
            extracted = {k: self._placed(v, done) for k, v in extracted.items()}
        return extracted

    def _placed(self, values: np.ndarray, done: np.ndarray) -> np.ndarray:
        """A scan-shaped result of compact numbering moved to the positions of its frames."""
        if values.shape[:done.ndim] != done.shape:
            return values
        rows = np.flatnonzero(self._done[:self._dispatched])
        flat = values.reshape(done.size, *values.shape[done.ndim:])
        placed = np.full_like(flat, np.nan) if np.issubdtype(values.dtype, np.floating) else np.zeros_like(flat)
        placed[self._order[rows]] = flat[rows]
        return placed.reshape(values.shape)

    # -- the consumer thread -----------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._complete():
                event = self._source.next_event(None)
                try:
                    self._take(event)
                except Exception as error:  # the run ends FAILED with the reason; what is in flight drains
                    log.exception("live processing of series %s failed", self._series)
                    self._fail(f"{type(error).__name__}: {error}")
            self._source.put_back(self._not_ours)
            self._finish()
        except Exception as error:  # noqa: BLE001 - the source itself failed: nothing more will come
            log.exception("live processing of series %s failed", self._series)
            self._error = self._error or f"{type(error).__name__}: {error}"
            self._state = RunState.FAILED
        finally:
            self._pool.cancel_series()
            self._end_bridge()
            self._ended.set()
            self._on_change()

    def _complete(self) -> bool:
        """The run is over: no series will start (stopped while waiting), or no stack will be
        dispatched any more and every dispatched one has come back."""
        if self._series is None:
            return self._stop.is_set() or self._abort.is_set()
        return self._dispatch_closed and not self._in_flight and not self._held_by_writer

    def _take(self, event: Any) -> None:
        if self._dispatch_closed and self._is_later_series(event):
            self._not_ours.append(event)  # the next run's: its series started while this one drains
            return
        match event:
            case StackReady(handle=stack):
                self._take_stack(stack)
            case StackDone() | StackFailed() | StackSkipped() if event.run_id == self._run_id:
                self._take_outcome(event)
            case SeriesStarted() if self._series is None and self._wanted_series in (None, event.series):
                self._begin(event)
            case SeriesFinished(summary=summary) if self._series is not None and summary.series == self._series:
                self._dropped = np.asarray(summary.missing_frames, np.int64)
                self._finished = True
                self._dispatch_closed = True
            case StackSaved(run_id=run_id, handle=stack) if run_id == self._run_id:
                if self._held_by_writer.pop(id(stack), None) is not None:
                    self._release_when_free(stack)
            case WorkersLost(run_id=run_id, error=error) if run_id == self._run_id:
                self._fail(str(error))
                self._in_flight.clear()  # their stacks died with the worker
            case StackDone() | StackFailed() | StackSkipped():
                log.warning("result of an unknown run/stack (%s, %s) ignored", event.run_id, event.seq)
            case _:
                pass  # another run's control, a series not wanted, None: look at the flags below
        if (self._stop.is_set() or self._abort.is_set()) and self._series is not None:
            self._dispatch_closed = True

    def _is_later_series(self, event: Any) -> bool:
        """A receiver event of a series that is not this run's, or of this run's series started anew."""
        match event:
            case SeriesStarted():
                return True
            case StackReady(handle=stack) | SeriesFinished(summary=stack):
                return stack.series != self._series or bool(self._not_ours)
        return False

    def _begin(self, started: SeriesStarted) -> None:
        self._started = started
        self._series = started.series
        self._state = RunState.RUNNING
        self._bridge = threading.Thread(target=self._forward_outcomes, name=f"series-outcomes-{self._run_id}",
                                        daemon=True)
        self._bridge.start()
        self._on_change()
        if not self._abort.is_set():
            # the workers build the series' UDFs while its first frames are still on their way
            self._set_up()

    def _take_stack(self, stack: Any) -> None:
        if (self._series is None or stack.series != self._series or self._dispatch_closed
                or self._stop.is_set() or self._abort.is_set()):
            self._source.release(stack)
            self._stale_stacks += 1
            return
        if not self._selected:
            try:
                self._set_up(stack)
            except Exception:
                self._source.release(stack)  # the run fails; its slot must not stay taken
                raise
        self._dispatch(stack)
        if self._saving is not None and self._saving.write_stack(stack):
            self._held_by_writer[id(stack)] = stack  # its slot waits for the writer too

    def _release_when_free(self, stack: Any) -> None:
        """Give the stack's slot back once no part of it is in flight (a few entries at most) and
        the series file's writer is done with it."""
        if id(stack) not in self._held_by_writer and all(other is not stack for other, _ in self._in_flight.values()):
            self._source.release(stack)

    def _fail(self, error: str) -> None:
        self._error = self._error or error.splitlines()[0]
        self._abort.set()
        self._pool.cancel_series()
        self._dispatch_closed = True

    def _finish(self) -> None:
        started = self._started
        if started is None:
            self._state = RunState.ABORTED if self._abort.is_set() else RunState.STOPPED
            return
        if not self._selected:
            self._set_up()  # a series without any frame: all missing
        with self._lock:
            if self._error:
                self._state = RunState.FAILED
            elif self._abort.is_set():
                self._state = RunState.ABORTED
            else:
                self._state = RunState.FINISHED if self._finished else RunState.STOPPED

    def _forward_outcomes(self) -> None:
        """The bridge: the workers' outcomes from the pool's process queue onto the run's queue,
        until the consumer says the run is over; a dead worker ends it (the run fails)."""
        while True:
            try:
                message = self._pool.results.get(timeout=_LIVENESS_CHECK)
            except queue.Empty:
                try:
                    self._pool.check_alive()
                except WorkerFailed as error:
                    self._source.post(WorkersLost(self._run_id, error))
                    return
                continue
            if isinstance(message, Wake):
                if message.run_id == self._run_id:
                    return
                continue
            self._source.post(message)

    def _end_bridge(self) -> None:
        bridge = self._bridge
        if bridge is not None and bridge.is_alive():
            self._pool.results.put(Wake(self._run_id))
            bridge.join()

    def _set_up(self, stack: Any = None) -> None:
        """The series' analyses, result buffers and workers, for the frame shape and pixel type of
        its header or, where the header does not say, of ``stack``; nothing when neither says."""
        header = self._started.header
        shape = header.shape if header.shape is not None else (stack.shape if stack is not None else None)
        dtype = header.dtype if header.dtype is not None else (stack.dtype if stack is not None else None)
        if shape is None or dtype is None:
            return
        scan = resolve_scan_shape(header.number_of_images, self._nav_shape)
        frame_shape = tuple(int(n) for n in shape)
        raw_dtype = np.dtype(dtype)
        selected = self._runner.registry.build(self._analysis_names, self._parameters, frame_shape)
        dataset = LiveDataSet(scan.shape, frame_shape, raw_dtype)
        udfs = [s.udf for s in selected]
        groups: dict[str, list[int]] = {}
        for i, udf in enumerate(udfs):
            input_dtype = udf_input_dtype(udf, raw_dtype)
            groups.setdefault(input_dtype.str, []).append(i)
            allocate_full_results(udf, dataset, input_dtype)
        frame_bytes = int(np.prod(frame_shape)) * max(np.dtype(d).itemsize for d in groups)
        spec = _SeriesSpec(
            run_id=self._run_id, udf_classes=[type(u) for u in udfs],
            udf_kwargs=[udf_constructor_kwargs(u) for u in udfs],
            scan_shape=scan.shape, frame_shape=frame_shape, raw_dtype=raw_dtype.str,
            dtype_groups=list(groups.items()), tile_depth=max(1, tile_bytes(udfs) // frame_bytes),
            decode_frames_into=self._source.decode_frames_into,
            frames_per_partition=self._frames_per_partition or 1 << 30,
            fused_sums=_fused_sums(udfs, self._source))
        if not self._abort.is_set():
            counts_bytes = None
            if spec.fused_sums is not None and "sum" in spec.fused_sums.roles:
                # the largest counts a stack's partition has: uint64 for 32-bit pixels
                counts_bytes = int(np.prod(frame_shape)) * (8 if raw_dtype.itemsize > 2 else 4)
            spec = dataclasses.replace(spec, result_slots=self._pool.lend_result_slots(counts_bytes))
            self._pool.begin_series(spec)
        with self._lock:
            self._dataset = dataset
            self._scan = scan
            self._selected = selected
            self._done = np.zeros(int(np.prod(scan.shape)), bool)
            self._order = np.zeros(self._done.size, np.int64)
        if self._saving is not None:
            run_id = self._run_id
            self._saving.begin(lambda: self._file_spec(scan, frame_shape, raw_dtype),
                               lambda handle: self._source.post(StackSaved(run_id, handle)))

    def _file_spec(self, scan: ScanShape, frame_shape: tuple[int, int], raw_dtype: np.dtype) -> SeriesFileSpec:
        """What the series file holds (built only when the series is saved)."""
        layout = {selected.name: {name: (buffer.shape, buffer.dtype.str) for name, buffer in
                                  self._extract(selected, self._done.reshape(scan.shape)).items()}
                  for selected in self._selected}
        parameters = {name: value for name, value in dataclasses.asdict(self._parameters).items()
                      if value is not None and name != "frame_shape"}
        return SeriesFileSpec(
            series_id=int(self._series), frame_shape=frame_shape, dtype=raw_dtype.str, n_frames=int(np.prod(scan.shape)),
            scan_shape=tuple(scan.shape), title=f"series {self._series}",
            detector_config=self._detector_config(),
            result_layout=layout, analysis_parameters={name: parameters for name in layout})

    def _dispatch(self, stack: Any) -> None:
        """Queue a stack; split into parts for the workers that are idle, so that a stack that
        arrives while processing keeps up (the detector's own rate, and a series' last, partly
        filled stack) is done by every worker at once instead of by one while the others wait.
        A busy pool gets whole stacks: fewer, larger pieces cost less per frame."""
        parts = max(1, min(self._pool.idle(), stack.frames // _MIN_PART_FRAMES))
        local_first = None
        if self._compact:
            numbers = np.asarray(stack.frame_numbers(), dtype=np.int64)
            with self._lock:
                local_first = self._dispatched
                self._order[local_first:local_first + numbers.size] = numbers
                self._dispatched += numbers.size
        for part in range(parts):
            seq = next(self._seq)
            begin, end = stack.frames * part // parts, stack.frames * (part + 1) // parts
            worker = self._pool.dispatch(self._run_id, seq, stack, begin, end,
                                         None if local_first is None else local_first + begin)
            self._in_flight[seq] = (stack, worker)

    def _take_outcome(self, message: StackOutcome) -> None:
        taken = self._in_flight.pop(message.seq, None)
        if taken is None:
            log.warning("result of an unknown stack (%s, %s) ignored", message.run_id, message.seq)
            return
        self._pool.completed(taken[1])
        self._release_when_free(taken[0])
        self._pending[message.seq] = message
        self._merge_pending()

    def _merge_pending(self) -> None:
        while self._next_merge in self._pending:
            outcome = self._pending.pop(self._next_merge)
            self._next_merge += 1
            match outcome:
                case StackFailed(error=error):
                    log.error("analysis failed in a worker: %s", error)
                    self._fail(error)
                case StackDone(runs=runs, out_of_scan=out_of_scan) if not self._abort.is_set():
                    self._merge(runs, out_of_scan)
                case StackDone() | StackSkipped():
                    pass  # aborted meanwhile, or skipped by the worker: nothing to merge
            self._pool.return_slot(outcome.seq)  # merged or dropped: the worker is done with it, and so are we

    def _merge(self, runs: list[FrameRunResult], out_of_scan: int) -> None:
        with self._lock:
            for first_frame, count, buffers in runs:
                partition = self._dataset.partition_for_run(first_frame, None, count)
                for selected, partial in zip(self._selected, buffers):
                    if any(isinstance(buffer, SlotCounts) for buffer in partial.values()):
                        partial = {name: self._pool.result_counts(b) if isinstance(b, SlotCounts) else b
                                   for name, b in partial.items()}
                    merge_partial(selected.udf, partition, partial)
                newly_done = count - int(np.count_nonzero(self._done[first_frame:first_frame + count]))
                self._done[first_frame:first_frame + count] = True
                self._frames_processed += newly_done
            self._frames_out_of_scan += out_of_scan
            self._stacks_merged += 1


class LiveRunner:
    """Live processing of series with named analyses, in a pool of worker processes.

    One series at a time: ``run = runner.process(source, ["sum", "bf"])`` returns a
    :class:`SeriesRun` at once; ``run.snapshot()``, ``run.stop()``, ``run.abort()``,
    ``run.wait()``. The workers are reused for the next series; :meth:`close` shuts them down.
    """

    def __init__(self, workers: int = 2, registry: AnalysisRegistry | None = None, start_method: str = "spawn"):
        self.registry = registry if registry is not None else AnalysisRegistry.discover()
        self.pool = WorkerPool(workers, start_method)
        self._run_ids = itertools.count()
        self._current: SeriesRun | None = None

    def process(self, source: FrameSource, analyses: Iterable[str],
                parameters: AnalysisParameters = AnalysisParameters(),
                nav_shape: tuple[int, ...] | None = None, series: int | None = None,
                frames_per_partition: int | None = None,
                on_change: Callable[[], None] | None = None, saving: SeriesSaving | None = None,
                detector_config: Callable[[], dict[str, tuple[Any, Any]]] | None = None,
                compact: bool = False) -> SeriesRun:
        """Start processing the next series of ``source`` (or series ``series``) in the background.

        ``frames_per_partition``: a worker decodes and processes a stack this many frames at a
        time (None: the whole stack at once). ``compact``: a receiver node's numbering (see
        :class:`SeriesRun`): its snapshot places the frames by frame number all the same.

        Unknown analysis names raise :class:`~.analyses.UnknownAnalysisError` here, before anything runs.
        """
        names = self.registry.validate(analyses)
        if self._current is not None and not self._current.ended:
            raise RuntimeError("a series is still being processed; stop or abort it (and wait) first")
        self.pool.check_alive()
        self._current = SeriesRun(self, next(self._run_ids), source, names, parameters,
                                  tuple(nav_shape) if nav_shape is not None else None, series,
                                  frames_per_partition, on_change, saving, detector_config, compact)
        return self._current.start()

    @property
    def current(self) -> SeriesRun | None:
        return self._current

    def close(self) -> None:
        """Abort a running series and shut the worker processes down (idempotent)."""
        if self._current is not None and not self._current.ended:
            self._current.abort()
            self._current.wait(timeout=30)
        self.pool.close()

    def __enter__(self) -> LiveRunner:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
