"""The writer processes: series files written beside the processing, never in its way.

h5py holds the GIL and one global lock while it works, so the files are written in processes of
their own (spawned once, started again after one died), fed through queues. The main process and
a writer talk in the messages below (frozen dataclasses, pickled):

* to a writer: :class:`OpenSeries` (the series file, or one part file of it), :class:`WriteStack`,
  :class:`WriteResults`, :class:`ClosePart`, :class:`CloseSeries`, :class:`PartDone`, and
  ``None`` to stop;
* back: one :class:`StackWritten` for every :class:`WriteStack` (then that writer is done with
  the stack's shared-memory slot), :class:`SavingFailed` when saving stops or something was not
  saved, :class:`PartClosed` per part file and one :class:`~.nexus.SeriesSaved` per series.

One writer (the default) writes a series' frames into the series file. With ``writers=N`` (N > 1)
and a series of known length, writer ``k`` writes part file ``k`` (see :mod:`.parts`), writer 0
also the series file (results, settings, the virtual dataset over the parts); stacks are dealt
out by their frame numbers. At the series' end every writer closes its part; the main process
passes each part's :class:`PartClosed` on to writer 0 as a :class:`PartDone` (or, for a writer
that died, a :class:`PartDone` without content: writer 0 then reads that part file's chunk
index), and writer 0 closes the series file once it has them all, with the missing frames of
all parts.

:class:`SeriesWriterProcess` is the main process's side: it sends, counts (frames and bytes
saved, rates, how many stacks were waiting), calls ``on_stack_done(handle)`` once for every stack
given to it, once every writer it went to is done with it, whatever happens to the writers, and
reports a writer that died.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

import numpy as np

from tango_dectris_live.receiver.framestack import FrameStackHandle, detach_all
from tango_dectris_live.receiver.stats import RateMeter

from .errors import SavingError, WriterProcessError
from .nexus import NexusSeriesWriter, PartSaved, SeriesFileSpec, SeriesSaved
from .parts import PartLayout, remove_if_empty, reserve_part_files
from .recovery import clear_write_flags

log = logging.getLogger(__name__)

_EXIT_GAVE_UP = 3  # the writer gave a file up after a failed write and exits (see nexus.py)
_PARENT_CHECK = 1.0  # seconds: how often an idle writer looks whether the device process still exists
_MANY_CORES = 4  # automatic_writers(): more cores than this get a second writer


def automatic_writers(cores: int | None = None) -> int:
    """How many writer processes a series gets by default: 1 on machines with up to 4 cores
    (there a second writer takes a core from the receiver and the workers: measured, the
    frames/s through the device do not rise), 2 above (one writer tops out near 100,000 ARINA
    96x96 frames/s; two cover ARINA's 120 kHz with room to spare). ``cores``: default, the CPUs
    this process may run on."""
    if cores is None:
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:  # not on Linux
            cores = os.cpu_count() or 1
    return 1 if cores <= _MANY_CORES else 2


# ---------------------------------------------------------------------------------------------
# Messages


@dataclass(frozen=True)
class OpenSeries:
    """To a writer: the next stacks belong to this series; its file was reserved at ``path``.
    ``part`` None: the series file; ``k``: part file ``k`` of the series file ``series_path``
    (``spec.parts`` names them all)."""

    path: str
    spec: SeriesFileSpec
    part: int | None = None
    series_path: str = ""


@dataclass(frozen=True)
class WriteStack:
    """To a writer: write the frames of ``handle`` (a part writer: those of its part); answered
    by :class:`StackWritten` ``seq``."""

    seq: int
    handle: FrameStackHandle


@dataclass(frozen=True)
class WriteResults:
    """To the series file's writer: overwrite the series' results (buffer name -> array) and its
    map of processed frames."""

    buffers: Mapping[str, np.ndarray]
    frames_done: np.ndarray | None = None


@dataclass(frozen=True)
class ClosePart:
    """To a part writer: the series ended; close the part file (answered by :class:`PartClosed`)."""

    end_reason: str = ""


@dataclass(frozen=True)
class CloseSeries:
    """To the series file's writer: the series ended (``end_reason`` says how); close its file
    (once every part said what it holds, for a series with part files)."""

    end_reason: str = ""


@dataclass(frozen=True)
class PartDone:
    """To the series file's writer: part ``part`` of ``series_path`` is closed and holds
    ``saved``; None: its writer died (its file's write flags are cleared: read it)."""

    series_path: str
    part: int
    saved: PartSaved | None


@dataclass(frozen=True)
class StackWritten:
    """From a writer: it is done with stack ``seq``; ``frames_saved`` of its frames and
    ``bytes_written`` bytes were written; ``frames_flushed``: the frames of its file safe on disk."""

    seq: int
    frames_saved: int
    bytes_written: int
    frames_flushed: int


@dataclass(frozen=True)
class SavingFailed:
    """From a writer: saving stopped or something was not saved (``reason``); ``fatal``: the
    writer process ends (it gave a file up); it is started again for the next series."""

    path: str
    reason: str
    fatal: bool = False


@dataclass(frozen=True)
class PartClosed:
    """From a part writer: its part file of ``series_path`` is closed and holds ``saved``."""

    series_path: str
    saved: PartSaved


WriterAnswer = StackWritten | SavingFailed | SeriesSaved | PartClosed


# ---------------------------------------------------------------------------------------------
# Writer side


class _File:
    """A file a writer process writes (the series file or a part file) and its writer, once created."""

    def __init__(self, message: OpenSeries) -> None:
        self.path = message.path
        self.spec = message.spec
        self.part = message.part
        self.series_path = message.series_path or message.path
        self.writer: NexusSeriesWriter | None = None
        self.failure: str | None = None
        self.end_reason = ""

    @property
    def what(self) -> str:
        return "series file" if self.part is None else f"part file {self.part}"


class _WriterSession:
    """A writer process's state: the series file it writes, if any, its part file, if any, and
    series files waiting for their parts to close."""

    def __init__(self, send: Callable[[WriterAnswer], None], flush_interval: float, check_space: bool) -> None:
        self._send = send
        self._flush_interval = flush_interval
        self._check_space = check_space
        self._series: _File | None = None
        self._part: _File | None = None
        self._closing: dict[str, _File] = {}  # series files waiting for PartDone of every part
        self._parts_done: dict[str, dict[int, PartSaved | None]] = {}
        self.gave_up = False

    def _files(self) -> Iterator[_File]:
        yield from (file for file in (self._series, self._part) if file is not None)
        yield from self._closing.values()

    def serve(self, tasks: multiprocessing.Queue) -> None:
        parent = multiprocessing.parent_process()
        while not self.gave_up:
            writing = any(file.writer is not None for file in self._files())
            try:
                message = tasks.get(timeout=self._flush_interval if writing else _PARENT_CHECK)
            except queue.Empty:
                if parent is not None and not parent.is_alive():
                    # the device process died: nobody will close the series, so close it now
                    self.stop("the device process ended")
                    return
                for file in self._files():
                    if file.writer is not None:
                        file.writer.flush()  # idle for a flush interval: make the last frames safe
                self._check_given_up()
                continue
            match message:
                case None:
                    self.stop("writer process stopped")
                    return
                case OpenSeries():
                    self.open_file(message)
                case WriteStack():
                    self.write_stack(message)
                case WriteResults():
                    self.write_results(message)
                case ClosePart():
                    self.close_part(message.end_reason)
                case CloseSeries():
                    self.close_series(message.end_reason)
                case PartDone():
                    self.part_done(message)
                case unknown:
                    raise TypeError(f"the writer process got {type(unknown).__name__}, not a writer message")

    def stop(self, reason: str) -> None:
        """Close everything: the part file, the series file, and series files still waiting for
        parts (those parts' files tell what they hold)."""
        self.close_part(reason)
        self.close_series(reason)
        for path in list(self._closing):
            self._finish_series(path)

    def open_file(self, message: OpenSeries) -> None:
        if message.part is None:
            if self._series is not None:
                self.close_series("superseded by the next series")
            self._series = file = _File(message)
        else:
            if self._part is not None:
                self.close_part("superseded by the next series")
            self._part = file = _File(message)
        if message.spec.complete:
            self._create(file)

    def _create(self, file: _File) -> None:
        try:
            file.writer = NexusSeriesWriter(file.path, file.spec, flush_interval=self._flush_interval,
                                            check_space=self._check_space, part=file.part)
        except (SavingError, OSError, ValueError) as error:  # h5py refuses a layout with ValueError
            self._fail(file, f"cannot create the {file.what}: {error}")

    def write_stack(self, message: WriteStack) -> None:
        saved = nbytes = 0
        file = self._part if self._part is not None else self._series
        writer = None
        if file is not None:
            if file.writer is None and file.failure is None:
                try:
                    spec = file.spec.with_geometry_of(message.handle)
                except (ValueError, FileNotFoundError) as error:
                    self._fail(file, f"cannot read the first stack's geometry: {error}")
                else:
                    file.spec = spec
                    self._create(file)
            writer = file.writer
        if writer is not None:
            was_stopped, before = writer.stopped, writer.bytes_written
            try:
                saved = writer.write_stack(message.handle)
            except Exception as error:  # e.g. the receiver's segment is gone: reported, the next stacks go on
                self._send(SavingFailed(file.path, f"frames {message.handle.first_frame}..{message.handle.last_frame} "
                                                   f"not saved: {type(error).__name__}: {error}"))
            nbytes = writer.bytes_written - before
            if writer.stopped and not was_stopped and not writer.abandoned:
                self._send(SavingFailed(file.path, writer.stopped_reason))
        self._send(StackWritten(message.seq, saved, nbytes, writer.frames_flushed if writer else 0))
        self._check_given_up()

    def write_results(self, message: WriteResults) -> None:
        file = self._series
        if file is None or file.writer is None:
            return  # no file (yet): the next refresh or the final results come again
        try:
            file.writer.write_results(message.buffers, message.frames_done)
        except SavingError as error:
            self._send(SavingFailed(file.path, f"results not saved: {error}"))
        self._check_given_up()

    def close_part(self, end_reason: str) -> None:
        file, self._part = self._part, None
        if file is None:
            return
        if file.writer is not None:
            saved = file.writer.close_part()
            if file.writer.abandoned:
                return  # given up: this process exits, and the part's file says what it holds
        else:
            remove_if_empty(file.path)
            n_frames = file.spec.n_frames or 0
            saved = PartSaved(path=file.path, part=file.part, written=np.packbits(np.zeros(n_frames, dtype=bool)),
                              n_frames=n_frames, frames_saved=0, frames_refused=0, bytes_written=0,
                              stopped_reason=file.failure or f"no part file written ({end_reason})")
        self._send(PartClosed(file.series_path, saved))
        self.part_done(PartDone(file.series_path, file.part, saved))
        detach_all()  # the receiver may be gone before the next series

    def part_done(self, message: PartDone) -> None:
        """A part of a series file of this writer is closed (or its writer died)."""
        path = message.series_path
        if path not in self._closing and (self._series is None or self._series.path != path):
            return  # not a series file of this writer (a part of a series whose writer was replaced)
        done = self._parts_done.setdefault(path, {})
        if done.get(message.part) is None:
            done[message.part] = message.saved
        if path in self._closing and len(done) >= self._closing[path].spec.parts.count:
            self._finish_series(path)

    def close_series(self, end_reason: str) -> None:
        file, self._series = self._series, None
        if file is None:
            return
        file.end_reason = end_reason
        self._closing[file.path] = file
        if file.writer is None or file.spec.parts is None or \
                len(self._parts_done.get(file.path, {})) >= file.spec.parts.count:
            self._finish_series(file.path)

    def _finish_series(self, path: str) -> None:
        file = self._closing.pop(path)
        done = self._parts_done.pop(path, {})
        if file.writer is not None:
            parts = [done.get(part) for part in range(file.spec.parts.count)] if file.spec.parts is not None else []
            saved = file.writer.close(file.end_reason, parts)
        else:
            # the file could not be created, or no stack came and the header left the geometry unknown
            reason = file.failure or "no frame arrived and the frame geometry was unknown: no file written"
            remove_if_empty(file.path)
            saved = SeriesSaved(path=file.path, series_id=file.spec.series_id, frames_saved=0,
                                frames_missing=file.spec.n_frames or 0, frames_refused=0, bytes_written=0,
                                seconds=0.0, complete=False, stopped_reason=reason)
        self._send(saved)
        detach_all()  # the receiver may be gone before the next series

    def _fail(self, file: _File, reason: str) -> None:
        file.failure = reason
        self._send(SavingFailed(file.path, reason))

    def _check_given_up(self) -> None:
        """After a failed write HDF5 cannot be trusted in this process: report, then exit."""
        for file in list(self._files()):
            if self.gave_up or file.writer is None or not file.writer.abandoned:
                continue
            self.gave_up = True
            self._send(SavingFailed(file.path, file.writer.stopped_reason, fatal=True))
            if file.part is None:
                self._send(file.writer.close())
            # a part: the main process tells the series file's writer once this process is gone


def _writer_main(tasks: multiprocessing.Queue, answers: Connection, flush_interval: float, check_space: bool) -> None:
    """A writer process: messages in, answers out, until ``None``."""
    # A file-size limit must be an error the writer reports (EFBIG), not a signal that kills it.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    def send(answer: WriterAnswer) -> None:
        try:
            answers.send(answer)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the device process is gone: nobody is left to tell

    session = _WriterSession(send, flush_interval, check_space)
    session.serve(tasks)
    if session.gave_up:
        answers.close()
        # no HDF5 teardown: closing the library with the given-up file open may crash
        os._exit(_EXIT_GAVE_UP)
    detach_all()
    answers.close()


# ---------------------------------------------------------------------------------------------
# Main side


@dataclass(frozen=True)
class SavingStatus:
    """Where saving stands, for the device's ``saving_status``, ``frames_saved``, ``saving_rate``.

    ``state``: ``idle`` (no series yet), ``writing``, ``closing``, ``saved`` (the last series'
    file is closed), ``failed`` (saving stopped or a writer died: ``message`` says why).
    Counters are the current (or last) series'. ``backlog``: stacks given to the writers and not
    written yet; ``max_backlog`` its highest value in the series; ``backlogged_stacks``: stacks
    that came while a writer they went to was still busy with an earlier one. ``writers``: the
    writer processes of the current (or last) series."""

    state: str
    message: str
    path: str = ""
    series_id: int | None = None
    frames_saved: int = 0
    bytes_written: int = 0
    frames_per_second: float = 0.0
    megabytes_per_second: float = 0.0
    backlog: int = 0
    max_backlog: int = 0
    backlogged_stacks: int = 0
    series_saved: int = 0
    last: SeriesSaved | None = None
    writers: int = 1


@dataclass
class _Link:
    """One writer process and its pipes."""

    index: int
    process: Any
    tasks: Any
    answers: Connection
    collector: threading.Thread | None = None
    seqs: set[int] = field(default_factory=set)  # stacks given and not answered yet
    fatal_reason: str | None = None
    frames_flushed: int = 0  # of its file of the open series, as the writer last said
    open_paths: set[str] = field(default_factory=set)  # files it has open (write flags to clear if it dies)
    part_of: str | None = None  # the series file whose part file it has open

    @property
    def usable(self) -> bool:
        return self.fatal_reason is None and self.process.is_alive()


@dataclass
class _Pending:
    """A stack given to the writers in ``waiting`` (their indices), not answered by all yet."""

    handle: FrameStackHandle
    waiting: set[int]


@dataclass
class _Series:
    """The series opened last: its file, its part files (several writers) and where it stands."""

    path: str
    spec: SeriesFileSpec
    first_seq: int  # answers to earlier stacks do not count for this series
    writers: int
    part_paths: tuple[Path, ...] = ()
    layout: PartLayout | None = None  # known once sent (from the first stack)
    sent: bool = False  # OpenSeries sent to the writers
    open: bool = True  # close_series not called yet


class SeriesWriterProcess:
    """The main process's side of the writer processes (thread-safe).

    ``writers``: how many processes write the frames of a series (see the module docstring);
    settable, for the series opened next. A series whose length is unknown, or without frames,
    gets one.

    ``on_stack_done(handle)`` is called exactly once for every handle given to
    :meth:`write_stack`: when every writer it went to has written it, or died without. Give the
    shared-memory slot back when both this and the processing are done with it.
    ``on_answer(answer)`` sees every :class:`SavingFailed` and :class:`SeriesSaved`. Both are
    called from a collector thread; they must be quick and must not call :meth:`close`.
    """

    def __init__(self, *, on_stack_done: Callable[[FrameStackHandle], None] | None = None,
                 on_answer: Callable[[WriterAnswer], None] | None = None, flush_interval: float = 1.0,
                 check_space: bool = True, start_method: str = "spawn", rate_window: float = 2.0,
                 writers: int = 1) -> None:
        if not flush_interval > 0:
            raise ValueError(f"flush_interval must be a positive number of seconds, got {flush_interval!r}")
        self._writers = _checked_writers(writers)
        self._context = multiprocessing.get_context(start_method)
        self._on_stack_done = on_stack_done or (lambda handle: None)
        self._on_answer = on_answer or (lambda answer: None)
        self._flush_interval = float(flush_interval)
        self._check_space = check_space
        self._lock = threading.Condition()
        self._next_seq = 0
        self._links: list[_Link | None] = [None] * self._writers
        self._pending: dict[int, _Pending] = {}
        self._series: _Series | None = None
        self._closed = False
        self._frame_rate = RateMeter(rate_window)
        self._byte_rate = RateMeter(rate_window)
        self._series_saved_event = threading.Event()
        self._status = SavingStatus(state="idle", message="no series saved yet", writers=self._writers)
        for index in range(self._writers):
            self._start(index)

    # ---- process lifecycle ---------------------------------------------------------------------

    def _start(self, index: int) -> None:
        tasks = answers = child_end = process = None
        try:
            tasks = self._context.Queue()
            answers, child_end = self._context.Pipe(duplex=False)
            process = self._context.Process(target=_writer_main,
                                            args=(tasks, child_end, self._flush_interval, self._check_space),
                                            name=f"tango-dectris-live-writer{index or ''}", daemon=True)
            process.start()
        except OSError as error:
            for end in (answers, child_end):
                if end is not None:
                    end.close()
            if tasks is not None:
                tasks.close()
                tasks.join_thread()
            raise WriterProcessError(f"could not start the writer process: {error.strerror or error}") from error
        child_end.close()  # the child's end: the parent keeps only its own, so EOF means the child is gone
        link = _Link(index=index, process=process, tasks=tasks, answers=answers)
        link.collector = threading.Thread(target=self._collect, args=(link,), name=f"saving-collector{index or ''}",
                                          daemon=True)
        with self._lock:
            while len(self._links) <= index:
                self._links.append(None)
            self._links[index] = link
        link.collector.start()

    @property
    def writers(self) -> int:
        """Writer processes for the series opened next (1: the frames go into the series file)."""
        return self._writers

    @writers.setter
    def writers(self, count: int) -> None:
        count = _checked_writers(count)
        with self._lock:
            self._writers = count
            if self._closed:
                return
            missing = [index for index in range(count) if self._link(index) is None]
        for index in missing:  # now, not on the next series' path (a dead one is replaced there)
            self._start(index)

    @property
    def alive(self) -> bool:
        """Whether the (first) writer process is running (one is started again by :meth:`open_series`)."""
        link = self._link(0)
        return link is not None and link.process.is_alive()

    @property
    def pid(self) -> int | None:
        """The first writer process's (it writes the series file)."""
        link = self._link(0)
        return link.process.pid if link is not None else None

    @property
    def pids(self) -> list[int | None]:
        """Every writer process's, by index (None where none runs)."""
        with self._lock:
            return [link.process.pid if link is not None else None for link in self._links]

    def _link(self, index: int) -> _Link | None:
        links = self._links
        return links[index] if index < len(links) else None

    def close(self, timeout: float = 10.0) -> None:
        """Close the open series' files and stop the writers (idempotent); a writer that does not
        exit within ``timeout`` seconds is killed (its file then opens as a killed writer's)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            links = [link for link in self._links if link is not None]
            if self._series is not None:
                self._series.open = False
        for link in links:
            try:
                link.tasks.put(None)
            except (OSError, ValueError):
                pass  # the queue is already closed: the process is gone
        for link in links:
            _stop(link, timeout)
            link.tasks.close()
            link.tasks.join_thread()

    def __enter__(self) -> SeriesWriterProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ---- series ------------------------------------------------------------------------------

    def open_series(self, path: str | os.PathLike, spec: SeriesFileSpec) -> None:
        """Start writing the series file at ``path`` (reserved with
        :meth:`~.paths.SavingLocation.reserve`); starts new writer processes where the last ones
        died. With several writers, reserves the part files beside it (``<name>_part<k>.h5``)."""
        with self._lock:
            if self._closed:
                raise WriterProcessError("the writer process was closed; create a new SeriesWriterProcess")
            writers = self._writers if spec.n_frames else 1  # parts need the series' length
            links = [self._link(index) for index in range(writers)]
        for index, link in enumerate(links):
            if link is not None and not link.usable:
                # a writer that gave up exits at once; let the collector finish with its stacks and file
                _stop(link, 10.0)
                link = None
            if link is None or self._link(index) is None:
                self._start(index)
        part_paths: tuple[Path, ...] = ()
        if writers > 1:
            try:
                part_paths = reserve_part_files(path, writers)
            except (SavingError, OSError) as error:
                log.warning("series %s: its frames go into the series file (one writer): %s", path, error)
                writers = 1
        with self._lock:
            previous = self._series
            if previous is not None and previous.open and not previous.sent:
                self._send_open(previous, None)  # never began: its writer closes it as superseded
            self._series = _Series(path=str(path), spec=spec, first_seq=self._next_seq, writers=writers,
                                   part_paths=part_paths)
            self._series_saved_event.clear()
            self._frame_rate.reset()
            self._byte_rate.reset()
            self._status = SavingStatus(state="writing", message=f"writing {path}", path=str(path),
                                        series_id=spec.series_id, series_saved=self._status.series_saved,
                                        last=self._status.last, writers=writers)
            if writers == 1:
                self._send_open(self._series, None)
            # several writers: the part layout takes its block from the first stack (sent then)

    def _send_open(self, series: _Series, handle: FrameStackHandle | None) -> None:
        """Under the lock: open the series' files in the writers (with ``handle``: the first
        stack, whose geometry and frame-stack size set the part layout; None: no part files)."""
        series.sent = True
        first = self._link(0)
        spec = series.spec
        if first is None or not first.usable:  # died since open_series: nothing will write this series
            for path in (series.path, *series.part_paths):
                remove_if_empty(path)
            self._series_done(SeriesSaved(path=series.path, series_id=spec.series_id, frames_saved=0,
                                          frames_missing=spec.n_frames or 0, frames_refused=0, bytes_written=0,
                                          seconds=0.0, complete=False, file_closed=True,
                                          stopped_reason="the writer process ended before the series began"))
            return
        if series.writers > 1 and handle is not None and not spec.complete:
            try:
                spec = spec.with_geometry_of(handle)
            except (ValueError, FileNotFoundError) as error:
                log.warning("series %s: its first stack's geometry is unreadable (%s): one writer", series.path, error)
                handle = None
        if series.writers == 1 or handle is None:
            for part_path in series.part_paths:
                remove_if_empty(part_path)
            series.writers, series.part_paths = 1, ()
            self._status = _replace(self._status, writers=1)
            first.open_paths.add(series.path)
            first.tasks.put(OpenSeries(series.path, spec))
            return
        layout = PartLayout(series_file=Path(series.path).name, files=tuple(p.name for p in series.part_paths),
                            block=int(handle.layout.frame_stack_size))
        spec = replace(spec, parts=layout)
        series.spec, series.layout = spec, layout
        first.open_paths.add(series.path)
        first.tasks.put(OpenSeries(series.path, spec))
        for part, part_path in enumerate(series.part_paths):
            link = self._links[part]
            link.open_paths.add(str(part_path))
            link.part_of = series.path
            link.tasks.put(OpenSeries(str(part_path), spec, part=part, series_path=series.path))

    def write_stack(self, handle: FrameStackHandle) -> int:
        """Queue ``handle``'s frames for writing (returns at once); its sequence number.
        Raises :class:`WriterProcessError` when no series is open or a writer it needs died: then
        the caller keeps the stack (``on_stack_done`` is not called for it)."""
        with self._lock:
            series = self._series
            if series is None or not series.open:
                raise WriterProcessError("no series file is open: call open_series first")
            needed = range(series.writers) if not series.sent else (
                [0] if series.layout is None else series.layout.owners(handle.first_frame, handle.last_frame))
            for index in needed:
                link = self._link(index)
                if link is None or not link.usable:
                    raise WriterProcessError(f"the writer process{_which(index, series.writers)} is not running "
                                             f"({self._status.message}); it starts again with the next series")
            if not series.sent:
                self._send_open(series, handle)
                needed = [0] if series.layout is None else series.layout.owners(handle.first_frame, handle.last_frame)
            links = [self._links[index] for index in needed]
            busy = any(link.seqs for link in links)
            seq = self._next_seq
            self._next_seq += 1
            self._pending[seq] = _Pending(handle, set(needed))
            status = self._status
            self._status = _replace(status, backlog=len(self._pending),
                                    max_backlog=max(status.max_backlog, len(self._pending)),
                                    backlogged_stacks=status.backlogged_stacks + busy)
            for link in links:
                link.seqs.add(seq)
                link.tasks.put(WriteStack(seq, handle))
        return seq

    def write_results(self, buffers: Mapping[str, np.ndarray], frames_done: np.ndarray | None = None) -> None:
        """Queue the series' results to overwrite those in the file. The arrays are pickled
        later by the queue's thread: pass arrays nobody changes any more (a ResultSnapshot's)."""
        with self._lock:
            first = self._link(0)
            if self._series is not None and self._series.open and first is not None and first.fatal_reason is None:
                first.tasks.put(WriteResults(dict(buffers), frames_done))

    def close_series(self, end_reason: str = "") -> None:
        """The series ended: the writers write what is queued, then close the files;
        :meth:`wait_series_saved` tells what the series file holds."""
        with self._lock:
            series = self._series
            if series is None or not series.open:
                return
            series.open = False
            if self._status.state == "writing":
                self._status = _replace(self._status, state="closing", message=f"closing {series.path}")
            if not series.sent:
                self._send_open(series, None)
            if series.layout is not None:
                for part in range(series.writers):
                    link = self._link(part)
                    if link is not None and link.usable and link.part_of == series.path:
                        link.tasks.put(ClosePart(end_reason))
            first = self._link(0)
            if first is not None and first.usable:
                first.tasks.put(CloseSeries(end_reason))

    def wait_series_saved(self, timeout: float | None = None) -> SeriesSaved:
        """What the last series' file holds, once it is closed (or given up); TimeoutError when
        it is not within ``timeout`` seconds."""
        if not self._series_saved_event.wait(timeout):
            raise TimeoutError(f"the series file is not closed after {timeout} s ({self.status().message})")
        return self._status.last

    def wait_stacks_done(self, timeout: float | None = None) -> bool:
        """True once every stack given to :meth:`write_stack` is done; False after ``timeout``."""
        with self._lock:
            return self._lock.wait_for(lambda: not self._pending, timeout)

    def status(self) -> SavingStatus:
        with self._lock:
            return _replace(self._status, frames_per_second=self._frame_rate.rate(),
                            megabytes_per_second=self._byte_rate.rate() / 1e6)

    # ---- answers (collector threads) ---------------------------------------------------------

    def _collect(self, link: _Link) -> None:
        while True:
            ready = wait([link.answers, link.process.sentinel])
            if link.answers in ready:
                try:
                    answer = link.answers.recv()
                except EOFError:
                    break  # the writer closed its end: it is exiting
                except (OSError, ValueError) as error:  # pragma: no cover - a broken pipe mid-message
                    log.warning("writer answers unreadable: %s", error)
                    break
                self._take(link, answer)
                continue
            break
        link.process.join()
        self._writer_ended(link)

    def _take(self, link: _Link, answer: WriterAnswer) -> None:
        handle = None
        with self._lock:
            if isinstance(answer, StackWritten):
                link.seqs.discard(answer.seq)
                pending = self._pending.get(answer.seq)
                if pending is not None:
                    pending.waiting.discard(link.index)
                    if not pending.waiting:
                        del self._pending[answer.seq]
                        handle = pending.handle
                status = self._status
                if self._series is not None and answer.seq >= self._series.first_seq:
                    link.frames_flushed = answer.frames_flushed
                    frames = status.frames_saved + answer.frames_saved
                    nbytes = status.bytes_written + answer.bytes_written
                    now = time.monotonic()
                    self._frame_rate.add(frames, now)
                    self._byte_rate.add(nbytes, now)
                    status = _replace(status, frames_saved=frames, bytes_written=nbytes)
                self._status = _replace(status, backlog=len(self._pending))
                self._lock.notify_all()
            elif isinstance(answer, SavingFailed):
                if answer.fatal:
                    link.fatal_reason = answer.reason
                self._status = _replace(self._status, state="failed", message=f"saving failed: {answer.reason}")
            elif isinstance(answer, PartClosed):
                link.open_paths.discard(answer.saved.path)
                link.frames_flushed = 0
                if link.part_of == answer.series_path:
                    link.part_of = None
                if link.index != 0:  # the first writer knows its own part's
                    self._to_series_writer(PartDone(answer.series_path, answer.saved.part, answer.saved))
            elif isinstance(answer, SeriesSaved):
                if answer.file_closed:
                    link.open_paths.discard(answer.path)
                link.frames_flushed = 0
                self._series_done(answer)
        if handle is not None:
            self._on_stack_done(handle)
        elif isinstance(answer, (SavingFailed, SeriesSaved)):
            self._on_answer(answer)

    def _to_series_writer(self, message: PartDone) -> None:
        """Under the lock: tell the first writer (it closes series files) about a part."""
        first = self._link(0)
        if first is not None and first.usable:
            first.tasks.put(message)

    def _series_done(self, saved: SeriesSaved) -> None:
        """Under the lock: a series' file is closed or given up."""
        self._status = _replace(self._status, series_saved=self._status.series_saved + 1, last=saved)
        if self._series is None or saved.path != self._series.path:
            return  # an earlier series, closed after the next one was opened
        failed = saved.stopped_reason is not None
        message = (f"saved {saved.path}: {saved.frames_saved} frames, {saved.bytes_written / 1e6:.1f} MB"
                   if not failed else f"saving stopped: {saved.stopped_reason}; {saved.path} holds "
                                      f"{saved.frames_saved} frames")
        self._status = _replace(self._status, state="failed" if failed else "saved", message=message,
                                frames_saved=saved.frames_saved)
        self._series_saved_event.set()

    def _writer_ended(self, link: _Link) -> None:
        """A writer process is gone: give back its stacks, make its open files readable, and tell
        the series file's writer that the part it wrote says itself what it holds."""
        code = link.process.exitcode
        released: list[FrameStackHandle] = []
        answers: list[WriterAnswer] = []
        with self._lock:
            for seq in sorted(link.seqs):
                pending = self._pending.get(seq)
                if pending is not None:
                    pending.waiting.discard(link.index)
                    if not pending.waiting:
                        del self._pending[seq]
                        released.append(pending.handle)
            link.seqs.clear()
            if self._link(link.index) is link:
                self._links[link.index] = None
            paths = sorted(link.open_paths)
            link.open_paths.clear()
            if not (self._closed and code == 0):
                series = self._series
                writers = series.writers if series is not None else self._writers
                reason = link.fatal_reason or (f"the writer process{_which(link.index, writers)} ended unexpectedly "
                                               f"(exit code {code})")
                note = "; ".join(_clear_flags_note(p) for p in paths)
                if series is not None and series.path in paths and not self._series_saved_event.is_set():
                    flushed = link.frames_flushed + sum(other.frames_flushed for other in self._links
                                                        if other is not None and other is not link)
                    last = self._status
                    saved = SeriesSaved(path=series.path, series_id=series.spec.series_id, frames_saved=flushed,
                                        frames_missing=0, frames_refused=0, bytes_written=last.bytes_written,
                                        seconds=0.0, complete=False, stopped_reason=reason, file_closed=False,
                                        notes=("frames written before the writers' last flush are in the files",
                                               note))
                    self._series_done(saved)
                    answers.append(saved)
                self._status = _replace(self._status, state="failed", backlog=len(self._pending),
                                        message=f"saving failed: {reason}" + (f"; {note}" if note else ""))
                if link.fatal_reason is None:
                    path = series.path if series is not None and series.path in paths else (paths or [""])[0]
                    answers.insert(0, SavingFailed(path, reason, fatal=True))
            if link.part_of is not None and link.index != 0:
                # after its write flags were cleared: the series file's writer reads what it holds
                self._to_series_writer(PartDone(link.part_of, link.index, None))
                link.part_of = None
            self._lock.notify_all()
        for handle in released:
            self._on_stack_done(handle)
        for answer in answers:
            self._on_answer(answer)
        link.tasks.close()
        link.answers.close()


def _checked_writers(count: int) -> int:
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 1:
        raise ValueError(f"writers must be a whole number of processes, at least 1, got {count!r}")
    return int(count)


def _which(index: int, writers: int) -> str:
    return f" {index + 1} of {writers}" if writers > 1 else ""


def _stop(link: _Link, timeout: float) -> None:
    """Wait for the writer process to end (killed after ``timeout``) and its collector to finish;
    only the collector joins the process (two threads reaping one child lose its exit code)."""
    link.collector.join(timeout)
    if link.collector.is_alive():
        link.process.kill()
        link.collector.join()


def _clear_flags_note(path: str) -> str:
    try:
        if not Path(path).exists() or os.path.getsize(path) == 0:
            return f"no file was written at {path}"
        clear_write_flags(path)
        return f"{path} opens normally (write flags cleared)"
    except (SavingError, OSError) as error:
        return f"{path} needs h5py.File(path, 'r', swmr=True) to open ({error})"


def _replace(status: SavingStatus, **changes: Any) -> SavingStatus:
    return replace(status, **changes)
