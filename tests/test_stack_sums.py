"""The fused decode-and-sum path of the built-in exact sums (processing/stack_sums.py: the receiver's
``StackDecoder.decode_blocks`` handing decoded blocks to ``_pixel_sums.FrameSums``): bit for bit
against NumPy and against the LiberTEM path it replaces, with the LiberTEM path's errors."""
from __future__ import annotations

import dataclasses
import types

import dectris.compression
import numpy as np
import pytest

from tango_dectris_live.processing import _pixel_sums, runner, stack_sums
from tango_dectris_live.processing import result_slots as result_slots_module
from tango_dectris_live.processing.analyses import AnalysisParameters, AnalysisRegistry
from tango_dectris_live.processing.libertem_internals import (single_thread_environment, udf_constructor_kwargs,
                                                              udf_input_dtype)
from tango_dectris_live.processing.live_dataset import ReceiverFrameSource
from tango_dectris_live.processing.runner import FUSED_SUMS_ENV, LiveRunner
from tango_dectris_live.processing.snapshot import RunState
from tango_dectris_live.processing.stack_sums import StackSums
from tango_dectris_live.processing.udfs import ExactSumSigUDF, ExactSumUDF, fused_sum_roles
from tango_dectris_live.receiver import StreamReceiver, _stack_decode, decode_frames_into
from tango_dectris_live.receiver.native import function_addresses
from tango_dectris_live.stream import Algorithm, CorruptFrameError
from tango_dectris_live.testing.stream_producer import StreamProducer, random_frames
from tests.processing_fakes import ArrayFrameSource
from tests.test_receiver_stack_decode import BAD_BLOBS, FRAME, GOOD, ODD_SHAPE, _blob, frame_stack

DTYPES = ["uint8", "uint16", "uint32"]
ALGORITHMS = [Algorithm.BSLZ4, Algorithm.BSZSTD, Algorithm.LZ4, Algorithm.LZ4H5, Algorithm.NONE]


def numpy_sums(frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The exact sum over ``frames`` (uint64) and each frame's total (float64), by NumPy."""
    flat = frames.reshape(len(frames), -1).astype(np.uint64)
    return flat.sum(axis=0).reshape(frames.shape[1:]), flat.sum(axis=1).astype(np.float64)


def sample_frames(count: int, shape: tuple[int, int], dtype: str, seed: int) -> np.ndarray:
    """Sparse frames, one all zero and one all at the pixel type's maximum (the largest sums)."""
    frames = random_frames(count, shape, dtype, seed=seed)
    frames[1] = 0
    frames[2] = np.iinfo(dtype).max
    return frames


def fused(handle, positions, shape, dtype, counts_dtype=None, sums=True, totals=True):
    counts_dtype = counts_dtype or (np.uint64 if np.dtype(dtype).itemsize == 4 else np.uint32)
    counts = np.zeros(shape, counts_dtype) if sums else None
    per_frame = np.zeros(len(positions)) if totals else None
    StackSums.add(handle, np.asarray(positions), shape, dtype, counts, per_frame)
    return counts, per_frame


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [ODD_SHAPE, (96, 96), (3, 5)], ids=["67x131", "96x96", "3x5"])
def test_fused_sums_equal_numpy(algorithm, dtype, shape):
    """Every encoding, pixel type and frame size (a partial last bitshuffle block, < 8 leftover
    pixels, a frame smaller than one block of 8 pixels), frames in arrival order, some twice."""
    frames = sample_frames(6, shape, dtype, seed=4)
    order = [3, 0, 5, 1, 4, 2]
    blobs = [(n, _blob(frames[n], algorithm), algorithm.code, dtype) for n in order]
    with frame_stack(blobs, shape) as handle:
        positions = [0, 1, 2, 3, 4, 5, 2]  # stack positions; position 2 (frame 5) added twice
        counts, totals = fused(handle, positions, shape, dtype)
    chosen = frames[[order[p] for p in positions]]
    expected_counts, expected_totals = numpy_sums(chosen)
    np.testing.assert_array_equal(counts, expected_counts)
    np.testing.assert_array_equal(totals, expected_totals)


