"""How the compressed frames of the stream become HDF5 chunks, byte for byte (SIMPLON.md §5).

Every frame is one chunk of a ``(n, height, width)`` dataset, written with HDF5's direct chunk
write, so nothing is decompressed or recompressed:

=================  ===============================  =========================================
stream encoding    dataset filter                   chunk
=================  ===============================  =========================================
``bslz4``          bitshuffle 32008, LZ4            the blob as received (its 12-byte header
(v1 ``bsNN-lz4<``,                                  carries the size and the 8192-byte block
v2 ``bslz4``)                                       size, which the filter reads back)
``bszstd`` (v2)    bitshuffle 32008, Zstandard      the blob as received
``lz4h5``          LZ4 32004                        the blob as received (it already has the
(v2 ``lz4``)                                        filter's framing)
``lz4``            LZ4 32004                        the 16-byte framing (size, block size =
(v1 ``lz4<``)                                       size, block length) + the blob
``none``           none                             the pixels as received
=================  ===============================  =========================================

The one exception to "as received": a v1 ``lz4<`` block exactly as long as the frame cannot be
framed (the LZ4 filter stores such a block raw), so it is decompressed and stored raw. LZ4 blocks
are longer than their input when they do not compress, so this does not happen in practice.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import hdf5plugin
import lz4.block

from tango_dectris_live.stream import Algorithm

from .errors import SeriesFileError

_FRAMING = struct.Struct(">QI")  # total size, block size (bslz4, bszstd, lz4h5)
_LZ4_FRAMING = struct.Struct(">QII")  # total size, block size, length of the one block

#: Names the stream uses for each algorithm besides its :class:`Algorithm` value: the stream v1
#: encodings (``bs16-lz4<``, ``lz4<``, ``<``) and the CBOR names of stream v2 (``lz4`` there is
#: ``lz4h5`` here, as in the receiver's frame stacks).
_ALIASES = {"<": Algorithm.NONE, "lz4<": Algorithm.LZ4, "bs8-lz4<": Algorithm.BSLZ4,
            "bs16-lz4<": Algorithm.BSLZ4, "bs32-lz4<": Algorithm.BSLZ4}


class ChunkRefused(SeriesFileError):
    """One frame's bytes cannot be a chunk of the dataset (wrong size, truncated header)."""


def algorithm_of(encoding: str | Algorithm) -> Algorithm:
    """The :class:`Algorithm` of a frame-stack encoding (its value, e.g. ``bslz4``, ``lz4h5``) or
    of a stream v1 encoding (``bs16-lz4<``, ``lz4<``, ``<``)."""
    if isinstance(encoding, Algorithm):
        return encoding
    alias = _ALIASES.get(encoding)
    if alias is not None:
        return alias
    try:
        return Algorithm(encoding)
    except ValueError:
        known = sorted({a.value for a in Algorithm} | set(_ALIASES))
        raise SeriesFileError(f"frames encoded as {encoding!r} cannot be saved; known encodings: "
                              f"{', '.join(known)}") from None


@dataclass(frozen=True)
class ChunkFormat:
    """The dataset filter of one stream encoding and the chunk each received frame becomes."""

    algorithm: Algorithm

    @classmethod
    def of(cls, encoding: str | Algorithm) -> ChunkFormat:
        return cls(algorithm_of(encoding))

    def dataset_filter(self) -> dict[str, Any]:
        """Keyword arguments of ``h5py.Group.create_dataset`` that set the filter."""
        if self.algorithm is Algorithm.BSLZ4:
            return dict(hdf5plugin.Bitshuffle(nelems=0, cname="lz4"))
        if self.algorithm is Algorithm.BSZSTD:
            return dict(hdf5plugin.Bitshuffle(nelems=0, cname="zstd"))
        if self.algorithm in (Algorithm.LZ4, Algorithm.LZ4H5):
            return dict(hdf5plugin.LZ4(nbytes=0))
        return {}

    @property
    def filter_name(self) -> str:
        """The dataset's filter in words (for the file's attributes and the docs)."""
        return {Algorithm.BSLZ4: "bitshuffle+lz4 (HDF5 filter 32008)",
                Algorithm.BSZSTD: "bitshuffle+zstd (HDF5 filter 32008)",
                Algorithm.LZ4: "lz4 (HDF5 filter 32004)", Algorithm.LZ4H5: "lz4 (HDF5 filter 32004)",
                Algorithm.NONE: "none"}[self.algorithm]

    def chunk(self, blob: memoryview, frame_nbytes: int, where: str = "frame") -> memoryview | bytes:
        """The chunk to write for ``blob``, a frame of ``frame_nbytes`` bytes once decompressed.

        Checks what can be checked without decompressing (the declared size); raises
        :class:`ChunkRefused` naming ``where`` otherwise."""
        algorithm = self.algorithm
        if algorithm is Algorithm.NONE:
            if blob.nbytes != frame_nbytes:
                raise ChunkRefused(f"{where}: {blob.nbytes} uncompressed bytes, the frame needs {frame_nbytes}")
            return blob
        if algorithm is Algorithm.LZ4:
            if blob.nbytes == frame_nbytes:  # cannot be framed: see the module's docstring
                return _LZ4_FRAMING.pack(frame_nbytes, frame_nbytes, frame_nbytes) + lz4.block.decompress(
                    blob, uncompressed_size=frame_nbytes)
            return _LZ4_FRAMING.pack(frame_nbytes, frame_nbytes, blob.nbytes) + blob
        if blob.nbytes < _FRAMING.size:
            raise ChunkRefused(f"{where}: {algorithm.value} data of {blob.nbytes} bytes is shorter than its "
                               f"{_FRAMING.size}-byte header")
        declared, _block = _FRAMING.unpack_from(blob)
        if declared != frame_nbytes:
            raise ChunkRefused(f"{where}: {algorithm.value} header declares {declared} bytes, the frame "
                               f"needs {frame_nbytes}")
        return blob
