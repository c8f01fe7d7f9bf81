"""Where a series file goes: a base directory, a directory below it and a name pattern.

Rules (docs/saving.md):

* The base directory (device property ``SavingBaseDirectory``) is an absolute path to an existing
  directory the server may write to; empty means saving is unavailable.
* The directory is relative to the base (empty: the base itself), created when missing; ``..``,
  absolute paths and placeholders are refused there.
* The name pattern is a file name with the placeholders ``{series_id}``, ``{date}`` (YYYYMMDD),
  ``{time}`` (HHMMSS) and ``{counter}``; ``{series_id}`` and ``{counter}`` take an integer format
  spec (``{counter:05d}``). It ends with ``.h5`` or ``.nxs``; a name without a suffix gets ``.h5``.
* ``{counter}`` is one more than the highest counter among the files of the directory that match
  the pattern (1 in an empty directory).
* Nothing is written outside the base: every existing component of the path is resolved (symbolic
  links followed) and must stay inside the resolved base.
* An existing file is never overwritten: when the name is taken, the next free one of
  ``name_1.h5``, ``name_2.h5``, ... is used and :attr:`ReservedPath.renamed` says so. The file is
  created empty and exclusively (``O_EXCL``), so two servers cannot take the same name.
"""
from __future__ import annotations

import errno
import os
import re
import string
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from .errors import BaseDirectoryError, NamePatternError, SavingUnavailable, SeriesFileError, UnsafePathError

PLACEHOLDERS = ("series_id", "date", "time", "counter")
SUFFIXES = (".h5", ".nxs")
DEFAULT_PATTERN = "series_{series_id}.h5"
_INTEGER_PLACEHOLDERS = ("series_id", "counter")
_MAX_RENAMES = 10_000
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


@dataclass(frozen=True)
class ReservedPath:
    """A series file created empty for the series; ``requested`` is the name the pattern gave."""

    path: Path
    requested: Path
    counter: int | None

    @property
    def renamed(self) -> bool:
        """True when the pattern's name was taken and a ``_N`` name was used instead."""
        return self.path != self.requested

    def describe(self) -> str:
        """One line for a status: the path, and why it differs from the pattern's name."""
        if self.renamed:
            return f"{self.path} ({self.requested.name} exists: not overwritten)"
        return str(self.path)