@pytest.mark.parametrize("dtype", ["uint8", "uint16"])
def test_narrow_pixels_into_a_uint64_sum_and_either_sum_alone(dtype):
    frames = sample_frames(9, ODD_SHAPE, dtype, seed=5)
    blobs = [(n, _blob(frames[n], Algorithm.BSLZ4), Algorithm.BSLZ4.code, dtype) for n in range(9)]
    expected_counts, expected_totals = numpy_sums(frames)
    with frame_stack(blobs, ODD_SHAPE) as handle:
        counts, totals = fused(handle, range(9), ODD_SHAPE, dtype, counts_dtype=np.uint64)
        np.testing.assert_array_equal(counts, expected_counts)
        np.testing.assert_array_equal(totals, expected_totals)
        counts, nothing = fused(handle, range(9), ODD_SHAPE, dtype, totals=False)
        assert nothing is None
        np.testing.assert_array_equal(counts, expected_counts)
        nothing, totals = fused(handle, range(9), ODD_SHAPE, dtype, sums=False)
        assert nothing is None
        np.testing.assert_array_equal(totals, expected_totals)


def test_sums_add_to_what_the_arrays_hold():
    frames = sample_frames(4, (16, 24), "uint16", seed=6)
    blobs = [(n, _blob(frames[n], Algorithm.BSLZ4), Algorithm.BSLZ4.code, "uint16") for n in range(4)]
    counts = np.full((16, 24), 7, np.uint32)
    totals = np.array([1.0, 2.0])
    with frame_stack(blobs, (16, 24)) as handle:
        StackSums.add(handle, np.array([3, 0]), (16, 24), "uint16", counts, totals)
    np.testing.assert_array_equal(counts, 7 + frames[3].astype(np.uint32) + frames[0])
    np.testing.assert_array_equal(totals, [1.0 + frames[3].sum(dtype=np.uint64), 2.0 + frames[0].sum(dtype=np.uint64)])


@pytest.mark.parametrize("block_bytes", [256, 1024, 8192, 1 << 20, 1 << 21])
def test_bitshuffle_block_sizes(block_bytes):
    """Block sizes up to 1 MiB go block by block; larger ones (and, in one stack, frames whose
    blocks differ from the first frame's) are decoded whole: the sums are the same."""
    shape = (300, 260)
    frames = sample_frames(4, shape, "uint16", seed=7)
    sizes = [block_bytes, block_bytes, 4096, block_bytes]
    blobs = [(n, _blob(frames[n], Algorithm.BSLZ4, sizes[n]), Algorithm.BSLZ4.code, "uint16") for n in range(4)]
    with frame_stack(blobs, shape) as handle:
        counts, totals = fused(handle, range(4), shape, "uint16")
    expected_counts, expected_totals = numpy_sums(frames)
    np.testing.assert_array_equal(counts, expected_counts)
    np.testing.assert_array_equal(totals, expected_totals)


@pytest.mark.parametrize("chunk_frames, group_rows", [(256, 4), (5, 3), (4, 4), (7, 1), (100, 70)])
def test_chunks_and_groups_of_frames(monkeypatch, chunk_frames, group_rows):
    """Frames are taken block after block in chunks and handed over in groups: remainders of both."""
    monkeypatch.setattr(stack_sums, "_CHUNK_FRAMES", chunk_frames)
    monkeypatch.setattr(stack_sums, "_GROUP_ROWS", group_rows)
    frames = sample_frames(83, (40, 52), "uint16", seed=8)
    blobs = [(n, _blob(frames[n], Algorithm.BSLZ4, 1024), Algorithm.BSLZ4.code, "uint16") for n in range(83)]
    positions = np.random.default_rng(8).permutation(83)
    with frame_stack(blobs, (40, 52)) as handle:
        counts, totals = fused(handle, positions, (40, 52), "uint16")
    expected_counts, expected_totals = numpy_sums(frames[positions])
    np.testing.assert_array_equal(counts, expected_counts)
    np.testing.assert_array_equal(totals, expected_totals)


def test_without_the_unshuffle_function_frames_are_decoded_whole():
    """A decoder given only dectris-compression's frame decoder (no ``bitshuf_decode_block``)
    hands whole frames over: the same sums."""
    names = ("compression_decompress_buffer", "LZ4_decompress_safe")
    decoder = _stack_decode.StackDecoder(function_addresses(dectris.compression.__file__, names, "test"))
    assert not decoder.decodes_blocks
    assert stack_sums._decoder().decodes_blocks
    frames = sample_frames(5, ODD_SHAPE, "uint16", seed=9)
    blobs = [(n, _blob(frames[n], Algorithm.BSLZ4), Algorithm.BSLZ4.code, "uint16") for n in range(5)]
    counts = np.zeros(ODD_SHAPE, np.uint32)
    totals = np.zeros(5)
    sums = _pixel_sums.FrameSums(np.uint16, counts.reshape(-1), totals)
    with frame_stack(blobs, ODD_SHAPE) as handle:
        layout = handle.layout
        start = handle.slot * layout.slot_bytes
        from tango_dectris_live.receiver.framestack import attach_segment
        decoder.decode_blocks(attach_segment(handle.segment), start, start + layout.index_bytes, handle.frames,
                              np.arange(5, dtype=np.int64), _stack_decode.PIXEL_TYPES["uint16"],
                              counts.size, 0, sums.sink, sums.context)
    expected_counts, expected_totals = numpy_sums(frames)
    np.testing.assert_array_equal(counts, expected_counts)
    np.testing.assert_array_equal(totals, expected_totals)


