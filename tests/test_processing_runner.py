"""Live processing in worker processes: results against offline NumPy, missing frames, stop,
abort, custom analyses, snapshots."""
from __future__ import annotations

import queue
import types

import numpy as np
import pytest

import tango_dectris_live.processing.runner as runner_module
from tango_dectris_live.processing import analyses
from tango_dectris_live.processing.analyses import AnalysisParameters, AnalysisRegistry
from tango_dectris_live.processing.libertem_internals import (single_thread_environment, udf_constructor_kwargs,
                                                              udf_input_dtype)
from tango_dectris_live.processing.runner import LiveRunner
from tango_dectris_live.processing.snapshot import RunState
from tango_dectris_live.testing import wait_for
from tests.processing_fakes import ArrayFrameSource, make_frame_max_udf

SCAN = (16, 16)
FRAME = (32, 32)
N = SCAN[0] * SCAN[1]
PARAMETERS = AnalysisParameters(beam_centre=(15.0, 17.5), bf_radius=5, adf_inner_radius=7, adf_outer_radius=14)
ALL = ["sum", "sumsig", "bf", "adf", "com", "last_frame"]


@pytest.fixture(scope="module", params=[1, 2], ids=["1worker", "2workers"])
def runner(request):
    with LiveRunner(workers=request.param) as live_runner:
        yield live_runner


@pytest.fixture
def source(tmp_path):
    frame_source = ArrayFrameSource(tmp_path)
    yield frame_source
    assert not frame_source.outstanding, "every stack handed out must be released"


