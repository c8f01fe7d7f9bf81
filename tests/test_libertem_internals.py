"""The LiberTEM internals live processing relies on (processing/libertem_internals.py), each
exercised against the installed LiberTEM: after a LiberTEM upgrade, a failure here names the
version and the internal that changed, before any live result goes wrong.

Every call into libertem_internals goes through a helper below that names its internal, so that a
test which needs several of them (run, merge, results) still says which one broke."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import pytest
from libertem.api import Context
from libertem.udf.base import UDF
from libertem.udf.com import CoMUDF
from libertem.udf.masks import ApplyMasksUDF
from libertem.udf.sum import SumUDF
from libertem.udf.sumsigudf import SumSigUDF

from tango_dectris_live.processing import libertem_internals as internals
from tango_dectris_live.processing.live_dataset import LiveDataSet
from tango_dectris_live.processing.udfs import ExactSumUDF

SCAN = (4, 6)
FRAME = (8, 10)
N = SCAN[0] * SCAN[1]

KWARGS = "UDF._kwargs (the constructor's keyword arguments)"
INPUT_DTYPE = "libertem.udf.base._get_dtype (the input dtype rule)"
ENVIRONMENT = "libertem.common.executor.Environment"
TILING = "TilingScheme.make_for_shape"
PART_RUNNER = "UDFPartRunner.run_for_partition / UDF.new_for_partition / UDFParams / BufferWrapper.raw_data"
ALLOCATE = "UDFMeta / UDF.init_result_buffers / UDF.allocate_for_full"
MERGE = "UDF.set_views_for_partition / UDFData.get_proxy / MergeAttrMapping"
RESULTS = "UDF._do_get_results / UDFMeta.set_valid_nav_mask"
PARTITION_SHAPE = "UDFMeta.partition_shape (ValueError without a partition)"
MASKS = "UDF.task_data.engine.masks (ApplyMasksEngine's MaskContainer)"
COM_SUMS = f"CoMUDF's private buffer {internals.COM_MASK_SUMS_BUFFER!r}"


@contextlib.contextmanager
def libertem_internal(name: str) -> Iterator[None]:
    """Whatever fails inside (LiberTEM raising, or an assertion on what it returned) is reported
    with the LiberTEM version and the internal ``name`` that no longer behaves as relied on."""
    try:
        yield
    except Exception as error:  # any failure: the point is to say which internal changed
        pytest.fail(f"LiberTEM {internals.LIBERTEM_VERSION}: {name} changed "
                    f"({type(error).__name__}: {error}); adapt tango_dectris_live/processing/libertem_internals.py "
                    f"and the libertem pin in setup.cfg")


def make_frames(seed: int = 1, dtype=np.uint16) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 500, size=(N, *FRAME)).astype(dtype)


def run_on(udfs: list[UDF], dataset: LiveDataSet, frames: np.ndarray, first: int, count: int) -> list[dict]:
    """The partial buffers of ``udfs`` over scan positions ``[first, first + count)``, in tiles of 5."""
    partition = dataset.partition_for_run(first, frames[first:first + count], count)
    with libertem_internal(KWARGS):
        kwargs = [internals.udf_constructor_kwargs(u) for u in udfs]
    with libertem_internal(TILING):
        tiling = internals.whole_frame_tiling(5, dataset.shape)
    with libertem_internal(ENVIRONMENT):
        env = internals.single_thread_environment()
    with libertem_internal(PART_RUNNER):
        return internals.run_udfs_on_partition([type(u) for u in udfs], kwargs, partition, tiling, env)


def allocate(udf: UDF, dataset: LiveDataSet, input_dtype: np.dtype) -> None:
    with libertem_internal(ALLOCATE):
        internals.allocate_full_results(udf, dataset, input_dtype)


def merge(udf: UDF, dataset: LiveDataSet, first: int, count: int, partial: dict) -> None:
    with libertem_internal(MERGE):
        internals.merge_partial(udf, dataset.partition_for_run(first, None, count), partial)


def results(udf: UDF, merged: np.ndarray) -> dict:
    with libertem_internal(RESULTS):
        return dict(internals.results_of(udf, merged))


def merged_results(udf: UDF, frames: np.ndarray, parts: list[tuple[int, int]]) -> dict[str, np.ndarray]:
    """``udf``'s results after the partitions ``parts`` were processed and merged, as live."""
    dataset = LiveDataSet(SCAN, FRAME, frames.dtype)
    with libertem_internal(INPUT_DTYPE):
        input_dtype = internals.udf_input_dtype(udf, frames.dtype)
    allocate(udf, dataset, input_dtype)
    merged = np.zeros(N, bool)
    for first, count in parts:
        (partial,) = run_on([udf], dataset, frames, first, count)
        merge(udf, dataset, first, count, partial)
        merged[first:first + count] = True
    return {name: np.asarray(buf.data) for name, buf in results(udf, merged).items()}


