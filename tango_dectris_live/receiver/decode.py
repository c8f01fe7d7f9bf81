"""Worker side: decode the frames of a stack straight from shared memory into an array.

:func:`decode_frames_into` runs the compiled loop (``_stack_decode.pyx``) with the GIL
released: it hands each frame to dectris-compression's C decompressor, the shared memory as its
source and ``out`` as its destination. Frames it does not handle (big-endian or half-float pixels,
float pixels into another type) go through :func:`decode_frames_into_reference`'s per-frame Python
path, which stays the reference the tests compare against.
"""
from __future__ import annotations

import threading
from functools import lru_cache

import dectris.compression
import numpy as np

from tango_dectris_live.stream import Encoding, UnsupportedEncodingError, algorithm_from_code, decode_frame_into

from . import _stack_decode
from .native import function_addresses
from .framestack import FrameStackHandle, attach_segment, dtype_of_tag, record_bytes

_DECTRIS_FUNCTIONS = ("compression_decompress_buffer", "LZ4_decompress_safe")
_decoders = threading.local()  # a StackDecoder owns a scratch buffer: one per thread


def decoder_functions() -> dict[str, int]:
    """Addresses of the C functions the compiled loop calls, from the dectris.compression
    extension this process has loaded (see _stack_decode.pyx for why they are not linked
    at build time)."""
    return function_addresses(dectris.compression.__file__, _DECTRIS_FUNCTIONS,
                              "the compiled frame decoder was written for dectris-compression 0.4")


def _stack_decoder() -> _stack_decode.StackDecoder:
    decoder = getattr(_decoders, "decoder", None)
    if decoder is None:
        decoder = _decoders.decoder = _stack_decode.StackDecoder(decoder_functions())
    return decoder


@lru_cache(maxsize=64)
def _encoding(code: int, tag: int) -> Encoding:
    return Encoding.for_dtype(algorithm_from_code(code), dtype_of_tag(tag))


def _check_range(handle: FrameStackHandle, start: int, stop: int, out: np.ndarray) -> None:
    if not 0 <= start <= stop <= handle.frames:
        raise IndexError(f"frames [{start}, {stop}) are outside the stack of {handle.frames} frames")
    if out.ndim != 3 or out.shape[0] != stop - start:
        raise ValueError(f"out has shape {out.shape}; decoding {stop - start} frames needs "
                         f"({stop - start}, height, width)")


def decode_frames_into(handle: FrameStackHandle, start: int, stop: int, out: np.ndarray, *,
                       channel: int = 0) -> np.ndarray:
    """Decode the frames at stack positions ``[start, stop)`` into ``out`` (shape
    (stop - start, height, width), any numeric dtype) and return their frame numbers (int64).

    The compressed bytes are read in place from the shared memory (the segment is attached by
    name once per process), so this works in any process that has the pickled ``handle``.
    Stacks hold frames in arrival order: place ``out[i]`` by the returned frame number.
    Raises the ``tango_dectris_live.stream`` error (corrupt data, size mismatch, unsupported
    encoding) of the first frame that cannot be decoded, naming its frame number.
    """
    _check_range(handle, start, stop, out)
    kind = _stack_decode.PIXEL_TYPES.get(out.dtype.name)
    if kind is None or not out.flags.c_contiguous or not out.dtype.isnative or out.size == 0:
        return decode_frames_into_reference(handle, start, stop, out, channel=channel)
    segment = attach_segment(handle.segment)
    layout = handle.layout
    slot_start = handle.slot * layout.slot_bytes
    rows = out.reshape(stop - start, -1)
    fallback = np.zeros(stop - start, np.uint8)
    _stack_decoder().decode(segment, slot_start, slot_start + layout.index_bytes, start, stop,
                            rows.view(np.uint8), kind, rows.shape[1], channel, fallback)
    records = handle.index()[start:stop]
    for i in np.flatnonzero(fallback):
        _decode_record(handle, records[i], out[i], channel)
    return records["frame"].copy()


def decode_frames_into_reference(handle: FrameStackHandle, start: int, stop: int, out: np.ndarray, *,
                                 channel: int = 0) -> np.ndarray:
    """:func:`decode_frames_into` in Python, one ``tango_dectris_live.stream`` decode per frame
    (the reference the compiled loop is tested against)."""
    _check_range(handle, start, stop, out)
    records = handle.index()[start:stop]
    for i, record in enumerate(records):
        _decode_record(handle, record, out[i], channel)
    return records["frame"].copy()


def _decode_record(handle: FrameStackHandle, record: np.void, out: np.ndarray, channel: int) -> None:
    frame = int(record["frame"])
    try:
        encoding = _encoding(int(record["encoding"]), int(record["dtype_tag"]))
    except ValueError as error:
        raise UnsupportedEncodingError(f"frame {frame}: {error}") from None
    decode_frame_into(record_bytes(handle, record, channel), encoding, out, frame_number=frame)
