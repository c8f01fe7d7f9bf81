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


# ---- mask-weighted sums (bf, adf, com) -------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.uint32])
@pytest.mark.parametrize("masks", [1, 2, 3])
def test_weighted_sums_equal_a_float64_matrix_product(dtype, masks):
    rng = np.random.default_rng(3)
    top = 255 if dtype == np.uint8 else 60_000
    frames = rng.integers(0, top, size=(9, 3001), dtype=dtype, endpoint=True)  # a tail after the lanes
    frames[0, 1500] = np.iinfo(dtype).max  # the mask value goes in like any other count
    weights = rng.random((masks, 2500), dtype=np.float32) - 0.25
    out = np.ones((9, masks))  # adds to what is there
    _pixel_sums.add_weighted_sums(frames, weights, 400, out)
    expected = 1 + frames[:, 400:2900].astype(np.float64) @ weights.T.astype(np.float64)
    assert np.allclose(out, expected, rtol=1e-6, atol=1e-3)


def test_weighted_sums_refuse_weights_beyond_the_frame():
    with pytest.raises(ValueError, match=r"weights for pixels \[3, 8\) of frames of 6 pixels"):
        _pixel_sums.add_weighted_sums(np.zeros((2, 6), np.uint16), np.zeros((1, 5), np.float32), 3, np.zeros((2, 1)))
    with pytest.raises(ValueError, match=r"out has shape \(2, 3\), needs \(2, 1\)"):
        _pixel_sums.add_weighted_sums(np.zeros((2, 6), np.uint16), np.zeros((1, 5), np.float32), 0, np.zeros((2, 3)))


def test_compact_weights_keep_only_the_masks_pixel_range():
    from tango_dectris_live.processing.udfs import compact_weights

    masks = np.zeros((2, 10, 12), np.float32)
    masks[0, 3, 5] = 1.0
    masks[1, 6, 2] = 2.0
    weights, lo = compact_weights(masks)
    assert lo == 3 * 12 + 5 and weights.shape == (2, 6 * 12 + 2 - lo + 1)
    assert weights[0, 0] == 1.0 and weights[1, -1] == 2.0 and weights.sum() == 3.0
    empty, lo = compact_weights(np.zeros((1, 4, 4), np.float32))
    assert empty.shape == (1, 0) and lo == 0


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.uint32, np.int16, np.float32])
def test_compiled_mask_udfs_equal_libertems(dtype, monkeypatch):
    """bf, adf and com through the compiled loop (unsigned pixels) or LiberTEM's code (the rest)
    give LiberTEM's ApplyMasksUDF/CoMUDF results, in the same types."""
    from tango_dectris_live.processing import udfs

    compiled_calls = []
    compiled = udfs._pixel_sums.add_weighted_sums
    monkeypatch.setattr(udfs._pixel_sums, "add_weighted_sums",
                        lambda *args: compiled_calls.append(args[1].shape) or compiled(*args))
    from libertem.api import Context
    from libertem.executor.inline import InlineJobExecutor
    from libertem.udf.com import CoMUDF
    from libertem.udf.masks import ApplyMasksUDF

    from tango_dectris_live.processing.analyses import AnalysisParameters, AnalysisRegistry
    from tango_dectris_live.processing.udfs import CompiledCoMUDF, CompiledMasksUDF

    rng = np.random.default_rng(4)
    data = rng.integers(0, 200, size=(5, 7, 40, 36)).astype(dtype)
    data[2, 3, 20, 18] = 100_000 if dtype == np.uint32 else 99  # a bright pixel inside the disk
    parameters = AnalysisParameters(beam_centre=(19.5, 17.0), bf_radius=5, adf_inner_radius=7,
                                    adf_outer_radius=15).resolved((40, 36))
    ours = AnalysisRegistry.discover().build(["bf", "adf", "com"], parameters, (40, 36))
    assert [type(s.udf) for s in ours] == [CompiledMasksUDF, CompiledMasksUDF, CompiledCoMUDF]
    reference = [ApplyMasksUDF(mask_factories=ours[0].udf.params.mask_factories, use_sparse=False,
                               mask_count=1, mask_dtype=np.float32),
                 ApplyMasksUDF(mask_factories=ours[1].udf.params.mask_factories, use_sparse=False,
                               mask_count=1, mask_dtype=np.float32),
                 CoMUDF.with_params(cy=19.5, cx=17.0)]
    ctx = Context(executor=InlineJobExecutor())
    dataset = ctx.load("memory", data=data, sig_dims=2, num_partitions=3)
    got = ctx.run_udf(dataset, [s.udf for s in ours])
    want = ctx.run_udf(dataset, reference)
    for mine, theirs in zip(got, want):
        for name in ("intensity", "field", "magnitude", "divergence", "curl"):
            if name in theirs:
                assert mine[name].data.dtype == theirs[name].data.dtype, name
                assert np.allclose(mine[name].data, theirs[name].data, rtol=2e-5, atol=1e-4), name
    assert np.any(got[0]["intensity"].data != 0) and np.any(got[1]["intensity"].data != 0)
    unsigned = np.dtype(dtype).kind == "u"
    assert bool(compiled_calls) == unsigned
    if unsigned:  # bf/adf: only the rows of the disk/ring; com (radius inf): every pixel, three masks
        assert (3, 40 * 36) in compiled_calls
        assert min(m for k, m in compiled_calls if k == 1) < 11 * 36