def make_frames(seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(1, 200, size=(N, *FRAME), dtype=np.uint16)


def offline(frames: np.ndarray, received: np.ndarray) -> dict[str, np.ndarray]:
    """The analyses computed with NumPy alone; positions not received are NaN."""
    y, x = np.ogrid[:FRAME[0], :FRAME[1]]
    cy, cx = PARAMETERS.beam_centre
    r2 = (y - cy) ** 2 + (x - cx) ** 2
    disk = r2 <= PARAMETERS.bf_radius ** 2
    ring = (r2 <= PARAMETERS.adf_outer_radius ** 2) & ~(r2 <= PARAMETERS.adf_inner_radius ** 2)
    f = frames.astype(np.float64)
    total = f.sum(axis=(1, 2))
    per_position = {
        "sumsig_image": total,
        "bf_image": (f * disk).sum(axis=(1, 2)),
        "adf_image": (f * ring).sum(axis=(1, 2)),
        "com_y_image": (f * y).sum(axis=(1, 2)) / total - cy,
        "com_x_image": (f * x).sum(axis=(1, 2)) / total - cx,
    }
    result = {}
    for name, values in per_position.items():
        values = values.copy()
        values[~received] = np.nan
        result[name] = values.reshape(SCAN)
    result["sum_image"] = f[received].sum(axis=0)
    result["last_frame"] = f[np.flatnonzero(received)[-1]]
    return result


def assert_matches_offline(snapshot, frames, received):
    expected = offline(frames, received)
    assert set(snapshot.buffers) == set(expected)
    # integer sums are exact in float32 at these magnitudes
    for exact in ("sum_image", "sumsig_image", "bf_image", "adf_image", "last_frame"):
        np.testing.assert_array_equal(snapshot.buffers[exact], expected[exact], err_msg=exact)
    for approx in ("com_x_image", "com_y_image"):
        np.testing.assert_allclose(snapshot.buffers[approx], expected[approx], rtol=1e-4, atol=1e-4,
                                   err_msg=approx)


def arrival_order(seed: int = 2) -> list[int]:
    """Frame numbers roughly in order, shuffled within blocks (as a real stream can deliver)."""
    order = np.arange(N)
    rng = np.random.default_rng(seed)
    for start in range(0, N, 24):
        rng.shuffle(order[start:start + 24])
    return order.tolist()


def test_all_analyses_equal_offline_numpy(runner, source):
    frames = make_frames()
    run = runner.process(source, ALL, PARAMETERS, nav_shape=SCAN)
    source.begin_series(7, frames)
    source.send_frames(arrival_order(), stack_size=20)
    source.finish_series()
    snapshot = run.wait(timeout=60)
    assert snapshot.state is RunState.FINISHED
    assert (snapshot.series, snapshot.frames_processed, snapshot.frames_missing) == (7, N, 0)
    assert snapshot.done.all()
    assert_matches_offline(snapshot, frames, np.ones(N, bool))


def test_missing_frames_are_nan_and_counted(runner, source):
    frames = make_frames(seed=3)
    missing = [0, 17, 18, 100, N - 1]
    received = np.ones(N, bool)
    received[missing] = False
    run = runner.process(source, ALL, PARAMETERS, nav_shape=SCAN)
    source.begin_series(8, frames)
    source.send_frames([n for n in range(N) if received[n]], stack_size=32)
    source.finish_series(missing)
    snapshot = run.wait(timeout=60)
    assert snapshot.state is RunState.FINISHED
    assert (snapshot.frames_processed, snapshot.frames_missing, snapshot.frames_dropped) == (N - 5, 5, 5)
    np.testing.assert_array_equal(snapshot.done.ravel(), received)
    for name in ("sumsig_image", "bf_image", "adf_image", "com_x_image", "com_y_image"):
        np.testing.assert_array_equal(np.flatnonzero(np.isnan(snapshot.buffers[name])), missing, err_msg=name)
    assert_matches_offline(snapshot, frames, received)


@pytest.mark.parametrize("order", ["increasing", "shuffled"])
def test_native_dtype_analyses_decode_tile_by_tile_or_whole_stacks(runner, source, order, monkeypatch):
    """Analyses that all take the native pixels, stacks in increasing order: tiles (here one
    frame each) are decoded as the UDFs read them; shuffled stacks are decoded whole and
    sorted. Same results."""
    monkeypatch.setattr(runner_module, "tile_bytes", lambda udfs: 1)
    frames = make_frames(seed=5)
    missing = [3, 4, 5, 130]
    received = np.ones(N, bool)
    received[missing] = False
    arrived = [n for n in (range(N) if order == "increasing" else arrival_order(seed=6)) if received[n]]
    run = runner.process(source, ["sum", "sumsig", "last_frame"], PARAMETERS, nav_shape=SCAN)
    source.begin_series(10, frames)
    source.send_frames(arrived, stack_size=50)
    source.finish_series(missing)
    snapshot = run.wait(timeout=60)
    assert (snapshot.state, snapshot.frames_processed, snapshot.frames_missing) == (RunState.FINISHED, N - 4, 4)
    expected = offline(frames, received)
    for name in ("sum_image", "sumsig_image", "last_frame"):
        np.testing.assert_array_equal(snapshot.buffers[name], expected[name], err_msg=name)


@pytest.mark.parametrize("order", ["increasing", "shuffled"])
def test_a_stack_that_finds_workers_idle_is_shared_between_them(runner, source, order):
    """Processing that keeps up (each stack arrives after the previous one is done): every
    stack is split into one part per idle worker, each part merged on its own, each slot
    released once, after its last part; the results are those of whole stacks."""
    frames = make_frames(seed=11)
    missing = [1, 64, 200]
    received = np.ones(N, bool)
    received[missing] = False
    arrived = [n for n in (range(N) if order == "increasing" else arrival_order(seed=12)) if received[n]]
    run = runner.process(source, ALL, PARAMETERS, nav_shape=SCAN)
    source.begin_series(12, frames)
    stacks = 0
    for start in range(0, len(arrived), 64):
        source.send_stack(arrived[start:start + 64])
        stacks += 1
        done = min(len(arrived), start + 64)
        wait_for(lambda: run.counters()[1] == done and not source.outstanding, timeout=30,
                 what=f"stack {stacks} processed and released")
    source.finish_series(missing)
    snapshot = run.wait(timeout=60)
    assert (snapshot.state, snapshot.frames_processed, snapshot.frames_missing) == (RunState.FINISHED, N - 3, 3)
    assert snapshot.stacks_merged == stacks * runner.pool.size  # every worker took a part of each
    assert len(source.released) == stacks
    assert_matches_offline(snapshot, frames, received)


def test_parts_of_a_stack_add_up_to_the_whole(tmp_path):
    """_process_stack over positions [begin, end) in pieces gives the whole stack's partial
    results, for stacks in increasing order (decoded tile by tile) and shuffled (decoded whole)."""
    frames = make_frames(seed=13)
    source = ArrayFrameSource(tmp_path)
    source.begin_series(1, frames)
    udfs = [selected.udf for selected in AnalysisRegistry.discover().build(["sum", "sumsig"], PARAMETERS, FRAME)]
    spec = _series_spec(source, udfs)
    env = single_thread_environment()
    for numbers in (list(range(40, 100)), arrival_order(seed=14)[:60]):
        stack = source.send_stack(numbers)
        pieces = []
        for begin, end in ((0, 25), (25, 26), (26, 60)):
            runs, out_of_scan = runner_module._process_stack(spec, stack, env, begin, end)
            assert out_of_scan == 0
            pieces += runs
        placed = sorted(first + k for first, count, _ in pieces for k in range(count))
        assert placed == sorted(numbers)
        total = sum(buffers[0]["counts"].astype(np.float64) for _, _, buffers in pieces)  # the exact sum
        np.testing.assert_array_equal(total, frames[numbers].astype(np.float64).sum(axis=0))
        per_frame = {first + k: value for first, count, buffers in pieces
                     for k, value in enumerate(buffers[1]["intensity"])}  # sumsig, per frame
        assert per_frame == {n: float(frames[n].astype(np.float64).sum()) for n in numbers}
        source.release(stack)


def _series_spec(source: ArrayFrameSource, udfs: list, run_id: int = 1) -> runner_module._SeriesSpec:
    """What a worker gets for a series of uint16 frames analysed by ``udfs`` (one input dtype)."""
    return runner_module._SeriesSpec(
        run_id=run_id, udf_classes=[type(u) for u in udfs], udf_kwargs=[udf_constructor_kwargs(u) for u in udfs],
        scan_shape=SCAN, frame_shape=FRAME, raw_dtype="<u2",
        dtype_groups=[(udf_input_dtype(udfs[0], np.dtype("<u2")).str, list(range(len(udfs))))], tile_depth=7,
        decode_frames_into=source.decode_frames_into, frames_per_partition=1 << 30)


def test_a_worker_answers_every_stack_with_one_outcome(tmp_path):
    """The worker loop (in this process): a stack of its series is done, one of a cancelled run
    or before any series is skipped, one whose analysis raises failed; ``None`` ends the loop."""
    import cloudpickle

    from tests.processing_fakes import BrokenUDF

    source = ArrayFrameSource(tmp_path)
    source.begin_series(1, make_frames(seed=15))
    stack = source.send_stack(range(10, 30))
    sumsig = AnalysisRegistry.discover().build(["sumsig"], PARAMETERS, FRAME)[0].udf
    tasks, results = queue.Queue(), queue.Queue()
    active_run = types.SimpleNamespace(value=1)
    for message in (runner_module.ProcessStack(1, 0, stack),  # no series yet
                    runner_module.BeginSeries(cloudpickle.dumps(_series_spec(source, [sumsig], run_id=1))),
                    runner_module.ProcessStack(1, 1, stack, 0, 12),
                    runner_module.ProcessStack(0, 2, stack),  # an earlier run's stack
                    runner_module.BeginSeries(cloudpickle.dumps(_series_spec(source, [BrokenUDF()], run_id=1))),
                    runner_module.ProcessStack(1, 3, stack),
                    None):
        tasks.put(message)
    runner_module._serve_tasks(tasks, results, active_run, single_thread_environment())
    outcomes = [results.get_nowait() for _ in range(results.qsize())]
    assert [type(o) for o in outcomes] == [runner_module.StackSkipped, runner_module.StackDone,
                                           runner_module.StackSkipped, runner_module.StackFailed]
    assert [(o.run_id, o.seq) for o in outcomes] == [(1, 0), (1, 1), (0, 2), (1, 3)]
    done = outcomes[1]
    assert done.out_of_scan == 0 and [(r.first_frame, r.count) for r in done.runs] == [(10, 12)]
    assert outcomes[3].error.startswith("ZeroDivisionError: broken analysis")
    source.release(stack)


def test_frames_outside_the_scan_are_counted_not_placed(runner, source):
    frames = make_frames(seed=4)
    run = runner.process(source, ["sumsig"], PARAMETERS, nav_shape=SCAN)
    source.begin_series(9, frames)
    source.send_frames(list(range(N)), stack_size=64)
    source.send_stack([N, N + 5, N])  # beyond the announced images (bad frame numbers)
    source.finish_series()
    snapshot = run.wait(timeout=60)
    assert snapshot.state is RunState.FINISHED
    assert (snapshot.frames_processed, snapshot.frames_out_of_scan) == (N, 3)
    np.testing.assert_array_equal(snapshot.buffers["sumsig_image"].ravel(),
                                  frames.astype(np.float64).sum(axis=(1, 2)))


@pytest.mark.parametrize("how", ["stop", "abort"])
def test_stop_or_abort_mid_series_then_a_full_series(runner, source, how):
    frames = make_frames(seed=5)
    run = runner.process(source, ["sum", "sumsig"], PARAMETERS, nav_shape=SCAN)
    source.begin_series(10, frames)
    source.send_frames(list(range(64)), stack_size=16)
    wait_for(lambda: run.snapshot().frames_processed == 64, what="the first 64 frames processed")
    getattr(run, how)()
    final = run.wait(timeout=60)
    assert final.state is (RunState.STOPPED if how == "stop" else RunState.ABORTED)
    assert final.frames_processed == 64
    assert final.frames_missing == N - 64
    assert np.isnan(final.buffers["sumsig_image"].ravel()[64:]).all()
    np.testing.assert_array_equal(final.buffers["sum_image"], frames[:64].astype(np.float64).sum(axis=0))

    # the rest of the interrupted series still arrives: it must be given back, not processed
    source.send_frames(list(range(64, 96)), stack_size=16)
    frames2 = make_frames(seed=6)
    run2 = runner.process(source, ALL, PARAMETERS, nav_shape=SCAN, series=11)
    source.begin_series(11, frames2)
    source.send_frames(arrival_order(seed=7), stack_size=40)
    source.finish_series()
    snapshot = run2.wait(timeout=60)
    assert snapshot.state is RunState.FINISHED
    assert snapshot.frames_processed == N
    assert_matches_offline(snapshot, frames2, np.ones(N, bool))


def test_abort_drops_pending_stacks(runner, source):
    frames = make_frames(seed=8)
    run = runner.process(source, ["sum"], PARAMETERS, nav_shape=SCAN)
    source.begin_series(12, frames)
    wait_for(lambda: run.state is RunState.RUNNING, what="the series to start")
    run.abort()
    source.send_frames(list(range(N)), stack_size=8)  # arrives after the abort
    final = run.wait(timeout=60)
    assert final.state is RunState.ABORTED
    assert final.frames_processed < N
    # the next run gives back whatever of series 12 it still finds
    run2 = runner.process(source, ["sum"], PARAMETERS, nav_shape=SCAN, series=13)
    source.begin_series(13, frames)
    source.send_frames(list(range(N)), stack_size=64)
    source.finish_series()
    assert run2.wait(timeout=60).frames_processed == N


def test_snapshots_during_a_run_are_monotonic(runner, source):
    frames = make_frames(seed=9)
    run = runner.process(source, ["sumsig", "sum"], PARAMETERS, nav_shape=SCAN)
    source.begin_series(14, frames)
    seen = []
    for start in range(0, N, 32):
        source.send_frames(list(range(start, start + 32)), stack_size=16)
        target = start + 32
        snapshot = wait_for(lambda: (s := run.snapshot()).frames_processed >= target and s,
                            what=f"{target} frames processed")
        seen.append(snapshot)
        # what is marked done is exactly what has a value
        assert np.array_equal(~np.isnan(snapshot.buffers["sumsig_image"]), snapshot.done)
    source.finish_series()
    seen.append(run.wait(timeout=60))
    counts = [s.frames_processed for s in seen]
    assert counts == sorted(counts) and counts[-1] == N
    for earlier, later in zip(seen, seen[1:]):
        assert not (earlier.done & ~later.done).any(), "a position done earlier is not done later"
        assert (later.buffers["sum_image"] >= earlier.buffers["sum_image"]).all()


def test_custom_analysis_from_an_entry_point(runner, source, monkeypatch):
    monkeypatch.setattr(analyses, "entry_point_factories", lambda: {"framemax": make_frame_max_udf})
    monkeypatch.setattr(runner, "registry", AnalysisRegistry.discover())
    frames = make_frames(seed=10)
    run = runner.process(source, ["framemax", "sumsig"], PARAMETERS, nav_shape=SCAN)
    source.begin_series(15, frames)
    source.send_frames(list(range(N)), stack_size=50)
    source.finish_series()
    snapshot = run.wait(timeout=60)
    assert set(snapshot.buffers) == {"framemax_maximum", "sumsig_image"}
    np.testing.assert_array_equal(snapshot.buffers["framemax_maximum"], frames.max(axis=(1, 2)).reshape(SCAN))


def test_frame_shape_from_the_first_stack_and_inferred_scan_shape(runner, source):
    frames = make_frames(seed=11)
    run = runner.process(source, ["sumsig"], PARAMETERS, nav_shape=(10, 10))
    source.begin_series(16, frames, announce_shape=False)
    source.send_frames(list(range(N)), stack_size=100)
    source.finish_series()
    snapshot = run.wait(timeout=60)
    assert snapshot.scan_shape == SCAN
    assert "does not hold" in snapshot.scan_shape_note
    np.testing.assert_array_equal(snapshot.buffers["sumsig_image"],
                                  frames.astype(np.float64).sum(axis=(1, 2)).reshape(SCAN))


def test_failing_analysis_fails_the_run_not_the_runner(runner, source, monkeypatch):
    monkeypatch.setattr(analyses, "entry_point_factories", lambda: {"broken": _make_broken_udf})
    monkeypatch.setattr(runner, "registry", AnalysisRegistry.discover())
    run = runner.process(source, ["broken"], PARAMETERS, nav_shape=SCAN)
    source.begin_series(17, make_frames())
    source.send_frames(list(range(N)), stack_size=64)
    source.finish_series()
    snapshot = run.wait(timeout=60)
    assert snapshot.state is RunState.FAILED
    assert "ZeroDivisionError" in snapshot.error
    monkeypatch.undo()
    run2 = runner.process(source, ["sumsig"], PARAMETERS, nav_shape=SCAN, series=18)
    source.begin_series(18, make_frames())
    source.send_frames(list(range(N)), stack_size=64)
    source.finish_series()
    assert run2.wait(timeout=60).state is RunState.FINISHED


def test_a_second_series_cannot_start_while_one_runs(runner, source):
    run = runner.process(source, ["sum"], PARAMETERS, nav_shape=SCAN)
    with pytest.raises(RuntimeError, match="still being processed"):
        runner.process(source, ["sum"], PARAMETERS, nav_shape=SCAN)
    run.stop()
    assert run.wait(timeout=60).state is RunState.STOPPED


def _make_broken_udf(parameters):
    from tests.processing_fakes import BrokenUDF
    return BrokenUDF()


def test_rate_meter_covers_its_window_and_restarts_on_reset():
    """The one rate meter (receiver rates, acquisition processing rate): per second over the
    newest sample and the latest one a whole window older."""
    from tango_dectris_live.receiver import RateMeter

    meter = RateMeter(window=2.0)
    assert meter.add(0, now=10.0) == 0.0  # one sample: no rate yet
    assert meter.add(100, now=11.0) == 100.0
    assert meter.add(400, now=12.0) == 200.0  # 0 s .. 2 s
    assert meter.add(1000, now=13.0) == 450.0  # 1 s .. 3 s: the 10.0 sample left the window
    assert meter.add(1600, now=15.0) == 300.0  # 13 s .. 15 s: exactly one window
    assert meter.add(1600, now=17.0) == 0.0  # stopped for a whole window
    assert meter.rate() == 0.0
    meter.reset()
    assert meter.add(5, now=20.0) == 0.0 and meter.add(25, now=20.5) == 40.0


def test_bottleneck_diagnosis_reads_the_receiver_telemetry():
    from tango_dectris_live.processing.acquisition import BottleneckMeter

    assert BottleneckMeter.diagnose(0.0, 1, 16) == ""
    assert "workers saturated" in BottleneckMeter.diagnose(0.4, 16, 16)
    assert "add workers" in BottleneckMeter.diagnose(0.4, 16, 16)
    assert "backlog high" in BottleneckMeter.diagnose(0.0, 13, 16)
    # the slots are held by the series file's writer, not by the workers: say so
    assert "saving behind: 12 of the 16/16 slots" in BottleneckMeter.diagnose(0.4, 16, 16, writer_backlog=12)
    assert "workers saturated" in BottleneckMeter.diagnose(0.4, 16, 16, writer_backlog=1)


class _PrefersTiles(analyses.UDF):
    def __init__(self, total_size):
        super().__init__(total_size=total_size)

    def get_tiling_preferences(self):
        return {"depth": self.TILE_DEPTH_DEFAULT, "total_size": self.params.total_size}

    def get_result_buffers(self):
        return {}

    def process_tile(self, tile):
        pass


def test_tile_size_follows_the_udfs_preferences():
    registry = AnalysisRegistry.discover()

    def udfs(names, *extra):
        built = [s.udf for s in registry.build(names, PARAMETERS, (32, 32))] if names else []
        return built + list(extra)

    # what the compiled sums and mask sums ask for
    assert runner_module.tile_bytes(udfs(["sum", "sumsig"])) == 4 << 20
    assert runner_module.tile_bytes(udfs(["sum", "bf", "adf", "com"])) == 4 << 20
    # LiberTEM's own UDFs leave it open (TILE_SIZE_MAX): the 1 MiB default, smallest wins
    from libertem.udf.sum import SumUDF
    assert runner_module.tile_bytes(udfs(["sum", "bf"], SumUDF())) == 1 << 20
    assert runner_module.tile_bytes(udfs(["sum"], _PrefersTiles(256 << 10))) == 256 << 10
    assert runner_module.tile_bytes(udfs([], _PrefersTiles(1 << 40))) == 64 << 20  # capped
    assert runner_module.tile_bytes(udfs([], _PrefersTiles(analyses.UDF.TILE_SIZE_BEST_FIT))) == 1 << 20