def libertem_results(udf: UDF, frames: np.ndarray) -> dict[str, np.ndarray]:
    """``udf`` run by LiberTEM itself (public API) over the whole scan."""
    context = Context.make_with("inline")
    try:
        dataset = context.load("memory", data=frames.reshape(*SCAN, *FRAME), sig_dims=2)
        return {name: np.asarray(buf.data) for name, buf in context.run_udf(dataset=dataset, udf=udf).items()}
    finally:
        context.close()


class _Parametrised(UDF):
    def __init__(self, radius: float, centre: tuple[float, float] = (0.0, 0.0)):
        super().__init__(radius=radius, centre=centre)


def test_udf_constructor_kwargs_recreate_the_udf():
    with libertem_internal(KWARGS):
        kwargs = internals.udf_constructor_kwargs(_Parametrised(3.0, centre=(1.0, 2.0)))
        assert kwargs == {"radius": 3.0, "centre": (1.0, 2.0)}
        recreated = _Parametrised(**kwargs)
        assert (recreated.params.radius, recreated.params.centre) == (3.0, (1.0, 2.0))


@pytest.mark.parametrize("raw", ["uint8", "uint16", "uint32", "int16", "float32", "float64"])
def test_udf_input_dtype_is_libertems_rule(raw):
    """The per-UDF pixel type equals the one LiberTEM's UDFRunner gives a UDF run alone."""
    from sparseconverter import NUMPY

    for udf in (SumUDF(), SumUDF(dtype=np.float64), SumSigUDF(), ExactSumUDF(),
                CoMUDF.with_params(cy=3.0, cx=4.5, r=3.0)):
        with libertem_internal(INPUT_DTYPE):
            from libertem.udf.base import _get_dtype

            expected = np.dtype(_get_dtype([udf], np.dtype(raw), None, (NUMPY,)))
            assert internals.udf_input_dtype(udf, np.dtype(raw)) == expected, type(udf).__name__


def test_single_thread_environment_limits_the_numeric_threads():
    with libertem_internal(ENVIRONMENT):
        env = internals.single_thread_environment()
        assert env.threads_per_worker == 1
        with env.enter():
            pass


def test_whole_frame_tiling_has_the_requested_depth():
    dataset = LiveDataSet(SCAN, FRAME, np.uint16)
    with libertem_internal(TILING):
        scheme = internals.whole_frame_tiling(7, dataset.shape)
        assert (scheme.depth, tuple(scheme.shape)) == (7, (7, *FRAME))
        assert len(scheme) == 1  # one tile covers every pixel of a frame


def test_run_udfs_on_partition_gives_partition_buffers():
    """UDFs run over a live partition (which also holds live_dataset.py's DataSet/Partition
    subclasses to LiberTEM's interface for data sets)."""
    frames = make_frames()
    dataset = LiveDataSet(SCAN, FRAME, frames.dtype)
    sums, per_frame = run_on([SumUDF(dtype=np.float64), SumSigUDF()], dataset, frames, 5, 11)
    with libertem_internal(PART_RUNNER):
        np.testing.assert_array_equal(sums["intensity"], frames[5:16].sum(axis=0))
        np.testing.assert_array_equal(per_frame["intensity"], frames[5:16].sum(axis=(1, 2)))


def test_allocate_full_results_gives_whole_scan_buffers():
    udf = SumSigUDF()
    allocate(udf, LiveDataSet(SCAN, FRAME, np.uint16), np.dtype(np.float32))
    with libertem_internal(ALLOCATE):
        assert udf.meta.input_dtype == np.float32
        assert udf.results.get_buffer("intensity").data.shape == SCAN


