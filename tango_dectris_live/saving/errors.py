"""The errors of saving: one base class, one subclass per thing a user or the caller must change."""
from __future__ import annotations


class SavingError(ValueError):
    """Base of every saving error; its message says what to change."""


class SavingUnavailable(SavingError):
    """Saving is not configured (the base directory is empty)."""


class BaseDirectoryError(SavingError):
    """The base directory is not an absolute path, does not exist, or cannot be written."""


class UnsafePathError(SavingError):
    """A directory or name that would write outside the base directory (``..``, an absolute
    path, a symbolic link pointing out of it)."""


class NamePatternError(SavingError):
    """A file name pattern with an unknown placeholder, a bad format spec or a wrong suffix."""


class SeriesFileError(SavingError):
    """A series file that cannot be created or written as asked (the file cannot be created,
    a result that does not match the layout given at the start)."""


class WriterProcessError(SavingError):
    """The writer process could not be started or is not running any more."""
