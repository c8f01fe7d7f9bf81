"""Files whose writer stopped before closing them: make them open like any other.

A file written in SWMR mode keeps, while it is open, a "being written" flag in its superblock. A
writer that dies (killed, or given up after a write error) leaves the flag set, and HDF5 then
refuses to open the file except as a SWMR reader (``h5py.File(path, "r", swmr=True)``), which
LiberTEM, silx and most programs do not do. Everything flushed before the writer stopped is
consistent on disk (that is what SWMR guarantees its readers), so clearing the flag, which is what
``h5clear -s`` does, makes the file open normally. Only do it once the writer process is gone.
"""
from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

from .errors import SeriesFileError

_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_SEARCH_OFFSETS = (0, 512, 1024, 2048, 4096, 8192)
_MASK = 0xFFFFFFFF


def clear_write_flags(path: str | os.PathLike) -> bool:
    """Clear the superblock's file-consistency flags of ``path`` (``h5clear -s``); returns whether
    they were set. Raises :class:`SeriesFileError` when the file is not an HDF5 file with a
    version 2 or 3 superblock (the only ones that have the flags), or when the superblock says
    the file is longer than it is (metadata lost: then only ``swmr=True`` readers open it)."""
    path = Path(path)
    with open(path, "r+b") as file:
        offset, block = _find_superblock(file, path)
        version, offset_size = block[8], block[9]
        if version not in (2, 3):
            raise SeriesFileError(f"{path}: superblock version {version} has no write flags to clear")
        size = 12 + 4 * offset_size + 4
        block = block[:size]
        (stored,) = struct.unpack_from("<I", block, size - 4)
        if _lookup3(block[:size - 4]) != stored:
            raise SeriesFileError(f"{path}: the superblock's checksum is wrong; the file is damaged")
        end_of_file = int.from_bytes(block[12 + 2 * offset_size:12 + 3 * offset_size], "little")
        actual = os.fstat(file.fileno()).st_size
        if end_of_file > actual:
            raise SeriesFileError(f"{path}: the superblock says {end_of_file} bytes, the file has {actual}; "
                                  "open it with h5py.File(path, 'r', swmr=True)")
        if block[11] == 0:
            return False
        cleared = bytearray(block)
        cleared[11] = 0
        struct.pack_into("<I", cleared, size - 4, _lookup3(bytes(cleared[:size - 4])))
        file.seek(offset)
        file.write(cleared)
        file.flush()
        os.fsync(file.fileno())
    return True


def stored_frames(dataset) -> np.ndarray:
    """Which frames (chunks along the first axis) of a ``(n, height, width)`` h5py dataset with
    one frame per chunk are in the file: a bool array of length n. For a file whose writer
    stopped before writing its ``missing_frames``. A series file's virtual dataset over part
    files (several writers): which frames its part files hold."""
    if dataset.is_virtual:
        return _stored_in_parts(dataset)
    present = np.zeros(dataset.shape[0], dtype=bool)

    def mark(info) -> None:
        present[info.chunk_offset[0]] = True

    dataset.id.chunk_iter(mark)
    return present


def _stored_in_parts(dataset) -> np.ndarray:
    from .parts import PartLayout, part_frames_on_disk

    files = tuple(str(name) for name in dataset.attrs.get("part_files", ()))
    if len(files) < 2 or "frames_per_block" not in dataset.attrs:
        raise SeriesFileError(f"{dataset.name} is a virtual dataset without the part_files and frames_per_block "
                              "attributes of a series file's frames")
    layout = PartLayout(series_file=Path(dataset.file.filename).name, files=files,
                        block=int(dataset.attrs["frames_per_block"]))
    folder = Path(dataset.file.filename).parent
    present = np.zeros(dataset.shape[0], dtype=bool)
    for part in range(layout.count):
        present |= part_frames_on_disk(folder, layout, part, dataset.shape[0])[0]
    return present


def _find_superblock(file, path: Path) -> tuple[int, bytes]:
    for offset in _SEARCH_OFFSETS:
        file.seek(offset)
        block = file.read(12 + 4 * 8 + 4)
        if block.startswith(_SIGNATURE) and len(block) >= 12:
            return offset, block
    raise SeriesFileError(f"{path} is not an HDF5 file (no superblock signature)")


def _rot(x: int, k: int) -> int:
    return ((x << k) | (x >> (32 - k))) & _MASK


def _mix(a: int, b: int, c: int) -> tuple[int, int, int]:
    for shift_a, shift_b, shift_c in ((4, 6, 8), (16, 19, 4)):
        a = ((a - c) & _MASK) ^ _rot(c, shift_a)
        c = (c + b) & _MASK
        b = ((b - a) & _MASK) ^ _rot(a, shift_b)
        a = (a + c) & _MASK
        c = ((c - b) & _MASK) ^ _rot(b, shift_c)
        b = (b + a) & _MASK
    return a, b, c


def _final(a: int, b: int, c: int) -> int:
    c = ((c ^ b) - _rot(b, 14)) & _MASK
    a = ((a ^ c) - _rot(c, 11)) & _MASK
    b = ((b ^ a) - _rot(a, 25)) & _MASK
    c = ((c ^ b) - _rot(b, 16)) & _MASK
    a = ((a ^ c) - _rot(c, 4)) & _MASK
    b = ((b ^ a) - _rot(a, 14)) & _MASK
    return ((c ^ b) - _rot(b, 24)) & _MASK


def _lookup3(data: bytes, initval: int = 0) -> int:
    """Bob Jenkins' lookup3 ``hashlittle``: HDF5's metadata checksum (H5_checksum_lookup3)."""
    length = len(data)
    a = b = c = (0xDEADBEEF + length + initval) & _MASK
    if length == 0:
        return c
    # whole 12-byte blocks, then the last 1..12 bytes zero-padded (what the published switch adds)
    words = struct.unpack(f"<{(length + 11) // 12 * 3}I", data + b"\0" * (-length % 12))
    blocks = (length + 11) // 12
    for block in range(blocks):
        a = (a + words[3 * block]) & _MASK
        b = (b + words[3 * block + 1]) & _MASK
        c = (c + words[3 * block + 2]) & _MASK
        if block < blocks - 1:
            a, b, c = _mix(a, b, c)
    return _final(a, b, c)
