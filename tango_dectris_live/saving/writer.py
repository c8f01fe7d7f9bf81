"""The writer process: series files written beside the processing, never in its way.

h5py holds the GIL and one global lock while it works, so the files are written in a process of
their own (spawned once, started again after it died), fed through a queue. The main process and
the writer talk in the messages below (frozen dataclasses, pickled):

* to the writer: :class:`OpenSeries`, :class:`WriteStack`, :class:`WriteResults`,
  :class:`CloseSeries`, and ``None`` to stop;
* back: one :class:`StackWritten` for every :class:`WriteStack` (then the writer is done with the
  stack's shared-memory slot), :class:`SavingFailed` when saving stops or something was not
  saved, and one :class:`~.nexus.SeriesSaved` per series.

:class:`SeriesWriterProcess` is the main process's side: it sends, counts (frames and bytes
saved, rates, how many stacks were waiting), calls ``on_stack_done(handle)`` once for every stack
given to it, whatever happens to the writer, and reports a writer that died.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import signal
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

import numpy as np

from tango_dectris_live.receiver.framestack import FrameStackHandle, detach_all
from tango_dectris_live.receiver.stats import RateMeter

from .errors import SavingError, WriterProcessError
from .nexus import NexusSeriesWriter, SeriesFileSpec, SeriesSaved
from .recovery import clear_write_flags

log = logging.getLogger(__name__)

_EXIT_GAVE_UP = 3  # the writer gave a file up after a failed write and exits (see nexus.py)
_PARENT_CHECK = 1.0  # seconds: how often an idle writer looks whether the device process still exists


# ---------------------------------------------------------------------------------------------
# Messages


@dataclass(frozen=True)
class OpenSeries:
    """To the writer: the next stacks belong to this series; its file was reserved at ``path``."""

    path: str
    spec: SeriesFileSpec


@dataclass(frozen=True)
class WriteStack:
    """To the writer: write the frames of ``handle``; answered by :class:`StackWritten` ``seq``."""

    seq: int
    handle: FrameStackHandle


@dataclass(frozen=True)
class WriteResults:
    """To the writer: overwrite the series' results (buffer name -> array) and its map of
    processed frames."""

    buffers: Mapping[str, np.ndarray]
    frames_done: np.ndarray | None = None


@dataclass(frozen=True)
class CloseSeries:
    """To the writer: the series ended (``end_reason`` says how); close its file."""

    end_reason: str = ""


@dataclass(frozen=True)
class StackWritten:
    """From the writer: it is done with stack ``seq``; ``frames_saved`` of its frames and
    ``bytes_written`` bytes were written; ``frames_flushed``: the series' frames safe on disk."""

    seq: int
    frames_saved: int
    bytes_written: int
    frames_flushed: int


@dataclass(frozen=True)
class SavingFailed:
    """From the writer: saving stopped or something was not saved (``reason``); ``fatal``: the
    writer process ends (it gave a file up); it is started again for the next series."""

    path: str
    reason: str
    fatal: bool = False


WriterAnswer = StackWritten | SavingFailed | SeriesSaved


# ---------------------------------------------------------------------------------------------
# Writer side


