"""The UDFs this project writes itself, for analyses LiberTEM has no UDF for."""
from __future__ import annotations

import numpy as np
from libertem.udf.base import UDF


class LastFrameUDF(UDF):
    """The frame with the highest scan index seen so far (the most recent one of a scan).

    The scan index is kept next to the frame, so that partial results merged in any order
    still end with the latest frame.
    """

    def get_result_buffers(self):
        return {
            "frame": self.buffer(kind="sig", dtype=np.float32),
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
