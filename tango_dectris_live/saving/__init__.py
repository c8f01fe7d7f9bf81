"""Series files: every series as a NeXus/HDF5 file (raw frames by direct chunk write, results,
detector settings), written by a process of its own. See docs/saving.md."""
from .chunks import ChunkFormat, ChunkRefused, algorithm_of
from .errors import (
    BaseDirectoryError,
    NamePatternError,
    SavingError,
    SavingUnavailable,
    SeriesFileError,
    UnsafePathError,
    WriterProcessError,
)
from .nexus import LIBVER, NexusSeriesWriter, SeriesFileSpec, SeriesSaved
from .paths import DEFAULT_PATTERN, PLACEHOLDERS, ReservedPath, SavingLocation
from .recovery import clear_write_flags, stored_frames
from .writer import (
    CloseSeries,
    OpenSeries,
    SavingFailed,
    SavingStatus,
    SeriesWriterProcess,
    StackWritten,
    WriterAnswer,
    WriteResults,
    WriteStack,
)

__all__ = [
    "BaseDirectoryError",
    "ChunkFormat",
    "ChunkRefused",
    "CloseSeries",
    "DEFAULT_PATTERN",
    "LIBVER",
    "NamePatternError",
    "NexusSeriesWriter",
    "OpenSeries",
    "PLACEHOLDERS",
    "ReservedPath",
    "SavingError",
    "SavingFailed",
    "SavingLocation",
    "SavingStatus",
    "SavingUnavailable",
    "SeriesFileError",
    "SeriesFileSpec",
    "SeriesSaved",
    "SeriesWriterProcess",
    "StackWritten",
    "UnsafePathError",
    "WriteResults",
    "WriteStack",
    "WriterAnswer",
    "WriterProcessError",
    "algorithm_of",
    "clear_write_flags",
    "stored_frames",
]