class _WriterSession:
    """The writer process's state: the series file being written, if any."""

    def __init__(self, send: Callable[[WriterAnswer], None], flush_interval: float, check_space: bool) -> None:
        self._send = send
        self._flush_interval = flush_interval
        self._check_space = check_space
        self._path: str | None = None
        self._spec: SeriesFileSpec | None = None
        self._writer: NexusSeriesWriter | None = None
        self._failure: str | None = None
        self.gave_up = False

    @property
    def open(self) -> bool:
        return self._path is not None

    def serve(self, tasks: multiprocessing.Queue) -> None:
        parent = multiprocessing.parent_process()
        while not self.gave_up:
            try:
                message = tasks.get(timeout=self._flush_interval if self._writer is not None else _PARENT_CHECK)
            except queue.Empty:
                if parent is not None and not parent.is_alive():
                    # the device process died: nobody will close the series, so close it now
                    self.close_series("the device process ended")
                    return
                if self._writer is not None:
                    self._writer.flush()  # idle for a flush interval: make the last frames safe
                    self._check_given_up()
                continue
            match message:
                case None:
                    self.close_series("writer process stopped")
                    return
                case OpenSeries():
                    self.open_series(message)
                case WriteStack():
                    self.write_stack(message)
                case WriteResults():
                    self.write_results(message)
                case CloseSeries():
                    self.close_series(message.end_reason)
                case unknown:
                    raise TypeError(f"the writer process got {type(unknown).__name__}, not a writer message")

    def open_series(self, message: OpenSeries) -> None:
        if self.open:
            self.close_series("superseded by the next series")
        self._path, self._spec, self._failure = message.path, message.spec, None
        if message.spec.complete:
            self._create(message.spec)

    def _create(self, spec: SeriesFileSpec) -> None:
        try:
            self._writer = NexusSeriesWriter(self._path, spec, flush_interval=self._flush_interval,
                                             check_space=self._check_space)
        except (SavingError, OSError) as error:
            self._fail(f"cannot create the series file: {error}")

    def write_stack(self, message: WriteStack) -> None:
        saved = nbytes = 0
        if self.open and self._writer is None and self._failure is None:
            try:
                spec = self._spec.with_geometry_of(message.handle)
            except (ValueError, FileNotFoundError) as error:
                self._fail(f"cannot read the first stack's geometry: {error}")
            else:
                self._create(spec)
        writer = self._writer
        if writer is not None:
            was_stopped, before = writer.stopped, writer.bytes_written
            try:
                saved = writer.write_stack(message.handle)
            except Exception as error:  # e.g. the receiver's segment is gone: reported, the next stacks go on
                self._send(SavingFailed(self._path, f"frames {message.handle.first_frame}..{message.handle.last_frame} "
                                                    f"not saved: {type(error).__name__}: {error}"))
            nbytes = writer.bytes_written - before
            if writer.stopped and not was_stopped and not writer.abandoned:
                self._send(SavingFailed(self._path, writer.stopped_reason))
        self._send(StackWritten(message.seq, saved, nbytes, writer.frames_flushed if writer else 0))
        self._check_given_up()

    def write_results(self, message: WriteResults) -> None:
        if self._writer is None:
            return  # no file (yet): the next refresh or the final results come again
        try:
            self._writer.write_results(message.buffers, message.frames_done)
        except SavingError as error:
            self._send(SavingFailed(self._path, f"results not saved: {error}"))
        self._check_given_up()

    def close_series(self, end_reason: str) -> None:
        if not self.open:
            return
        if self._writer is not None:
            saved = self._writer.close(end_reason)
        else:
            # the file could not be created, or no stack came and the header left the geometry unknown
            reason = self._failure or "no frame arrived and the frame geometry was unknown: no file written"
            _remove_placeholder(self._path)
            saved = SeriesSaved(path=self._path, series_id=self._spec.series_id, frames_saved=0,
                                frames_missing=self._spec.n_frames or 0, frames_refused=0, bytes_written=0,
                                seconds=0.0, complete=False, stopped_reason=reason)
        self._send(saved)
        self._path = self._spec = self._writer = self._failure = None
        detach_all()  # the receiver may be gone before the next series

    def _fail(self, reason: str) -> None:
        self._failure = reason
        self._send(SavingFailed(self._path, reason))

    def _check_given_up(self) -> None:
        """After a failed write HDF5 cannot be trusted in this process: report, then exit."""
        if self._writer is not None and self._writer.abandoned and not self.gave_up:
            self.gave_up = True
            self._send(SavingFailed(self._path, self._writer.stopped_reason, fatal=True))
            self._send(self._writer.close())