@dataclass(frozen=True)
class SavingLocation:
    """A validated base directory, directory and name pattern; :meth:`reserve` creates files."""

    base: Path  # resolved
    directory: tuple[str, ...]  # components below the base
    name_pattern: str  # with its suffix

    @classmethod
    def create(cls, base_directory: str | os.PathLike, directory: str = "",
               name_pattern: str = DEFAULT_PATTERN) -> SavingLocation:
        """Validate the three settings; raises a :class:`SavingError` subclass that names the
        setting and what to change."""
        base = _checked_base(base_directory)
        location = cls(base=base, directory=_checked_directory(directory), name_pattern=_checked_pattern(name_pattern))
        # a link that exists now and leads out is refused at once (reserve() checks again when it creates)
        if not _inside(Path(os.path.realpath(location.folder)), base):
            raise UnsafePathError(f"saving directory {directory!r} leads outside the base directory {base} "
                                  "(through a symbolic link)")
        return location

    @property
    def folder(self) -> Path:
        """The directory the files go to (it may not exist yet)."""
        return self.base.joinpath(*self.directory)

    def file_name(self, series_id: int, when: datetime | None = None, counter: int | None = None) -> str:
        """The pattern's name for ``series_id`` at ``when`` (default: now), before any renaming."""
        when = datetime.now() if when is None else when
        fields = {"series_id": int(series_id), "date": when.strftime("%Y%m%d"), "time": when.strftime("%H%M%S"),
                  "counter": 0 if counter is None else int(counter)}
        return self.name_pattern.format(**fields)

    def reserve(self, series_id: int, when: datetime | None = None) -> ReservedPath:
        """Create the directory (if missing) and an empty file for the series; returns its path.

        Raises :class:`BaseDirectoryError` when the base has gone or became read-only,
        :class:`UnsafePathError` when a component of the path leads out of the base, and
        :class:`SeriesFileError` when the file cannot be created for another reason."""
        base = _checked_base(self.base)
        folder = _make_folder(base, self.directory)
        counter = self._next_counter(folder) if "counter" in self._fields() else None
        requested = folder / self.file_name(series_id, when, counter)
        stem, suffix = _split_suffix(requested.name)
        for attempt in range(_MAX_RENAMES):
            candidate = requested if attempt == 0 else folder / f"{stem}_{attempt}{suffix}"
            try:
                fd = os.open(candidate, _CREATE_FLAGS, 0o644)
            except FileExistsError:
                continue  # taken (or a symbolic link): never overwritten, try the next name
            except OSError as error:
                if error.errno == errno.ENAMETOOLONG:
                    raise NamePatternError(f"file name {candidate.name!r} is too long for the file system; "
                                           "shorten the name pattern") from None
                raise SeriesFileError(f"cannot create {candidate}: {error.strerror}") from None
            os.close(fd)
            if not _inside(Path(os.path.realpath(candidate)), base):  # pragma: no cover - a race
                os.unlink(candidate)
                raise UnsafePathError(f"{candidate} resolves outside the base directory {base}")
            return ReservedPath(path=candidate, requested=requested, counter=counter)
        raise SeriesFileError(f"{requested} and {_MAX_RENAMES - 1} renamed variants exist; "
                              "choose another name pattern or directory")

    def _fields(self) -> set[str]:
        return {name for _, name, _, _ in string.Formatter().parse(self.name_pattern) if name}

    def _next_counter(self, folder: Path) -> int:
        matcher = _pattern_regex(self.name_pattern)
        highest = 0
        with os.scandir(folder) as entries:
            for entry in entries:
                match = matcher.fullmatch(entry.name)
                if match is not None:
                    highest = max(highest, int(match.group("counter")))
        return highest + 1


def _checked_base(base_directory: str | os.PathLike) -> Path:
    text = os.fspath(base_directory)
    if not text.strip():
        raise SavingUnavailable("saving is unavailable: the device property SavingBaseDirectory is empty; "
                                "set it to a directory the device server may write to")
    if "\0" in text:
        raise BaseDirectoryError("the saving base directory contains a NUL character")
    base = Path(text)
    if not base.is_absolute():
        raise BaseDirectoryError(f"the saving base directory must be an absolute path, got {text!r}")
    if not base.exists():
        raise BaseDirectoryError(f"the saving base directory {base} does not exist; create it or "
                                 "correct SavingBaseDirectory")
    if not base.is_dir():
        raise BaseDirectoryError(f"the saving base directory {base} is not a directory")
    if not os.access(base, os.W_OK | os.X_OK):
        raise BaseDirectoryError(f"the saving base directory {base} is not writable by the device server "
                                 f"(user id {os.geteuid()}); change its permissions or SavingBaseDirectory")
    return Path(os.path.realpath(base))


def _checked_directory(directory: str) -> tuple[str, ...]:
    if "\0" in directory:
        raise UnsafePathError("the saving directory contains a NUL character")
    if directory.startswith(("/", "\\")) or Path(directory).is_absolute():
        raise UnsafePathError(f"the saving directory must be relative to the base directory, got {directory!r}")
    if "{" in directory or "}" in directory:
        raise UnsafePathError(f"the saving directory {directory!r} has braces: placeholders are only "
                              "allowed in the file name pattern")
    parts = tuple(part for part in directory.split("/") if part not in ("", "."))
    if ".." in parts:
        raise UnsafePathError(f"the saving directory {directory!r} contains '..': it must stay inside the "
                              "base directory")
    return parts


