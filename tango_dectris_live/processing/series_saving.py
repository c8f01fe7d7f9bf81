"""Saving live series: one NeXus/HDF5 file per series (see :mod:`tango_dectris_live.saving`).

:class:`SeriesSaving` holds what a device lets its users set (``mode``, ``directory``,
``name_pattern`` below the configured base directory) and the writer process, and is what a
:class:`~.runner.SeriesRun` and the acquisition call: :meth:`begin` when a series is set up,
:meth:`write_stack` for every stack of its frames (``results_and_frames``), :meth:`write_results`
while it runs and :meth:`end` with its final results. Nothing here stops a series: a saving
that fails is reported in :meth:`status` and the processing goes on.

``writers``: how many processes write a series' frames (0: automatic, see
:func:`~tango_dectris_live.saving.automatic_writers`); with more than one, each writes a part file
beside the series file, whose frames dataset joins them (docs/saving.md).
"""
from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from tango_dectris_live.receiver import FrameStackHandle
from tango_dectris_live.saving import (SavingError, SavingLocation, SavingStatus, SeriesFileSpec,
                                       SeriesWriterProcess, WriterProcessError, automatic_writers)
from tango_dectris_live.saving.paths import DEFAULT_PATTERN

log = logging.getLogger(__name__)

SAVING_MODES = ("off", "results", "results_and_frames")
_RESULTS_EVERY_S = 1.0  # results rewritten in the file while the series runs


@dataclass(frozen=True)
class SavingSettings:
    mode: str = "off"
    directory: str = ""
    name_pattern: str = DEFAULT_PATTERN


