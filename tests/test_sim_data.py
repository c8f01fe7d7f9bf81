"""The synthetic 4D-STEM data generator: determinism, a moving disk, masked pixels."""
from __future__ import annotations

import numpy as np
import pytest

from sim.data import ScanDataGenerator, default_nav_shape


def centre_of_mass(frame: np.ndarray) -> tuple[float, float]:
    yy, xx = np.indices(frame.shape)
    weights = frame.astype(np.float64)
    return float((yy * weights).sum() / weights.sum()), float((xx * weights).sum() / weights.sum())


def test_same_seed_same_frames_other_seed_other_frames():
    a = ScanDataGenerator(64, 48, "uint16", nav_shape=(4, 4), seed=5, pool_size=8)
    b = ScanDataGenerator(64, 48, "uint16", nav_shape=(4, 4), seed=5, pool_size=8)
    c = ScanDataGenerator(64, 48, "uint16", nav_shape=(4, 4), seed=6, pool_size=8)
    for k in range(16):
        np.testing.assert_array_equal(a.frame(k), b.frame(k))
    assert not np.array_equal(a.frame(3), c.frame(3))


def test_disk_centre_moves_across_the_scan():
    gen = ScanDataGenerator(96, 96, "uint16", nav_shape=(8, 8), seed=1, dose=200, pool_size=32)
    mask = gen.pixel_mask() > 0
    left = np.where(mask, 0, gen.frame(0 * 8 + 0))  # first column of the scan
    right = np.where(mask, 0, gen.frame(0 * 8 + 7))  # last column
    assert centre_of_mass(right)[1] - centre_of_mass(left)[1] > 2.0
    # the virtual bright-field signal changes with the object too
    assert gen.sum_per_frame([0])[0] != gen.sum_per_frame([7])[0]


def test_masked_pixels_have_the_mask_value():
    gen = ScanDataGenerator(32, 32, "uint8", nav_shape=(2, 2), pool_size=2)
    ys, xs = gen.masked_pixels[:, 0], gen.masked_pixels[:, 1]
    assert len(ys) > 0 and (gen.frame(1)[ys, xs] == 255).all()
    assert (gen.frame(1)[gen.pixel_mask() == 0] < 255).all()
    zero = ScanDataGenerator(32, 32, "uint32", nav_shape=(2, 2), pool_size=2, mask_to_zero=True)
    assert (zero.frame(0)[zero.masked_pixels[:, 0], zero.masked_pixels[:, 1]] == 0).all()


def test_pool_mapping_and_aggregates_are_exact():
    gen = ScanDataGenerator(20, 16, "uint16", nav_shape=(5, 6), pool_size=7)
    frames = range(3, 27)
    expected = sum(gen.frame(k).astype(np.uint64) for k in frames)
    np.testing.assert_array_equal(gen.sum_frames(frames), expected)
    np.testing.assert_array_equal(gen.sum_per_frame(frames), [gen.frame(k).sum(dtype=np.uint64) for k in frames])
    assert gen.frame(30 + 4) is gen.frame(4)  # beyond the scan it wraps around
    assert set(gen.pool_index(np.arange(30))) <= set(range(7))


def test_bad_parameters_are_refused():
    with pytest.raises(ValueError, match="uint8"):
        ScanDataGenerator(16, 16, "float32")
    with pytest.raises(ValueError, match="dose"):
        ScanDataGenerator(16, 16, dose=0)
    with pytest.raises(ValueError, match="nav_shape"):
        ScanDataGenerator(16, 16, nav_shape=(0, 4))


def test_default_nav_shape():
    assert default_nav_shape(64) == (8, 8)
    assert default_nav_shape(10) == (1, 10)
