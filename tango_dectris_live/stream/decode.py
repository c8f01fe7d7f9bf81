"""Decoding compressed frames into numpy arrays (pure-Python reference path).

Decompressors: ``dectris.compression`` for the HDF5-framed formats (bslz4, v2 lz4, bszstd),
``lz4.block`` for the v1 raw LZ4 block, which has no header to say its size.
"""
from __future__ import annotations

import struct

import dectris.compression
import lz4.block
import numpy as np

from .errors import CorruptFrameError, FrameSizeMismatchError, UnsupportedEncodingError
from .messages import Algorithm, Blob, Encoding, ImageFrame

# The HDF5 framing used by bslz4, v2 lz4 and bszstd: uint64 BE total size, uint32 BE block size.
_FRAMING_HEADER = struct.Struct(">QI")
_FRAMED_ALGORITHMS = {
    Algorithm.BSLZ4: "bslz4",
    Algorithm.LZ4H5: "lz4",
    Algorithm.BSZSTD: "bszstd",
}


def decompress_bytes(
    blob: Blob, encoding: Encoding, *, expected_nbytes: int | None = None, where: str = "frame"
) -> bytes | memoryview:
    """The decompressed bytes of ``blob``. ``expected_nbytes`` is checked when given, and is
    required for the v1 raw LZ4 block (``Algorithm.LZ4``), which does not store its size.
    ``where`` names the frame in error messages."""
    algorithm = encoding.algorithm
    if algorithm is Algorithm.NONE:
        raw: bytes | memoryview = blob
    elif algorithm is Algorithm.LZ4:
        if expected_nbytes is None:
            raise ValueError("the v1 raw LZ4 block needs expected_nbytes: it does not store its size")
        try:
            raw = lz4.block.decompress(blob, uncompressed_size=expected_nbytes)
        except lz4.block.LZ4BlockError as error:
            raise CorruptFrameError(f"{where}: lz4< data could not be decompressed ({error})") from None
    elif algorithm in _FRAMED_ALGORITHMS:
        raw = _decompress_framed(blob, encoding, expected_nbytes, where)
    else:
        raise UnsupportedEncodingError(f"{where}: no decoder for {algorithm!r}")
    nbytes = raw.nbytes if isinstance(raw, memoryview) else len(raw)
    if expected_nbytes is not None and nbytes != expected_nbytes:
        raise FrameSizeMismatchError(
            f"{where}: {algorithm.value} data holds {nbytes} bytes, the frame needs {expected_nbytes}"
        )
    return raw


def _decompress_framed(blob: Blob, encoding: Encoding, expected_nbytes: int | None, where: str) -> bytes:
    name = _FRAMED_ALGORITHMS[encoding.algorithm]
    view = memoryview(blob)
    if view.nbytes < _FRAMING_HEADER.size:
        raise CorruptFrameError(
            f"{where}: {name} blob of {view.nbytes} bytes is shorter than its {_FRAMING_HEADER.size}-byte header"
        )
    declared_nbytes, _block_size = _FRAMING_HEADER.unpack_from(view)
    # Checked before decompressing so that a garbage header cannot make us allocate gigabytes.
    if expected_nbytes is not None and declared_nbytes != expected_nbytes:
        raise FrameSizeMismatchError(
            f"{where}: {name} header declares {declared_nbytes} bytes, the frame needs {expected_nbytes}"
        )
    try:
        return dectris.compression.decompress(view, name, elem_size=encoding.elem_size)
    except (RuntimeError, ValueError) as error:
        raise CorruptFrameError(f"{where}: {name} data could not be decompressed ({error})") from None


def decode_frame_into(
    blob: Blob, encoding: Encoding, out: np.ndarray, *, frame_number: int | None = None
) -> np.ndarray:
    """Decode one frame's ``blob`` into ``out`` (shape (height, width), any numeric dtype,
    row-major pixel order) and return ``out``. Pixels are converted to ``out.dtype`` as numpy's
    unsafe casting does (a uint16 frame into a float32 buffer is exact)."""
    where = "frame" if frame_number is None else f"frame {frame_number}"
    raw = decompress_bytes(blob, encoding, expected_nbytes=out.size * encoding.elem_size, where=where)
    # The decompressors return a new buffer, so that buffer is the only intermediate: copyto
    # converts and places it in one pass, whatever out's dtype and strides.
    pixels = np.frombuffer(raw, dtype=encoding.dtype).reshape(out.shape)
    np.copyto(out, pixels, casting="unsafe")
    return out


def decode_frame(frame: ImageFrame, channel: str | int | None = None) -> np.ndarray:
    """One channel of ``frame`` (the first by default) as a new (height, width) array of the
    frame's pixel type, in native byte order."""
    data = frame.channel_data(channel)
    out = np.empty(data.shape, dtype=data.dtype.newbyteorder("="))
    # Column-major (v2 tag 1040) pixels are the row-major pixels of the transposed image.
    target = out.T if data.order == "F" else out
    decode_frame_into(data.blob, data.encoding, target, frame_number=frame.frame_number)
    return out