def test_multi_channel_frames_sum_their_first_channel():
    first, second = random_frames(2, (8, 16), "uint16", seed=7)
    blob = [_blob(first, Algorithm.BSLZ4), _blob(second, Algorithm.BSLZ4)]
    with frame_stack([(5, blob, Algorithm.BSLZ4.code, "uint16")], (8, 16)) as handle:
        counts, totals = fused(handle, [0], (8, 16), "uint16")
    np.testing.assert_array_equal(counts, first)
    assert totals[0] == first.sum()


@pytest.mark.parametrize("case", sorted(BAD_BLOBS))
def test_bad_frame_raises_the_decoders_error_with_its_frame_number(case):
    """The error decode_frames_into gives for the frame (the LiberTEM path's error)."""
    algorithm, bad, error, message = BAD_BLOBS[case]
    blobs = [(40, GOOD, Algorithm.BSLZ4.code, "uint16"), (41, bad, algorithm.code, "uint16")]
    with frame_stack(blobs, (32, 32)) as handle:
        with pytest.raises(error, match=f"frame 41: .*{message}"):
            fused(handle, [0, 1], (32, 32), "uint16")
        counts, totals = fused(handle, [0], (32, 32), "uint16")  # the good frame alone is fine
    np.testing.assert_array_equal(counts, FRAME)


