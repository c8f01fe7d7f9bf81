"""Result snapshots: a consistent copy of the merged results of a series at one moment."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

import numpy as np


class RunState(str, enum.Enum):
    """Where the processing of a series stands."""

    WAITING = "waiting"  # for the series to start
    RUNNING = "running"
    FINISHED = "finished"  # the series ended and every frame that arrived was processed
    STOPPED = "stopped"  # stopped by request; what had arrived was processed
    ABORTED = "aborted"  # pending frames dropped
    FAILED = "failed"  # an analysis raised; see ResultSnapshot.error

    @property
    def is_final(self) -> bool:
        return self in (RunState.FINISHED, RunState.STOPPED, RunState.ABORTED, RunState.FAILED)


@dataclass(frozen=True)
class ResultSnapshot:
    """Merged results of one series: NumPy copies, safe to keep and publish.

    ``done`` is the scan-shaped map of positions whose frame was processed. Scan-shaped float
    results are NaN where ``done`` is False. ``frames_missing`` counts scan positions without a
    frame once the series is over (0 while it runs); ``frames_dropped`` the frames the source
    reported as never received.
    """

    series: int | None
    state: RunState
    scan_shape: tuple[int, ...]
    scan_shape_note: str
    buffers: dict[str, np.ndarray] = field(default_factory=dict)
    done: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    frames_expected: int = 0
    frames_processed: int = 0
    frames_missing: int = 0
    frames_dropped: int = 0
    frames_out_of_scan: int = 0
    stacks_merged: int = 0  # partial results merged: a stack shared by idle workers counts once per part
    error: str | None = None

    @property
    def progress(self) -> float:
        """Fraction of the scan processed (0..1)."""
        return self.frames_processed / self.frames_expected if self.frames_expected else 0.0


def empty_snapshot(state: RunState, series: int | None = None, error: str | None = None) -> ResultSnapshot:
    """The snapshot of a run that never got to a series (or failed before its first frame)."""
    return ResultSnapshot(series=series, state=state, scan_shape=(), scan_shape_note="", error=error)


def blank_unprocessed(values: np.ndarray, done: np.ndarray) -> np.ndarray:
    """``values`` (scan-shaped, possibly with extra trailing axes) with NaN where no frame was
    processed; integer results are returned unchanged (NaN does not exist for them)."""
    if not np.issubdtype(values.dtype, np.floating) or values.shape[:done.ndim] != done.shape:
        return values
    values = values.copy()
    values[~done] = np.nan
    return values
