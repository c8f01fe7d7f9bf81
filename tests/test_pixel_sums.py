"""The compiled exact sums behind the built-in ``sum`` and ``sumsig`` analyses."""
import numpy as np
import pytest

from tango_dectris_live.processing import _pixel_sums
from tango_dectris_live.processing.udfs import ExactSumSigUDF, ExactSumUDF


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.uint32])
def test_add_frames_equals_an_exact_numpy_sum(dtype):
    rng = np.random.default_rng(1)
    frames = rng.integers(0, np.iinfo(dtype).max, size=(37, 5000), dtype=dtype, endpoint=True)
    acc = np.arange(5000, dtype=np.uint64)  # adds to what is there
    _pixel_sums.add_frames(frames, acc)
    assert np.array_equal(acc, np.arange(5000, dtype=np.uint64) + frames.sum(axis=0, dtype=np.uint64))


def test_add_frames_does_not_overflow_its_narrow_partial_sums():
    # 70,000 frames of the uint16 mask value: more than a uint32 partial sum holds (65,537 terms)
    frames = np.full((70_000, 3), 65535, np.uint16)
    acc = np.zeros(3, np.uint64)
    _pixel_sums.add_frames(frames, acc)
    assert acc.tolist() == [70_000 * 65535] * 3


def test_frame_totals_are_exact_for_frames_larger_than_a_partial_sum():
    frames = np.full((2, 512 * 512), 65535, np.uint16)  # 262,144 pixels: 4 uint32 partial sums each
    frames[1, -1] = 0
    totals = np.ones(2)
    _pixel_sums.add_frame_totals(frames, totals)
    assert totals.tolist() == [1 + 512 * 512 * 65535, 1 + (512 * 512 - 1) * 65535]


def test_shape_mismatches_are_refused():
    with pytest.raises(ValueError, match="accumulator of 4 pixels for frames of 5 pixels"):
        _pixel_sums.add_frames(np.zeros((2, 5), np.uint16), np.zeros(4, np.uint64))
    with pytest.raises(ValueError, match="3 totals for 2 frames"):
        _pixel_sums.add_frame_totals(np.zeros((2, 5), np.uint16), np.zeros(3))


@pytest.mark.parametrize("dtype", [np.uint16, np.int16, np.float32])
def test_sum_udfs_give_exact_results_for_every_pixel_type(dtype, tmp_path):
    """Unsigned pixels take the compiled path, signed and float ones NumPy's: same results."""
    from libertem.api import Context
    from libertem.executor.inline import InlineJobExecutor

    rng = np.random.default_rng(2)
    data = rng.integers(0, 3000, size=(4, 6, 16, 16)).astype(dtype)
    ctx = Context(executor=InlineJobExecutor())
    dataset = ctx.load("memory", data=data, sig_dims=2, num_partitions=3)
    total, per_frame = ctx.run_udf(dataset, [ExactSumUDF(), ExactSumSigUDF()])
    assert total["intensity"].data.dtype == np.float64
    assert np.array_equal(total["intensity"].data, data.sum(axis=(0, 1), dtype=np.float64))
    assert np.array_equal(per_frame["intensity"].data, data.sum(axis=(2, 3), dtype=np.float64))


def test_a_uint32_accumulator_holds_the_longest_partition_it_is_chosen_for():
    from tango_dectris_live.processing.udfs import _NARROW_COUNT_FRAMES

    frames = np.full((_NARROW_COUNT_FRAMES, 2), 65535, np.uint16)
    acc = np.zeros(2, np.uint32)
    _pixel_sums.add_frames(frames, acc)
    assert acc.tolist() == [_NARROW_COUNT_FRAMES * 65535] * 2  # 2**32 - 1 exactly: no wrap-around
