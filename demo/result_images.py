"""Result arrays as colour-mapped PNG files (numpy colour map, NaN in a colour of its own)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

# Anchor colours of matplotlib's "viridis" (dark blue → green → yellow), interpolated linearly.
_VIRIDIS_ANCHORS = np.array([
    (68, 1, 84), (72, 40, 120), (62, 74, 137), (49, 104, 142), (38, 130, 142),
    (31, 158, 137), (53, 183, 121), (109, 205, 89), (180, 222, 44), (253, 231, 37),
], dtype=np.float64)
# Red does not occur in viridis: a NaN (scan position without a frame) cannot be mistaken for data.
NAN_COLOUR = (255, 0, 0)
# Images smaller than this are enlarged (nearest neighbour) so that a 64×64 scan is visible.
_MIN_SIDE = 384
# Robust scaling: masked pixels (65535 in every frame) would otherwise flatten a summed pattern.
_LOW_PERCENTILE, _HIGH_PERCENTILE = 0.5, 99.5


def colour_mapped(image: np.ndarray) -> tuple[np.ndarray, tuple[float, float]]:
    """``image`` as (h, w, 3) uint8 RGB and the (low, high) data values mapped to the colour ends."""
    values = np.asarray(image, dtype=np.float64)
    if values.ndim != 2:
        raise ValueError(f"a result image must be 2-D, got shape {values.shape}")
    finite = np.isfinite(values)
    if finite.any():
        low, high = np.percentile(values[finite], [_LOW_PERCENTILE, _HIGH_PERCENTILE])
    else:
        low = high = 0.0
    span = high - low if high > low else 1.0
    scaled = np.clip((np.where(finite, values, low) - low) / span, 0.0, 1.0)
    positions = np.linspace(0.0, 1.0, len(_VIRIDIS_ANCHORS))
    rgb = np.stack([np.interp(scaled, positions, _VIRIDIS_ANCHORS[:, channel]) for channel in range(3)],
                   axis=-1)
    rgb = np.rint(rgb).astype(np.uint8)
    rgb[~finite] = NAN_COLOUR
    return rgb, (float(low), float(high))


def write_png(image: np.ndarray, path: Path) -> dict:
    """Write ``image`` colour-mapped to ``path``; return what a reader needs to interpret it."""
    rgb, (low, high) = colour_mapped(image)
    height, width = rgb.shape[:2]
    zoom = max(1, -(-_MIN_SIDE // max(1, min(height, width))))
    if zoom > 1:
        rgb = np.repeat(np.repeat(rgb, zoom, axis=0), zoom, axis=1)
    Image.fromarray(rgb).save(path)
    nan_count = int(np.count_nonzero(~np.isfinite(image)))
    return {"file": path.name, "shape": [height, width], "colour_low": low, "colour_high": high,
            "nan_pixels": nan_count}