def test_a_damaged_later_block_is_reported_too():
    """A bslz4 frame whose first blocks decode and a later block does not."""
    frames = random_frames(2, (300, 260), "uint16", seed=10)
    good = _blob(frames[1], Algorithm.BSLZ4)
    damaged = bytearray(good)
    damaged[len(good) // 2:] = bytes([0xFF]) * (len(good) - len(good) // 2)
    blobs = [(0, _blob(frames[0], Algorithm.BSLZ4), Algorithm.BSLZ4.code, "uint16"),
             (1, bytes(damaged), Algorithm.BSLZ4.code, "uint16")]
    with frame_stack(blobs, (300, 260)) as handle:
        with pytest.raises(CorruptFrameError, match="frame 1: bslz4 data could not be decompressed"):
            fused(handle, [0, 1], (300, 260), "uint16")
        with pytest.raises(CorruptFrameError, match="frame 1"):
            decode_frames_into(handle, 0, 2, np.zeros((2, 300, 260), np.uint16))


def test_frames_of_another_pixel_type_are_refused_before_anything_is_added():
    frames = sample_frames(3, (16, 24), "uint16", seed=11)
    blobs = [(0, _blob(frames[0], Algorithm.BSLZ4), Algorithm.BSLZ4.code, "uint16"),
             (1, _blob(frames[1].astype(np.uint32), Algorithm.BSLZ4), Algorithm.BSLZ4.code, "uint32"),
             (2, _blob(frames[2], Algorithm.BSLZ4), Algorithm.BSLZ4.code, "uint16")]
    with frame_stack(blobs, (16, 24)) as handle:
        assert StackSums.accepts(handle, 0, 1, "uint16") and StackSums.accepts(handle, 2, 3, "uint16")
        assert not StackSums.accepts(handle, 0, 3, "uint16")
        assert not StackSums.accepts(handle, 0, 1, "int16")  # signed pixels go through LiberTEM
        assert not StackSums.accepts(handle, 0, 1, "float32")
        counts = np.zeros((16, 24), np.uint32)
        with pytest.raises(ValueError, match="frame 1 has pixel type tag 70"):
            StackSums.add(handle, np.arange(3), (16, 24), "uint16", counts, None)
        assert not counts.any()
        with pytest.raises(IndexError, match="stack position 3 is outside the stack of 3 frames"):
            StackSums.add(handle, np.array([3]), (16, 24), "uint16", counts, None)
        with pytest.raises(ValueError, match="counts of shape"):
            StackSums.add(handle, np.arange(1), (16, 25), "uint16", counts, None)
        with pytest.raises(TypeError, match="32-bit pixels need a uint64"):
            StackSums.add(handle, np.arange(1, 2), (16, 24), "uint32", counts, None)
    assert not StackSums.accepts(object(), 0, 0, "uint16")  # not a receiver stack: the LiberTEM path


def test_frame_sums_refuse_what_they_cannot_add_exactly():
    with pytest.raises(TypeError, match="unsigned 8/16/32-bit"):
        _pixel_sums.FrameSums(np.int16, np.zeros(4, np.uint64), None)
    with pytest.raises(TypeError, match="uint32 or uint64"):
        _pixel_sums.FrameSums(np.uint16, np.zeros(4, np.float64), None)
    with pytest.raises(ValueError, match="counts, totals or both"):
        _pixel_sums.FrameSums(np.uint16, None, None)
    sums = _pixel_sums.FrameSums(np.uint8, np.zeros(12, np.uint32), np.zeros(3))
    assert (sums.pixels, sums.frames) == (12, 3) and sums.sink and sums.context


# ---------------------------------------------------------------------------------------------
# In the runner: the same partition buffers as LiberTEM's run of the two UDFs

SCAN = (8, 10)


def sum_spec(names: list[str], shape: tuple[int, int], dtype: str, frames_per_partition: int = 1 << 30):
    """The worker's spec for ``names`` over the receiver's stacks (fused where it applies)."""
    udfs = [s.udf for s in AnalysisRegistry.discover().build(names, AnalysisParameters(), shape)]
    input_dtype = udf_input_dtype(udfs[0], np.dtype(dtype))
    return runner._SeriesSpec(
        run_id=1, udf_classes=[type(u) for u in udfs], udf_kwargs=[udf_constructor_kwargs(u) for u in udfs],
        scan_shape=SCAN, frame_shape=shape, raw_dtype=np.dtype(dtype).str,
        dtype_groups=[(input_dtype.str, list(range(len(udfs))))], tile_depth=3,
        decode_frames_into=decode_frames_into, frames_per_partition=frames_per_partition,
        fused_sums=runner._fused_sums(udfs, ReceiverFrameSource))


def assert_same_partials(fused_runs, libertem_runs):
    assert [(r.first_frame, r.count) for r in fused_runs] == [(r.first_frame, r.count) for r in libertem_runs]
    for mine, theirs in zip(fused_runs, libertem_runs):
        assert len(mine.buffers) == len(theirs.buffers)
        for a, b in zip(mine.buffers, theirs.buffers):
            assert a.keys() == b.keys()
            for name in a:
                assert (a[name].dtype, a[name].shape) == (b[name].dtype, b[name].shape), name
                np.testing.assert_array_equal(a[name], b[name], err_msg=name)


STACKS = {
    "in order": list(range(10, 30)),
    "a gap": [*range(0, 7), *range(9, 20)],
    "out of order, twice, outside the scan": [5, 3, 4, 4, 90, 6, 2, -1, 12, 11, 3, 13],
}


@pytest.mark.parametrize("names", [["sum", "sumsig"], ["sumsig", "sum"], ["sum"], ["sumsig"]])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("stack", sorted(STACKS))
def test_fused_partitions_equal_libertems(monkeypatch, names, dtype, stack):
    added = []
    add = StackSums.add
    monkeypatch.setattr(StackSums, "add", staticmethod(lambda *args: (added.append(len(args[1])), add(*args))[1]))
    shape = (12, 20)
    frames = sample_frames(100, shape, dtype, seed=12)
    numbers = STACKS[stack]
    blobs = [(n, _blob(frames[n % 100], Algorithm.BSLZ4), Algorithm.BSLZ4.code, dtype) for n in numbers]
    env = single_thread_environment()
    for frames_per_partition in (1 << 30, 3):
        spec = sum_spec(names, shape, dtype, frames_per_partition)
        assert spec.fused_sums is not None
        without = dataclasses.replace(spec, fused_sums=None)
        with frame_stack(blobs, shape) as handle:
            for begin, end in ((0, len(numbers)), (2, len(numbers) - 1)):
                added.clear()
                fused_runs, fused_outside = runner._process_stack(spec, handle, env, begin, end)
                assert sum(added) == sum(r.count for r in fused_runs) > 0  # the fused path did it all
                added.clear()
                libertem_runs, libertem_outside = runner._process_stack(without, handle, env, begin, end)
                assert not added
                assert fused_outside == libertem_outside
                assert_same_partials(fused_runs, libertem_runs)


def test_the_fused_path_is_for_the_built_in_sums_alone(monkeypatch, tmp_path):
    sums = [ExactSumUDF(), ExactSumSigUDF()]
    assert fused_sum_roles(sums) == ("sum", "sumsig")
    assert fused_sum_roles(sums[::-1]) == ("sumsig", "sum")

    class FacilitySum(ExactSumUDF):
        """A facility's own variant: it may compute something else, so LiberTEM runs it."""

    assert fused_sum_roles([FacilitySum(), ExactSumSigUDF()]) is None
    bf = AnalysisRegistry.discover().build(["bf"], AnalysisParameters(), (32, 32))[0].udf
    assert fused_sum_roles([*sums, bf]) is None
    assert fused_sum_roles([]) is None
    assert runner._fused_sums(sums, ReceiverFrameSource).stack_sums is StackSums

    # a wrapper of the receiver's source that passes its decoder on (as the benchmarks' does)
    wrapped = types.SimpleNamespace(decode_frames_into=ReceiverFrameSource(None).decode_frames_into)
    assert runner._fused_sums(sums, wrapped) is not None
    assert runner._fused_sums(sums, ArrayFrameSource(tmp_path)) is None  # not the receiver's stacks
    monkeypatch.setenv(FUSED_SUMS_ENV, "off")
    assert runner._fused_sums(sums, ReceiverFrameSource) is None


@pytest.mark.parametrize("dtype, result_slots", [("uint16", 8), ("uint32", 8), ("uint16", 2)],
                         ids=["uint16", "uint32", "uint16-2-result-slots"])
def test_live_series_through_the_receiver_is_exact(monkeypatch, dtype, result_slots):
    """Receiver, worker processes and the fused path: frames out of order, two never sent; the
    counts come back in the result slots (with only 2, some stacks find none free and send theirs
    as arrays), every slot lent is given back."""
    shape = (24, 40)
    counts_bytes = shape[0] * shape[1] * (8 if dtype == "uint32" else 4)
    monkeypatch.setattr(result_slots_module, "_ARENA_BYTES", result_slots * counts_bytes)
    count = SCAN[0] * SCAN[1]
    frames = sample_frames(count, shape, dtype, seed=13)
    order = np.random.default_rng(13).permutation(count)
    order = [int(n) for n in order if n not in (7, 41)]
    with StreamProducer(1) as producer, StreamReceiver(
            producer.endpoint, stream_version=1, frame_shape=shape, dtype=dtype, frame_stack_size=8,
            num_slots=4) as receiver, LiveRunner(workers=2) as live:
        receiver.arm(3)
        run = live.process(ReceiverFrameSource(receiver), ["sum", "sumsig"], nav_shape=SCAN)
        producer.send_all(producer.series(3, frames, "bslz4", order=order))
        snapshot = run.wait(timeout=60)
        assert live.pool._result_slots.count == result_slots
        assert live.pool.slots_lent == 0  # every slot lent came back
    assert snapshot.state is RunState.FINISHED
    assert (snapshot.frames_processed, snapshot.frames_missing) == (count - 2, 2)
    received = np.ones(count, bool)
    received[[7, 41]] = False
    expected_counts, expected_totals = numpy_sums(frames[received])
    np.testing.assert_array_equal(snapshot.buffers["sum_image"], expected_counts.astype(np.float64))
    totals = np.full(count, np.nan)
    totals[received] = numpy_sums(frames)[1][received]
    np.testing.assert_array_equal(snapshot.buffers["sumsig_image"], totals.reshape(SCAN))


def _write_in_a_slot(name: str, slot_bytes: int) -> None:
    counts = result_slots_module.slot_array(name, slot_bytes, 1, np.uint32, (3, 5))
    counts[...] = np.arange(15, dtype=np.uint32).reshape(3, 5)


def test_result_slots_are_shared_with_a_worker_process():
    import multiprocessing

    slots = result_slots_module.ResultSlots(3 * 5 * 4, 2)
    try:
        assert slots.slot_bytes == 64  # slots start on cache lines
        process = multiprocessing.get_context("spawn").Process(target=_write_in_a_slot,
                                                                args=(slots.name, slots.slot_bytes))
        process.start()
        process.join(30)
        assert process.exitcode == 0
        seen = slots.array(result_slots_module.SlotCounts(1, "<u4", (3, 5)))
        np.testing.assert_array_equal(seen, np.arange(15).reshape(3, 5))
        assert not slots.array(result_slots_module.SlotCounts(0, "<u4", (3, 5))).any()
        with pytest.raises(ValueError, match="do not fit slot 1"):
            slots.array(result_slots_module.SlotCounts(1, "<u8", (3, 5)))
        del seen
    finally:
        slots.close()
    assert result_slots_module.slot_array(slots.name, 64, 0, np.uint32, (3, 5)) is None  # gone: arrays
    assert result_slots_module.ResultSlots.for_counts(40 << 20, 8) is None  # not two in 64 MiB
