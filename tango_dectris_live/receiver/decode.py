"""Worker side: decode the frames of a stack straight from shared memory into an array."""
from __future__ import annotations

from functools import lru_cache

import numpy as np

from tango_dectris_live.stream import Encoding, algorithm_from_code, decode_frame_into

from .framestack import FrameStackHandle, dtype_of_tag, record_bytes


@lru_cache(maxsize=64)
def _encoding(code: int, tag: int) -> Encoding:
    return Encoding.for_dtype(algorithm_from_code(code), dtype_of_tag(tag))


def decode_frames_into(handle: FrameStackHandle, start: int, stop: int, out: np.ndarray, *,
                       channel: int = 0) -> np.ndarray:
    """Decode the frames at stack positions ``[start, stop)`` into ``out`` (shape
    (stop - start, height, width), any numeric dtype) and return their frame numbers.

    The compressed bytes are read in place from the shared memory (the segment is attached by
    name once per process), so this works in any process that has the pickled ``handle``.
    Stacks hold frames in arrival order: place ``out[i]`` by the returned frame number.
    """
    if not 0 <= start <= stop <= handle.frames:
        raise IndexError(f"frames [{start}, {stop}) are outside the stack of {handle.frames} frames")
    if out.ndim != 3 or out.shape[0] != stop - start:
        raise ValueError(f"out has shape {out.shape}; decoding {stop - start} frames needs "
                         f"({stop - start}, height, width)")
    records = handle.index()[start:stop]
    for i, record in enumerate(records):
        encoding = _encoding(int(record["encoding"]), int(record["dtype_tag"]))
        decode_frame_into(record_bytes(handle, record, channel), encoding, out[i],
                          frame_number=int(record["frame"]))
    return records["frame"].copy()
