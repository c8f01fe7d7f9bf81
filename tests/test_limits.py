"""Every live-processing setting checked against this machine and the detector's frame."""
from __future__ import annotations

import pytest

from tango_dectris_live.processing.limits import (MachineLimits, SettingRefused, check_beam_center, check_nav_shape,
                                                  check_radii, check_tuning)

LIMITS = MachineLimits(cores=2, open_files_limit=1024, open_files=40, available_memory=8 << 30,
                       shared_memory_free=4 << 30)


def test_nav_shape_fits_the_published_image_and_the_memory():
    assert check_nav_shape([128, 128], 4, LIMITS) == (128, 128)
    assert check_nav_shape([], 4, LIMITS) is None
    with pytest.raises(SettingRefused, match="16384 x 16384"):
        check_nav_shape([20000, 20000], 1, LIMITS)
    with pytest.raises(SettingRefused, match="16384"):
        check_nav_shape([20000], 1, LIMITS)
    with pytest.raises(SettingRefused, match="memory"):
        check_nav_shape([16384, 16384], 8, LIMITS)  # 2.7e8 positions x 8 results x 3 copies
    with pytest.raises(SettingRefused, match="positive"):
        check_nav_shape([0, 3], 1, LIMITS)
    with pytest.raises(SettingRefused, match="1 to 3"):
        check_nav_shape([1, 2, 3, 4], 1, LIMITS)


def test_radii_are_ordered_and_inside_the_frame():
    check_radii(4, 6, 12, (96, 96))
    with pytest.raises(SettingRefused, match="smaller than"):
        check_radii(4, 12, 12)
    with pytest.raises(SettingRefused, match="diagonal"):
        check_radii(1e308, 6, 12, (96, 96))
    with pytest.raises(SettingRefused, match="finite"):
        check_radii(float("inf"), 6, 12)
    check_radii(1e6, 6, 12)  # frame not known yet: checked again at Start


def test_beam_center_lies_on_the_frame():
    assert check_beam_center([10.5, 20.0], (96, 128)) == (10.5, 20.0)
    assert check_beam_center([], (96, 128)) is None
    with pytest.raises(SettingRefused, match="outside the frame"):
        check_beam_center([1e308, 1e308], (96, 96))
    with pytest.raises(SettingRefused, match=r"\[x, y\]"):
        check_beam_center([1.0], None)


def test_tuning_against_the_frame_and_the_shared_memory():
    check_tuning(0, 0, 0, 0, (96, 96), "uint16", LIMITS)
    check_tuning(0, 0, 1, 1, (512, 512), "uint16", LIMITS)  # one-frame stacks hold a whole frame
    with pytest.raises(SettingRefused, match="num_slots = 1 refused"):
        check_tuning(1, 0, 0, 0)
    with pytest.raises(SettingRefused, match="bytes_per_frame = 1 refused"):
        check_tuning(0, 1, 0, 0)
    with pytest.raises(SettingRefused, match="at least one uncompressed frame"):
        check_tuning(0, 1024, 2, 0, (512, 512), "uint16", LIMITS)
    small = MachineLimits(cores=2, open_files_limit=1024, open_files=40, available_memory=1 << 30,
                          shared_memory_free=64 << 20)
    with pytest.raises(SettingRefused, match="/dev/shm"):
        check_tuning(1024, 0, 4096, 0, (96, 96), "uint16", small)
