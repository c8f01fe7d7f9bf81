"""The compiled mask-weighted sums (bf, adf, com) against NumPy's convert-and-multiply, the path
LiberTEM's ApplyMasksUDF/CoMUDF take with dense masks: microseconds per frame, one thread.

    .venv/bin/python benchmarks/bench_mask_kernels.py
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
from libertem import masks

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tango_dectris_live.processing import _pixel_sums  # noqa: E402
from tango_dectris_live.processing.udfs import compact_weights  # noqa: E402

# (height, width, frames per tile (~4 MiB), pixel type): ARINA 96x96, QUADRO 512x512, EIGER2 1M
SHAPES = [(96, 96, 227, np.uint16), (512, 512, 8, np.uint16), (1062, 1028, 1, np.uint32)]


def best_us_per_frame(function, frames: int, repeats: int = 7, calls: int = 5) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(calls):
            function()
        best = min(best, (time.perf_counter() - started) / calls / frames * 1e6)
    return best


def main() -> None:
    rng = np.random.default_rng(0)
    for height, width, n, dtype in SHAPES:
        tile = rng.integers(0, 50, (n, height * width)).astype(dtype)
        cy, cx = height / 2, width / 2
        disk = masks.circular(centerX=cx, centerY=cy, imageSizeX=width, imageSizeY=height, radius=float("inf"))
        com = np.stack([disk, masks.gradient_y(width, height) * disk, masks.gradient_x(width, height) * disk])
        bf = masks.circular(centerX=cx, centerY=cy, imageSizeX=width, imageSizeY=height, radius=4)[None]
        float_type = np.result_type(np.float32, dtype)  # what LiberTEM converts the frames to
        for name, stack in (("com", com), ("bf", bf)):
            weights, lo = compact_weights(stack)
            dense = stack.reshape(len(stack), -1).T.astype(float_type)

            def ours(weights=weights, lo=lo):
                out = np.zeros((n, weights.shape[0]))
                _pixel_sums.add_weighted_sums(tile, weights, lo, out)
                return out

            def numpy_path(dense=dense):
                return tile.astype(float_type) @ dense

            if not np.allclose(ours(), tile.astype(np.float64) @ dense.astype(np.float64), rtol=1e-6):
                raise SystemExit(f"{name} {height}x{width}: compiled sums differ from float64")
            print(f"{height}x{width} {np.dtype(dtype).name} {name}: compiled {best_us_per_frame(ours, n):8.2f} us/frame, "
                  f"numpy {best_us_per_frame(numpy_path, n):8.2f} us/frame ({weights.shape[1]:,} of "
                  f"{height * width:,} pixels)")


if __name__ == "__main__":
    main()
