"""A series' frames written by several processes: part files beside the series file, joined by a
virtual dataset.

One process writes about 100,000 small (ARINA 96x96) frames/s with HDF5's direct chunk write
(~10 us of a core per chunk, most of it inside HDF5, which holds one lock per process), less than
the 120 kHz an ARINA sends. Several writer processes each write a file of their own, and the
series file's ``/entry/data/data`` is an HDF5 virtual dataset (VDS, HDF5 >= 1.10) that maps every
frame to its place in its part file: readers (h5py, silx, LiberTEM) see one dataset.

A virtual dataset's map is fixed when it is created, so which part holds a frame is decided by the
frame number alone (:class:`PartLayout`): frame ``f`` is in block ``f // block``, block ``b`` in
part ``b % parts``, and each part holds its blocks back to back. With ``block`` the receiver's
frame-stack size, a stack of consecutive frames that starts on a block boundary (the usual case)
goes to one writer whole; a stack that spans blocks of several parts is written by each of them,
every one taking its own frames.

Part files are named after the series file (``scan_0001_part0.h5``, ``scan_0001_part1.h5``, ...)
in its directory, created empty and exclusively like the series file: an existing file is never
overwritten (the next free ``scan_0001_part0_1.h5`` is taken). The virtual dataset names them
relative to the series file, so the files can be moved together.
"""
from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from .errors import SeriesFileError, UnsafePathError

_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
_MAX_RENAMES = 1000
_FRAMES_PATH = "/entry/data/data"


