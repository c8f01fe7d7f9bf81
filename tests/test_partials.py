"""Partial results of receiver nodes: on the wire and merged (issue 22's merge semantics).

Each "node" here is a run of the same series on the share of its frames that reached it (frames
dealt round-robin by stack, as a DCU's PUSH socket deals messages); the merge of their partials
must be the result of one run on every frame, bit for bit."""
from __future__ import annotations

import numpy as np
import pytest

from tango_dectris_live.processing.analyses import AnalysisParameters, AnalysisRegistry
from tango_dectris_live.processing.live_dataset import resolve_scan_shape
from tango_dectris_live.processing.partials import PARTIAL_FORMAT, PartialResults, PartialResultsError, ResultMerger
from tango_dectris_live.processing.runner import LiveRunner
from tango_dectris_live.processing.snapshot import RunState
from tests.processing_fakes import ArrayFrameSource

SCAN = (12, 10)
FRAME = (24, 24)
N = SCAN[0] * SCAN[1]
PARAMETERS = AnalysisParameters(beam_centre=(11.0, 12.5), bf_radius=4, adf_inner_radius=6, adf_outer_radius=11)
ANALYSES = ["sum", "sumsig", "bf", "adf", "com"]
STACK = 8


@pytest.fixture(scope="module")
def runner():
    with LiveRunner(workers=2) as live_runner:
        yield live_runner


def frames_of(seed: int = 5) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 300, size=(N, *FRAME), dtype=np.uint16)


def run_share(runner, tmp_path, frames, numbers, analyses=ANALYSES, series=3, sequence=1, compact=False):
    """One node's run: the series announced, only ``numbers`` arrive; its final partial."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    source = ArrayFrameSource(tmp_path)
    run = runner.process(source, analyses, PARAMETERS, nav_shape=SCAN, compact=compact)
    source.begin_series(series, frames)
    source.send_frames(list(numbers), stack_size=STACK)
    source.finish_series()
    snapshot = run.wait(timeout=60)
    assert snapshot.state is RunState.FINISHED
    partial = run.partial(end_seen=False, frames_received=len(numbers), sequence=sequence)
    return snapshot, partial


def merger_for(analyses=ANALYSES):
    return ResultMerger(AnalysisRegistry.discover(), analyses, PARAMETERS, resolve_scan_shape(N, SCAN), FRAME,
                        "uint16")


def dealt(nodes: int, by_frame: bool = False) -> list[list[int]]:
    """Frame numbers per node, stacks of STACK frames (or, ``by_frame``, single frames, as a DCU
    deals its messages) dealt round-robin."""
    shares: list[list[int]] = [[] for _ in range(nodes)]
    step = 1 if by_frame else STACK
    for i, start in enumerate(range(0, N, step)):
        shares[i % nodes].extend(range(start, min(N, start + step)))
    return shares


@pytest.mark.parametrize("compact", [False, True], ids=["by-frame-number", "compact"])
@pytest.mark.parametrize("nodes", [1, 2, 3])
def test_merged_partials_equal_one_run_on_every_frame(runner, tmp_path, nodes, compact):
    frames = frames_of()
    whole, _ = run_share(runner, tmp_path / "whole", frames, range(N))
    partials = []
    for i, share in enumerate(dealt(nodes, by_frame=compact)):
        own, partial = run_share(runner, tmp_path / f"node{i}", frames, share, compact=compact)
        # a node's own scan-shaped results are placed by frame number, whatever its numbering
        for name in ("sumsig_image", "bf_image"):
            shown = own.buffers[name].ravel()
            np.testing.assert_array_equal(shown[share], whole.buffers[name].ravel()[share], err_msg=name)
            assert np.isnan(np.delete(shown, share)).all(), name
        fmt, data = partial.encode()
        assert fmt == PARTIAL_FORMAT
        decoded = PartialResults.decode(fmt, data)
        assert decoded.done.sum() == len(share) and decoded.frames_processed == len(share)
        partials.append(decoded)
    merger = merger_for()
    for partial in partials:
        merger.check(partial)
    merged = merger.merge(partials, series=3, state=RunState.FINISHED, frames_missing_final=True)
    assert (merged.frames_processed, merged.frames_missing) == (N, 0)
    assert set(merged.buffers) == set(whole.buffers)
    for name, value in whole.buffers.items():
        np.testing.assert_array_equal(merged.buffers[name], value, err_msg=name)


def test_a_node_without_its_last_partial_leaves_nan_exactly_at_its_frames(runner, tmp_path):
    frames = frames_of(seed=9)
    shares = dealt(3)
    lost = shares[1]
    partials = [run_share(runner, tmp_path / f"node{i}", frames, share)[1]
                for i, share in enumerate(shares) if i != 1]
    received = np.ones(N, bool)
    received[lost] = False
    reference, _ = run_share(runner, tmp_path / "rest", frames, np.flatnonzero(received))
    merged = merger_for().merge(partials, series=3, state=RunState.FINISHED, frames_missing_final=True)
    assert merged.frames_missing == len(lost)
    for name in ("sumsig_image", "bf_image", "adf_image", "com_x_image", "com_y_image"):
        assert np.flatnonzero(np.isnan(merged.buffers[name]).ravel()).tolist() == sorted(lost), name
    for name, value in reference.buffers.items():
        np.testing.assert_array_equal(merged.buffers[name], value, err_msg=name)


def test_the_latest_partial_of_a_node_counts_not_the_sum_of_them(runner, tmp_path):
    """Partials are cumulative: merging a node's newer partial replaces its older one."""
    frames = frames_of(seed=2)
    early, _ = run_share(runner, tmp_path / "early", frames, range(N // 2))
    _, early_partial = run_share(runner, tmp_path / "early2", frames, range(N // 2))
    whole, whole_partial = run_share(runner, tmp_path / "whole", frames, range(N))
    merger = merger_for()
    assert merger.merge([early_partial], 3, RunState.RUNNING).buffers["sum_image"].sum() == \
        early.buffers["sum_image"].sum()
    np.testing.assert_array_equal(merger.merge([whole_partial], 3, RunState.FINISHED).buffers["sum_image"],
                                  whole.buffers["sum_image"])


def test_bad_partials_are_refused_with_the_reason(runner, tmp_path):
    frames = frames_of()
    _, partial = run_share(runner, tmp_path, frames, range(16), analyses=["sum"])
    fmt, data = partial.encode()
    with pytest.raises(PartialResultsError, match="format"):
        PartialResults.decode("pickle", data)
    with pytest.raises(PartialResultsError, match="does not fit|does not match"):
        PartialResults.decode(fmt, data[:len(data) // 2])
    with pytest.raises(PartialResultsError, match="shorter"):
        PartialResults.decode(fmt, b"\x01")
    with pytest.raises(PartialResultsError, match="analyses"):
        merger_for().check(PartialResults.decode(fmt, data))
    with pytest.raises(PartialResultsError, match="malformed"):
        PartialResults.decode(fmt, b"\x02\x00\x00\x00{}")
