"""Live analysis: LiberTEM live dataset, analyses registry, acquisition runner, result snapshots."""
from .analyses import (ENTRY_POINT_GROUP, AnalysisParameters, AnalysisRegistry, InvalidAnalysisParameters,
                       UnknownAnalysisError)
from .live_dataset import (FrameSource, ReceiverFrameSource, ScanShapeError, SeriesFinished, SeriesStarted,
                           StackReady, resolve_scan_shape)
from .runner import LiveRunner, SeriesRun, WorkerFailed
from .snapshot import ResultSnapshot, RunState

__all__ = [
    "ENTRY_POINT_GROUP", "AnalysisParameters", "AnalysisRegistry", "InvalidAnalysisParameters",
    "UnknownAnalysisError", "FrameSource", "ReceiverFrameSource", "ScanShapeError", "SeriesFinished",
    "SeriesStarted", "StackReady", "resolve_scan_shape", "LiveRunner", "SeriesRun", "WorkerFailed",
    "ResultSnapshot", "RunState",
]