class SeriesSaving:
    """Where and what to save, and the writer process (started at the first saved series)."""

    def __init__(self, base_directory: str = "", settings: SavingSettings = SavingSettings(),
                 writers: int = 0) -> None:
        self.base_directory = str(base_directory or "")
        self._writers = self._checked_writers(writers)
        self._lock = threading.Lock()
        self._writer: SeriesWriterProcess | None = None
        self._closed = False
        self._on_stack_saved: Callable[[FrameStackHandle], None] | None = None
        self._settings = self.check(settings)
        self._series_mode = "off"  # the mode of the series being saved
        self._last_file = ""
        self._problem = ""  # why the last series could not be saved (empty: none)
        self._results_written_at = 0.0

    # ---- settings ------------------------------------------------------------------------

    @property
    def writers(self) -> int:
        """Writer processes per series as set (0: automatic); :attr:`resolved_writers` is the number."""
        return self._writers

    @writers.setter
    def writers(self, count: int) -> None:
        self._writers = self._checked_writers(count)
        with self._lock:
            if self._writer is not None:
                self._writer.writers = self.resolved_writers  # from the next series on

    @property
    def resolved_writers(self) -> int:
        return self._writers or automatic_writers()

    @staticmethod
    def _checked_writers(count: int) -> int:
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise SavingError(f"the number of writer processes must be a whole number >= 0 (0: automatic), "
                              f"got {count!r}")
        return count

    @property
    def settings(self) -> SavingSettings:
        return self._settings

    @settings.setter
    def settings(self, settings: SavingSettings) -> None:
        self._settings = self.check(settings)
        if settings.mode != "off" and self._writer is None:
            # the writer process takes a second or two to start: now, not on the first series' path
            threading.Thread(target=self._start_writer, name="series-writer-start", daemon=True).start()

    def _start_writer(self) -> None:
        try:
            self._writer_process()
        except (SavingError, OSError) as error:  # the first series tries again, and reports it
            log.warning("the series writer process did not start: %s", error)

    def _writer_process(self) -> SeriesWriterProcess:
        with self._lock:
            if self._closed:
                raise WriterProcessError("saving is closed (the device is shutting down)")
            if self._writer is None:
                self._writer = SeriesWriterProcess(on_stack_done=self._stack_saved, writers=self.resolved_writers)
            return self._writer

    def check(self, settings: SavingSettings) -> SavingSettings:
        """Refuse (SavingError naming the rule) a mode, directory or pattern that cannot save."""
        if settings.mode not in SAVING_MODES:
            raise SavingError(f"saving_mode must be one of {', '.join(SAVING_MODES)}, got {settings.mode!r}")
        if settings.mode != "off":
            self._location(settings)  # the base, the directory inside it, the pattern
        return settings

    def _location(self, settings: SavingSettings) -> SavingLocation:
        return SavingLocation.create(self.base_directory, settings.directory, settings.name_pattern)

    @property
    def frames_wanted(self) -> bool:
        return self._series_mode == "results_and_frames"

    @property
    def last_file(self) -> str:
        return self._last_file

    # ---- one series ----------------------------------------------------------------------

    def begin(self, make_spec: Callable[[], SeriesFileSpec],
              on_stack_saved: Callable[[FrameStackHandle], None], frames_here: bool = True) -> None:
        """A series is set up: reserve its file and open it (with the mode set now; ``make_spec``
        is called only then). ``frames_here`` False: this process has no frames to save (a
        merging device: its nodes save theirs), ``results_and_frames`` saves the results."""
        settings = self._settings
        if not frames_here and settings.mode == "results_and_frames":
            settings = dataclasses.replace(settings, mode="results")
        self._series_mode = "off"
        self._problem = ""
        if settings.mode == "off":
            return
        spec = make_spec()
        try:
            reserved = self._location(settings).reserve(spec.series_id)
            writer = self._writer_process()
            self._on_stack_saved = on_stack_saved
            if settings.mode == "results":
                spec = dataclasses.replace(spec, encoding="none", n_frames=0)  # no frame dataset to fill
            writer.open_series(reserved.path, spec)
        except (SavingError, OSError) as error:
            self._problem = f"series {spec.series_id} not saved: {error}"
            log.warning("%s", self._problem)
            return
        self._series_mode = settings.mode
        self._last_file = str(reserved.path)
        self._results_written_at = 0.0
        if reserved.renamed:
            log.info("%s", reserved.describe())

    def write_stack(self, handle: FrameStackHandle) -> bool:
        """Queue a stack's frames; True: the writer holds the stack until ``on_stack_saved``."""
        if not self.frames_wanted:
            return False
        try:
            self._writer.write_stack(handle)
        except WriterProcessError as error:
            self._problem = f"frames not saved: {error}"
            return False
        return True

    def write_results(self, buffers: Mapping[str, np.ndarray], done: np.ndarray | None, force: bool = False) -> None:
        """The results so far (rewritten in the file at most once a second unless ``force``)."""
        if self._series_mode == "off":
            return
        now = time.monotonic()
        if force or now - self._results_written_at >= _RESULTS_EVERY_S:
            self._results_written_at = now
            self._writer.write_results(buffers, done)

    def end(self, buffers: Mapping[str, np.ndarray], done: np.ndarray | None, end_reason: str) -> None:
        """The series ended: its final results, then the file is closed."""
        if self._series_mode == "off":
            return
        self.write_results(buffers, done, force=True)
        self._writer.close_series(end_reason)
        self._series_mode = "off"

    def _stack_saved(self, handle: FrameStackHandle) -> None:
        callback = self._on_stack_saved
        if callback is not None:
            callback(handle)

    # ---- state ---------------------------------------------------------------------------

    def status(self) -> SavingStatus | None:
        writer = self._writer
        return writer.status() if writer is not None else None

    def status_text(self, status: SavingStatus | None) -> str:
        """What the saving does or did, in words (``status``: :meth:`status`, read once by the caller)."""
        if not self.base_directory:
            return "saving unavailable: no SavingBaseDirectory configured"
        text = status.message if status is not None else ""
        if self._problem:
            text = f"{self._problem}; {text}" if text else self._problem
        if not text:
            text = "off" if self._settings.mode == "off" else f"{self._settings.mode}: waiting for a series"
        return text

    def problem(self, status: SavingStatus | None) -> str:
        """Why the last series was not (completely) saved; empty when nothing went wrong."""
        if self._problem:
            return self._problem
        return status.message if status is not None and status.state == "failed" else ""

    def wait_saved(self, timeout: float) -> Any:
        writer = self._writer
        return writer.wait_series_saved(timeout) if writer is not None else None

    def close(self) -> None:
        with self._lock:  # after a start in progress, if any
            writer, self._writer = self._writer, None
            self._closed = True
        if writer is not None:
            writer.close()