def _remove_placeholder(path: str) -> None:
    try:
        if os.path.getsize(path) == 0:
            os.unlink(path)
    except OSError:
        pass  # already gone, or not ours to remove


def _writer_main(tasks: multiprocessing.Queue, answers: Connection, flush_interval: float, check_space: bool) -> None:
    """The writer process: messages in, answers out, until ``None``."""
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
    file is closed), ``failed`` (saving stopped or the writer died: ``message`` says why).
    Counters are the current (or last) series'. ``backlog``: stacks given to the writer and not
    written yet; ``max_backlog`` its highest value in the series; ``backlogged_stacks``: stacks
    that came while the writer was still busy with an earlier one."""

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


@dataclass
class _Link:
    """One writer process and its pipes."""

    process: Any
    tasks: Any
    answers: Connection
    collector: threading.Thread | None = None
    outstanding: dict[int, FrameStackHandle] = field(default_factory=dict)
    fatal_reason: str | None = None
    frames_flushed: int = 0  # of the open series, as the writer last said


class SeriesWriterProcess:
    """The main process's side of the writer process (thread-safe).

    ``on_stack_done(handle)`` is called exactly once for every handle given to
    :meth:`write_stack`: when the writer has written it, or when the writer died without. Give
    the shared-memory slot back when both this and the processing are done with it.
    ``on_answer(answer)`` sees every :class:`SavingFailed` and :class:`SeriesSaved`. Both are
    called from a collector thread; they must be quick and must not call :meth:`close`.
    """

    def __init__(self, *, on_stack_done: Callable[[FrameStackHandle], None] | None = None,
                 on_answer: Callable[[WriterAnswer], None] | None = None, flush_interval: float = 1.0,
                 check_space: bool = True, start_method: str = "spawn", rate_window: float = 2.0) -> None:
        if not flush_interval > 0:
            raise ValueError(f"flush_interval must be a positive number of seconds, got {flush_interval!r}")
        self._context = multiprocessing.get_context(start_method)
        self._on_stack_done = on_stack_done or (lambda handle: None)
        self._on_answer = on_answer or (lambda answer: None)
        self._flush_interval = float(flush_interval)
        self._check_space = check_space
        self._lock = threading.Condition()
        self._next_seq = 0
        self._series_first_seq = 0  # answers to earlier stacks do not count for this series
        self._link: _Link | None = None
        self._closed = False
        self._frame_rate = RateMeter(rate_window)
        self._byte_rate = RateMeter(rate_window)
        self._series_saved_event = threading.Event()
        self._status = SavingStatus(state="idle", message="no series saved yet")
        self._series_open = False
        self._current_path: str | None = None  # the file of the series opened last
        self._open_paths: set[str] = set()  # files the writer has open (write flags to clear if it dies)
        self._start()

    # ---- process lifecycle ---------------------------------------------------------------------

    def _start(self) -> None:
        tasks = answers = child_end = process = None
        try:
            tasks = self._context.Queue()
            answers, child_end = self._context.Pipe(duplex=False)
            process = self._context.Process(target=_writer_main,
                                            args=(tasks, child_end, self._flush_interval, self._check_space),
                                            name="tango-dectris-live-writer", daemon=True)
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
        link = _Link(process=process, tasks=tasks, answers=answers)
        link.collector = threading.Thread(target=self._collect, args=(link,), name="saving-collector", daemon=True)
        with self._lock:
            self._link = link
        link.collector.start()

    @property
    def alive(self) -> bool:
        """Whether a writer process is running (one is started again by :meth:`open_series`)."""
        link = self._link
        return link is not None and link.process.is_alive()

    @property
    def pid(self) -> int | None:
        link = self._link
        return link.process.pid if link is not None else None

    def close(self, timeout: float = 10.0) -> None:
        """Close the open series' file and stop the writer (idempotent); a writer that does not
        exit within ``timeout`` seconds is killed (its file then opens as a killed writer's)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            link = self._link
            self._series_open = False
        if link is None:
            return
        try:
            link.tasks.put(None)
        except (OSError, ValueError):
            pass  # the queue is already closed: the process is gone
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
        :meth:`~.paths.SavingLocation.reserve`); starts a new writer process when the last one died."""
        with self._lock:
            if self._closed:
                raise WriterProcessError("the writer process was closed; create a new SeriesWriterProcess")
            link = self._link
        if link is not None and (link.fatal_reason is not None or not link.process.is_alive()):
            # a writer that gave up exits at once; let the collector finish with its stacks and file
            _stop(link, 10.0)
            link = None
        if link is None:
            self._start()
        with self._lock:
            self._series_open = True
            self._series_first_seq = self._next_seq
            self._current_path = str(path)
            self._open_paths.add(str(path))
            self._series_saved_event.clear()
            self._frame_rate.reset()
            self._byte_rate.reset()
            self._status = SavingStatus(state="writing", message=f"writing {path}", path=str(path),
                                        series_id=spec.series_id, series_saved=self._status.series_saved,
                                        last=self._status.last)
            self._link.tasks.put(OpenSeries(str(path), spec))

    def write_stack(self, handle: FrameStackHandle) -> int:
        """Queue ``handle``'s frames for writing (returns at once); its sequence number.
        Raises :class:`WriterProcessError` when no series is open or the writer died: then the
        caller keeps the stack (``on_stack_done`` is not called for it)."""
        with self._lock:
            link = self._link
            if not self._series_open:
                raise WriterProcessError("no series file is open: call open_series first")
            if link is None or not link.process.is_alive() or link.fatal_reason is not None:
                raise WriterProcessError(f"the writer process is not running ({self._status.message}); "
                                         "it starts again with the next series")
            waiting = len(link.outstanding)
            status = self._status
            self._status = _replace(status, backlog=waiting + 1, max_backlog=max(status.max_backlog, waiting + 1),
                                    backlogged_stacks=status.backlogged_stacks + (waiting > 0))
            seq = self._next_seq
            self._next_seq += 1
            link.outstanding[seq] = handle
            link.tasks.put(WriteStack(seq, handle))
        return seq

    def write_results(self, buffers: Mapping[str, np.ndarray], frames_done: np.ndarray | None = None) -> None:
        """Queue the series' results to overwrite those in the file. The arrays are pickled
        later by the queue's thread: pass arrays nobody changes any more (a ResultSnapshot's)."""
        with self._lock:
            if self._series_open and self._link is not None and self._link.fatal_reason is None:
                self._link.tasks.put(WriteResults(dict(buffers), frames_done))

    def close_series(self, end_reason: str = "") -> None:
        """The series ended: the writer writes what is queued, then closes the file;
        :meth:`wait_series_saved` tells what the file holds."""
        with self._lock:
            if not self._series_open:
                return
            self._series_open = False
            if self._status.state == "writing":
                self._status = _replace(self._status, state="closing", message=f"closing {self._current_path}")
            if self._link is not None and self._link.fatal_reason is None and self._link.process.is_alive():
                self._link.tasks.put(CloseSeries(end_reason))

    def wait_series_saved(self, timeout: float | None = None) -> SeriesSaved:
        """What the last series' file holds, once it is closed (or given up); TimeoutError when
        it is not within ``timeout`` seconds."""
        if not self._series_saved_event.wait(timeout):
            raise TimeoutError(f"the series file is not closed after {timeout} s ({self.status().message})")
        return self._status.last

    def wait_stacks_done(self, timeout: float | None = None) -> bool:
        """True once every stack given to :meth:`write_stack` is done; False after ``timeout``."""
        with self._lock:
            return self._lock.wait_for(lambda: self._link is None or not self._link.outstanding, timeout)

    def status(self) -> SavingStatus:
        with self._lock:
            return _replace(self._status, frames_per_second=self._frame_rate.rate(),
                            megabytes_per_second=self._byte_rate.rate() / 1e6)

    # ---- answers (collector thread) ----------------------------------------------------------

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
                handle = link.outstanding.pop(answer.seq, None)
                status = self._status
                if answer.seq >= self._series_first_seq:
                    link.frames_flushed = answer.frames_flushed
                    frames = status.frames_saved + answer.frames_saved
                    nbytes = status.bytes_written + answer.bytes_written
                    now = time.monotonic()
                    self._frame_rate.add(frames, now)
                    self._byte_rate.add(nbytes, now)
                    status = _replace(status, frames_saved=frames, bytes_written=nbytes)
                self._status = _replace(status, backlog=len(link.outstanding))
                self._lock.notify_all()
            elif isinstance(answer, SavingFailed):
                if answer.fatal:
                    link.fatal_reason = answer.reason
                self._status = _replace(self._status, state="failed", message=f"saving failed: {answer.reason}")
            elif isinstance(answer, SeriesSaved):
                link.frames_flushed = 0
                self._series_done(answer)
        if handle is not None:
            self._on_stack_done(handle)
        elif not isinstance(answer, StackWritten):
            self._on_answer(answer)

    def _series_done(self, saved: SeriesSaved) -> None:
        """Under the lock: a series' file is closed or given up."""
        if saved.file_closed:
            self._open_paths.discard(saved.path)
        self._status = _replace(self._status, series_saved=self._status.series_saved + 1, last=saved)
        if saved.path != self._current_path:
            return  # an earlier series, closed after the next one was opened
        failed = saved.stopped_reason is not None
        message = (f"saved {saved.path}: {saved.frames_saved} frames, {saved.bytes_written / 1e6:.1f} MB"
                   if not failed else f"saving stopped: {saved.stopped_reason}; {saved.path} holds "
                                      f"{saved.frames_saved} frames")
        self._status = _replace(self._status, state="failed" if failed else "saved", message=message,
                                frames_saved=saved.frames_saved)
        self._series_saved_event.set()

    def _writer_ended(self, link: _Link) -> None:
        """The writer process is gone: give back its stacks, make its open file readable."""
        code = link.process.exitcode
        with self._lock:
            released = list(link.outstanding.values())
            link.outstanding.clear()
            expected = self._closed and code == 0
            paths = sorted(self._open_paths)
            self._open_paths.clear()
            path = self._current_path if self._current_path in paths else None
            if self._link is link:
                self._link = None
            reason = link.fatal_reason or f"the writer process ended unexpectedly (exit code {code})"
            answers: list[WriterAnswer] = []
            if not expected:
                note = "; ".join(_clear_flags_note(p) for p in paths)
                if path is not None and not self._series_saved_event.is_set():
                    last = self._status
                    saved = SeriesSaved(path=path, series_id=last.series_id if last.series_id is not None else -1,
                                        frames_saved=link.frames_flushed, frames_missing=0, frames_refused=0,
                                        bytes_written=last.bytes_written, seconds=0.0, complete=False,
                                        stopped_reason=reason, file_closed=False,
                                        notes=("frames written before the writer's last flush are in the file",
                                               note))
                    self._series_done(saved)
                    answers.append(saved)
                self._status = _replace(self._status, state="failed", backlog=0,
                                        message=f"saving failed: {reason}" + (f"; {note}" if note else ""))
                if link.fatal_reason is None:
                    answers.insert(0, SavingFailed(path or "", reason, fatal=True))
            self._lock.notify_all()
        for handle in released:
            self._on_stack_done(handle)
        for answer in answers:
            self._on_answer(answer)
        link.tasks.close()
        link.answers.close()


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
            return "no file was written"
        clear_write_flags(path)
        return f"{path} opens normally (write flags cleared)"
    except (SavingError, OSError) as error:
        return f"{path} needs h5py.File(path, 'r', swmr=True) to open ({error})"


def _replace(status: SavingStatus, **changes: Any) -> SavingStatus:
    return replace(status, **changes)