@dataclass(frozen=True)
class PartLayout:
    """How a series' frames are dealt out among part files: frame ``f`` is in block
    ``f // block``, block ``b`` in part ``b % len(files)``; a part holds its blocks back to back.

    ``series_file`` and ``files`` (the part files) are names in one directory: the virtual
    dataset refers to the parts by these relative names, which HDF5 resolves against the series
    file's directory."""

    series_file: str
    files: tuple[str, ...]
    block: int

    def __post_init__(self) -> None:
        if len(self.files) < 2 or self.block < 1:
            raise SeriesFileError(f"a part layout needs at least 2 files and a block of at least 1 frame, got "
                                  f"{len(self.files)} file(s) and block {self.block}")
        for name in (self.series_file, *self.files):
            if "/" in name or "\0" in name or name in ("", ".", ".."):
                raise SeriesFileError(f"series and part files are named in one directory, got {name!r}")

    @property
    def count(self) -> int:
        return len(self.files)

    def owner(self, numbers: np.ndarray) -> np.ndarray:
        """The part holding each frame number."""
        return (numbers // self.block) % self.count

    def owners(self, first: int, last: int) -> list[int]:
        """The parts holding any of the frames ``first..last`` (all when they span as many blocks)."""
        blocks = range(first // self.block, last // self.block + 1)
        return sorted({b % self.count for b in blocks}) if len(blocks) < self.count else list(range(self.count))

    def position(self, numbers: np.ndarray) -> np.ndarray:
        """Each frame's index in its part's dataset."""
        return (numbers // (self.count * self.block)) * self.block + numbers % self.block

    def frame_numbers(self, part: int, positions: np.ndarray) -> np.ndarray:
        """The frame numbers at ``positions`` of part ``part``'s dataset."""
        return (positions // self.block) * (self.count * self.block) + part * self.block + positions % self.block

    def frames_in(self, part: int, n_frames: int) -> int:
        """How many of a series' ``n_frames`` frames part ``part`` holds."""
        whole = n_frames // self.block
        held = len(range(part, whole, self.count)) * self.block
        if n_frames % self.block and whole % self.count == part:
            held += n_frames - whole * self.block
        return held

    def regions(self, part: int, n_frames: int) -> list[tuple[int, int, int, int, int]]:
        """Part ``part``'s regions of the virtual dataset, ``(first, runs, stride, block,
        position)``: ``runs`` runs of ``block`` frames, ``stride`` apart from frame ``first`` on,
        are the part's frames from ``position`` on. At most two: its whole blocks, and the
        series' last, shorter block."""
        whole = n_frames // self.block
        runs = len(range(part, whole, self.count))
        regions = []
        if runs:
            regions.append((part * self.block, runs, self.count * self.block, self.block, 0))
        if n_frames % self.block and whole % self.count == part:
            regions.append((whole * self.block, 1, 1, n_frames - whole * self.block, runs * self.block))
        return regions


def reserve_part_files(series_path: str | os.PathLike, count: int) -> tuple[Path, ...]:
    """Create ``count`` empty part files beside the (reserved) series file, named after it:
    ``<name>_part<k><suffix>``, or the next free ``<name>_part<k>_<j><suffix>`` when that is
    taken (never overwritten; created with ``O_EXCL``, symbolic links not followed). Raises
    :class:`SeriesFileError` (and removes those it made) when one cannot be created."""
    series_path = Path(series_path)
    folder = Path(os.path.realpath(series_path.parent))
    stem, suffix = os.path.splitext(series_path.name)
    made: list[Path] = []
    try:
        for part in range(count):
            made.append(_reserve_one(folder, f"{stem}_part{part}", suffix))
    except BaseException:
        for path in made:
            remove_if_empty(path)
        raise
    return tuple(made)


def _reserve_one(folder: Path, stem: str, suffix: str) -> Path:
    for attempt in range(_MAX_RENAMES):
        candidate = folder / (f"{stem}{suffix}" if attempt == 0 else f"{stem}_{attempt}{suffix}")
        try:
            fd = os.open(candidate, _CREATE_FLAGS, 0o644)
        except FileExistsError:
            continue  # taken (or a symbolic link): never overwritten
        except OSError as error:
            what = "the name is too long" if error.errno == errno.ENAMETOOLONG else error.strerror
            raise SeriesFileError(f"cannot create the part file {candidate}: {what}") from None
        os.close(fd)
        if Path(os.path.realpath(candidate)).parent != folder:  # pragma: no cover - a race with a rename
            os.unlink(candidate)
            raise UnsafePathError(f"the part file {candidate} resolves outside {folder}")
        return candidate
    raise SeriesFileError(f"{folder / (stem + suffix)} and {_MAX_RENAMES - 1} renamed variants exist")


def remove_if_empty(path: str | os.PathLike) -> None:
    """Remove a reserved file nothing was written to (a placeholder)."""
    try:
        if os.path.getsize(path) == 0:
            os.unlink(path)
    except OSError:
        pass  # already gone, or not ours to remove


def virtual_frames(group: h5py.Group, name: str, n_frames: int, frame_shape: tuple[int, int], dtype: np.dtype,
                   layout: PartLayout) -> h5py.Dataset:
    """Create ``group[name]``, ``(n_frames, *frame_shape)``, as a virtual dataset over the part
    files' ``/entry/data/<name>`` (h5py's high-level VirtualLayout has no blocked hyperslabs,
    which keep the map to two regions per part whatever the series' length)."""
    shape = (int(n_frames), *map(int, frame_shape))
    plist = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    plist.set_fill_value(np.zeros((), dtype=dtype))
    for part, file_name in enumerate(layout.files):
        source_shape = (layout.frames_in(part, n_frames), *shape[1:])
        for first, runs, stride, block, position in layout.regions(part, n_frames):
            virtual = h5py.h5s.create_simple(shape)
            virtual.select_hyperslab((first, 0, 0), (runs, 1, 1), (stride, 1, 1), (block, *shape[1:]))
            source = h5py.h5s.create_simple(source_shape)
            source.select_hyperslab((position, 0, 0), (1, 1, 1), None, (runs * block, *shape[1:]))
            plist.set_virtual(virtual, file_name.encode(), f"/entry/data/{name}".encode(), source)
    dataset_id = h5py.h5d.create(group.id, name.encode(), h5py.h5t.py_create(np.dtype(dtype)),
                                 h5py.h5s.create_simple(shape), dcpl=plist)
    return h5py.Dataset(dataset_id)


def part_frames_on_disk(folder: str | os.PathLike, layout: PartLayout, part: int,
                        n_frames: int) -> tuple[np.ndarray, str]:
    """Which of a series' frames part ``part``'s file holds (a bool per frame), read from its
    chunk index (for a part whose writer stopped before saying), and a note for the file."""
    from .recovery import stored_frames  # recovery's VDS reading uses this module

    path = Path(folder) / layout.files[part]
    frames = np.zeros(n_frames, dtype=bool)
    try:
        with open_readable(path) as file:
            positions = np.flatnonzero(stored_frames(file[_FRAMES_PATH]))
    except (OSError, KeyError) as error:
        return frames, f"part {part} ({path.name}) unreadable ({error}): its frames are listed missing"
    numbers = layout.frame_numbers(part, positions)
    frames[numbers[numbers < n_frames]] = True
    return frames, f"part {part} ({path.name}): its writer stopped; {int(frames.sum())} frames found in it"


def open_readable(path: str | os.PathLike) -> h5py.File:
    """Open an HDF5 file for reading; as a SWMR reader when its writer still has it open (or left
    its write flags set)."""
    try:
        return h5py.File(path, "r")
    except OSError:
        return h5py.File(path, "r", swmr=True)