def test_merge_partial_places_a_partition_in_the_whole_scan():
    frames = make_frames(seed=2)
    udf = SumSigUDF()
    dataset = LiveDataSet(SCAN, FRAME, frames.dtype)
    allocate(udf, dataset, np.dtype(np.float32))
    (partial,) = run_on([SumSigUDF()], dataset, frames, 7, 9)
    merge(udf, dataset, 7, 9, partial)
    with libertem_internal(MERGE):
        merged = udf.results.get_buffer("intensity").data.reshape(-1)
        np.testing.assert_array_equal(merged[7:16], frames[7:16].sum(axis=(1, 2)))
        assert not merged[:7].any() and not merged[16:].any()


@pytest.mark.filterwarnings("ignore:'where' used without 'out'")  # LiberTEM 0.16's CoM in the reference run
@pytest.mark.parametrize("make_udf", [
    lambda: CoMUDF.with_params(cy=3.0, cx=4.5, r=3.0),
    lambda: ApplyMasksUDF(mask_factories=[lambda: np.ones(FRAME, np.float32)]),
    lambda: SumUDF(),
], ids=["com", "masks", "sum"])
def test_results_of_merged_parts_equal_libertems_own_run(make_udf):
    """Partitions run, merged and turned into results as live equal LiberTEM's Context.run_udf."""
    frames = make_frames(seed=3)
    live = merged_results(make_udf(), frames, [(0, 10), (10, 1), (11, N - 11)])
    reference = libertem_results(make_udf(), frames)
    with libertem_internal(RESULTS):
        assert set(live) == set(reference)
        for name in reference:
            np.testing.assert_allclose(live[name], reference[name], rtol=1e-6, err_msg=name)


def test_results_of_marks_only_merged_positions_valid():
    frames = make_frames(seed=4)
    udf = SumSigUDF()
    merged_results(udf, frames, [(2, 5)])
    merged = (np.arange(N) >= 2) & (np.arange(N) < 7)
    result = results(udf, merged)["intensity"]
    with libertem_internal(RESULTS):
        np.testing.assert_array_equal(np.asarray(result.valid_mask).reshape(-1), merged)
        np.testing.assert_array_equal(np.asarray(result.data).reshape(-1)[merged], frames[merged].sum(axis=(1, 2)))


class _PartitionFramesProbe(UDF):
    """Records partition_frame_count where its buffers are declared (worker and main side)."""

    seen: list[int | None] = []

    def get_result_buffers(self):
        with libertem_internal(PARTITION_SHAPE):
            _PartitionFramesProbe.seen.append(internals.partition_frame_count(self))
        return {"value": self.buffer(kind="nav", dtype=np.float32)}

    def process_frame(self, frame):
        self.results.value[:] = 1


def test_partition_frame_count_in_a_partition_and_for_the_whole_scan():
    frames = make_frames(seed=4)
    dataset = LiveDataSet(SCAN, FRAME, frames.dtype)
    _PartitionFramesProbe.seen.clear()
    run_on([_PartitionFramesProbe()], dataset, frames, 3, 6)
    allocate(_PartitionFramesProbe(), dataset, frames.dtype)
    with libertem_internal(PARTITION_SHAPE):
        assert _PartitionFramesProbe.seen == [6, None]


class _MaskProbe(CoMUDF):
    """CoMUDF recording its masks (dense_float32_masks) and its mask sums for each tile."""

    seen: list[tuple[np.ndarray | None, np.ndarray]] = []

    def process_tile(self, tile):
        super().process_tile(tile)
        with libertem_internal(MASKS):
            masks = internals.dense_float32_masks(self)
        with libertem_internal(COM_SUMS):
            sums = np.array(getattr(self.results, internals.COM_MASK_SUMS_BUFFER))
        _MaskProbe.seen.append((masks, sums))


def test_dense_masks_and_com_mask_sums_buffer():
    """CoMUDF's mask container holds its three masks, and its private buffer holds each frame's
    sums under them: what the compiled CoM (udfs.CompiledCoMUDF) writes in its place."""
    frames = make_frames(seed=5).astype(np.float32)
    dataset = LiveDataSet(SCAN, FRAME, frames.dtype)
    _MaskProbe.seen.clear()
    run_on([_MaskProbe.with_params(cy=3.0, cx=4.5, r=3.0)], dataset, frames, 0, 5)  # one tile of 5
    (masks, sums), = _MaskProbe.seen
    with libertem_internal(MASKS):
        assert masks is not None and masks.shape == (3, *FRAME) and masks.dtype == np.float32
    with libertem_internal(COM_SUMS):
        expected = frames[:5].reshape(5, -1).astype(np.float64) @ masks.reshape(3, -1).T
        np.testing.assert_allclose(sums, expected, rtol=1e-5)