def _checked_pattern(pattern: str) -> str:
    if not pattern.strip():
        raise NamePatternError(f"the file name pattern is empty; e.g. {DEFAULT_PATTERN!r}")
    if "/" in pattern or "\\" in pattern or "\0" in pattern:
        raise NamePatternError(f"the file name pattern {pattern!r} must be a file name (no '/', '\\' or NUL): "
                               "put directories in the saving directory")
    try:
        fields = list(string.Formatter().parse(pattern))
    except ValueError as error:
        raise NamePatternError(f"the file name pattern {pattern!r} is malformed ({error}); "
                               "write a literal brace as '{{' or '}}'") from None
    for _literal, name, spec, conversion in fields:
        if name is None:
            continue
        if name not in PLACEHOLDERS:
            raise NamePatternError(f"the file name pattern {pattern!r} has an unknown placeholder {{{name}}}; "
                                   f"known: {', '.join('{' + p + '}' for p in PLACEHOLDERS)}")
        if conversion is not None:
            raise NamePatternError(f"the file name pattern {pattern!r}: {{{name}!{conversion}}} is not allowed")
        if spec and name not in _INTEGER_PLACEHOLDERS:
            raise NamePatternError(f"the file name pattern {pattern!r}: {{{name}}} takes no format spec")
        if spec and ("{" in spec or not _integer_spec_works(spec)):
            raise NamePatternError(f"the file name pattern {pattern!r}: {{{name}:{spec}}} is not a format "
                                   "for an integer (e.g. {counter:05d})")
    if not pattern.endswith(SUFFIXES):
        tail = fields[-1][0] if fields[-1][1] is None else ""
        if "." in tail:
            raise NamePatternError(f"the file name pattern {pattern!r} ends with {tail[tail.rindex('.'):]!r}: "
                                   f"names end with {' or '.join(SUFFIXES)} (or no suffix, then .h5 is added)")
        pattern += ".h5"
    if pattern in SUFFIXES:
        raise NamePatternError(f"the file name pattern {pattern!r} gives an empty name")
    return pattern


def _integer_spec_works(spec: str) -> bool:
    try:
        text = format(12, spec)
    except ValueError:
        return False
    return "/" not in text and "\0" not in text


def _split_suffix(name: str) -> tuple[str, str]:
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)], suffix
    raise AssertionError(f"{name!r} has no series file suffix")  # _checked_pattern guarantees one


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """Names the pattern gives (with the ``_N`` of a renamed file), the counter as a group."""
    stem, suffix = _split_suffix(pattern)
    regex = ""
    counter_seen = False
    for literal, name, _spec, _conversion in string.Formatter().parse(stem):
        regex += re.escape(literal)
        if name == "counter" and not counter_seen:
            regex += r"(?P<counter>\d+)"
            counter_seen = True
        elif name == "counter":
            regex += r"\d+"
        elif name == "date":
            regex += r"\d{8}"
        elif name == "time":
            regex += r"\d{6}"
        elif name == "series_id":
            regex += r"[ +-]*\d+"
    return re.compile(regex + r"(?:_\d+)?" + re.escape(suffix))


def _inside(path: Path, base: Path) -> bool:
    return path == base or path.is_relative_to(base)


def _make_folder(base: Path, parts: tuple[str, ...]) -> Path:
    """Create ``base/parts`` one component at a time, each one checked to resolve inside ``base``
    before anything is created below it (a symbolic link out of the base is refused, not followed)."""
    current = base
    for part in parts:
        candidate = current / part
        if not candidate.exists() and not candidate.is_symlink():
            try:
                candidate.mkdir()
            except FileExistsError:
                pass  # made meanwhile by someone else: checked below like any existing one
            except OSError as error:
                raise BaseDirectoryError(f"cannot create the saving directory {candidate}: {error.strerror}") from None
        resolved = Path(os.path.realpath(candidate))
        if not _inside(resolved, base):
            raise UnsafePathError(f"the saving directory {candidate} resolves to {resolved}, outside the base "
                                  f"directory {base} (a symbolic link?)")
        if not resolved.is_dir():
            raise UnsafePathError(f"the saving directory {candidate} exists and is not a directory")
        current = resolved
    if not os.access(current, os.W_OK | os.X_OK):
        raise BaseDirectoryError(f"the saving directory {current} is not writable by the device server")
    return current
