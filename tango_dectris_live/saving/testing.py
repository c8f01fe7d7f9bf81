"""Test and benchmark helper: frame stacks in shared memory filled from given compressed frames,
laid out as the receiver lays them out, without a stream."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from tango_dectris_live.receiver.framestack import (FRAME_RECORD_DTYPE, FrameStackHandle, FrameStackLayout,
                                                    SharedFrameStacks, SlotState, dtype_tag)

from .chunks import algorithm_of


class BlobStacks:
    """``num_slots`` slots of up to ``frame_stack_size`` frames of up to ``bytes_per_frame`` bytes;
    :meth:`stack` fills a free slot, :meth:`release` gives it back."""

    def __init__(self, num_slots: int, frame_stack_size: int, bytes_per_frame: int) -> None:
        self.layout = FrameStackLayout(num_slots=num_slots, frame_stack_size=frame_stack_size,
                                       bytes_per_frame=bytes_per_frame)
        self.stacks = SharedFrameStacks(self.layout)

    def stack(self, blobs: Sequence[bytes], numbers: Sequence[int], *, shape: tuple[int, int], dtype: str,
              encoding: str, series: int = 1) -> FrameStackHandle:
        """A handle to a slot holding ``blobs`` as frames ``numbers`` (in that order)."""
        if len(blobs) != len(numbers) or not 0 < len(blobs) <= self.layout.frame_stack_size:
            raise ValueError(f"{len(blobs)} blobs for {len(numbers)} frame numbers, "
                             f"in stacks of at most {self.layout.frame_stack_size}")
        slot = self.stacks.take_free_slot(0)
        if slot is None:
            raise RuntimeError("every slot is taken: release a stack first")
        base = slot * self.layout.slot_bytes
        records = np.frombuffer(self.stacks.buffer, FRAME_RECORD_DTYPE, count=len(blobs), offset=base)
        data = np.frombuffer(self.stacks.buffer, np.uint8, count=self.layout.data_bytes,
                             offset=base + self.layout.index_bytes)
        code = algorithm_of(encoding).code
        offset = 0
        for position, (number, blob) in enumerate(zip(numbers, blobs)):
            if offset + len(blob) > data.size:
                raise ValueError(f"the blobs do not fit a slot of {data.size} bytes")
            data[offset:offset + len(blob)] = np.frombuffer(blob, np.uint8)
            records[position] = (number, offset, len(blob), code, np.dtype(dtype).itemsize, 1, dtype_tag(dtype))
            offset = (offset + len(blob) + 7) & ~7
        del records, data
        self.stacks.mark(slot, SlotState.READY, expected=(SlotState.FILLING,))
        return FrameStackHandle(segment=self.stacks.name, slot=slot, layout=self.layout, frames=len(blobs),
                                first_frame=int(min(numbers)), last_frame=int(max(numbers)), series=series,
                                shape=tuple(shape), dtype=np.dtype(dtype).name, encoding=algorithm_of(encoding).value)

    def release(self, handle: FrameStackHandle) -> None:
        self.stacks.mark(handle.slot, SlotState.FREE, expected=(SlotState.READY, SlotState.IN_USE))

    def close(self) -> None:
        self.stacks.close()

    def __enter__(self) -> BlobStacks:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
