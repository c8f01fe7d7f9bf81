"""The UDFs this project writes itself, for analyses LiberTEM has no UDF for."""
from __future__ import annotations

import numpy as np
from libertem.udf.base import UDF


class LastFrameUDF(UDF):
    """The frame with the highest scan index seen so far (the most recent one of a scan).

    The scan index is kept next to the frame, so that partial results merged in any order
    still end with the latest frame.
    """

    def get_preferred_input_dtype(self):
        return self.USE_NATIVE_DTYPE  # the frame as the detector sent it (mask values included)

    def get_result_buffers(self):
        return {
            "frame": self.buffer(kind="sig", dtype=self.meta.input_dtype),
            # flat scan index + 1 of the frame held; 0 = no frame yet
            "position": self.buffer(kind="single", dtype=np.int64),
        }

    def process_tile(self, tile):
        position = self.meta.slice.origin[0] + tile.shape[0]
        if position > self.results.position[0]:
            self.results.frame[:] = tile[-1]
            self.results.position[0] = position

    def merge(self, dest, src):
        if src.position[0] > dest.position[0]:
            dest.frame[:] = src.frame
            dest.position[:] = src.position


class ExactSumUDF(UDF):
    """Sum of all frames, exact for integer pixels: frames come in their native integer type
    (no conversion, no float32 rounding) and are accumulated in float64, exact to 2**53 counts."""

    def get_preferred_input_dtype(self):
        return self.USE_NATIVE_DTYPE

    def get_result_buffers(self):
        return {"intensity": self.buffer(kind="sig", dtype=np.float64)}

    def process_tile(self, tile):
        self.results.intensity[:] += np.sum(tile, axis=0, dtype=np.float64)

    def merge(self, dest, src):
        dest.intensity[:] += src.intensity


class ExactSumSigUDF(UDF):
    """Total counts of each frame, exact for integer pixels (native type in, float64 out)."""

    def get_preferred_input_dtype(self):
        return self.USE_NATIVE_DTYPE

    def get_result_buffers(self):
        return {"intensity": self.buffer(kind="nav", dtype=np.float64)}

    def process_tile(self, tile):
        self.results.intensity[:] += np.sum(tile.reshape(tile.shape[0], -1), axis=1, dtype=np.float64)
