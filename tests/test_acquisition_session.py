"""Whole live acquisitions, active and passive, through LiveAcquisition without a simulator
process: a fake DCU client, in-memory frames, the real worker processes. Results are compared
with NumPy over the same frames."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from tango_dectris_live.processing.acquisition import (AcquisitionMode, AcquisitionRequest, AcquisitionUpdate,
                                                       LiveAcquisition, PipelineSettings)
from tango_dectris_live.processing.snapshot import RunState

from .session_fakes import FakeDcu, InMemoryPipelineFactory, InMemoryStream, wait_until

NAV = (3, 4)


class Finals:
    def __init__(self) -> None:
        self.items: list[AcquisitionUpdate] = []
        self.lock = threading.Lock()

    def __call__(self, update: AcquisitionUpdate) -> None:
        if update.final:
            with self.lock:
                self.items.append(update)


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    stream = InMemoryStream(tmp_path_factory.mktemp("frames"))
    dcu = FakeDcu(stream)
    finals = Finals()
    factory = InMemoryPipelineFactory(stream)
    acquisition = LiveAcquisition(dcu, "unused", {}, settings=PipelineSettings(workers=2), on_update=finals,
                                  pipeline_factory=factory)
    try:
        yield dcu, stream, acquisition, finals, factory
    finally:
        acquisition.close()


@pytest.fixture
def fresh(session):
    dcu, stream, acquisition, finals, factory = session
    dcu.drop, dcu.hold_after, dcu.refuse_trigger = set(), None, False
    dcu.release.clear()
    yield session
    if acquisition.busy:
        acquisition.abort()
        dcu.release.set()
        assert acquisition.wait(60)


def _run_active(acquisition, finals, analyses=("sum", "sumsig")) -> AcquisitionUpdate:
    before = len(finals.items)
    acquisition.start(AcquisitionRequest(analyses, nav_shape=NAV))
    assert acquisition.wait(60), acquisition.progress()
    (final,) = finals.items[before:]
    return final


def _wait_processing(acquisition, dcu, frames: int) -> None:
    """Until the series the DCU armed last has ``frames`` processed (progress shows the previous
    series until the new one starts)."""
    def processing() -> bool:
        progress = acquisition.progress()
        return progress.series_id == dcu.series_id and progress.frames_processed >= frames
    wait_until(lambda: dcu.commands[-1:] != ["disarm"] and processing(), 60, f"{frames} frames of the new series")


def _expected(dcu, series, missing=()):
    frames = dcu.frames_of(series).astype(np.float64)
    keep = np.ones(len(frames), bool)
    keep[list(missing)] = False
    sumsig = frames.sum(axis=(1, 2))
    sumsig[~keep] = np.nan
    return frames[keep].sum(axis=0), sumsig.reshape(NAV)


def test_active_acquisition_is_exact(fresh):
    dcu, stream, acquisition, finals, _factory = fresh
    final = _run_active(acquisition, finals)
    assert acquisition.last_error is None
    assert final.snapshot.state == RunState.FINISHED and final.snapshot.scan_shape == NAV
    expected_sum, expected_sumsig = _expected(dcu, final.snapshot.series)
    np.testing.assert_array_equal(final.snapshot.buffers["sum_image"], expected_sum)
    np.testing.assert_array_equal(final.snapshot.buffers["sumsig_image"], expected_sumsig)
    assert (dcu.config[("detector", "nimages")], dcu.config[("detector", "ntrigger")]) == (12, 1)
    assert dcu.commands[-5:] == ["arm", "trigger", "series_started", "series_ended", "disarm"], dcu.commands
    assert stream.armed[-1] == final.snapshot.series
    assert acquisition.mode == AcquisitionMode.IDLE


def test_a_dropped_frame_is_nan_at_its_position(fresh):
    dcu, _stream, acquisition, finals, _factory = fresh
    dcu.drop = {5}
    final = _run_active(acquisition, finals)
    assert final.snapshot.frames_missing == 1 and final.progress.frames_missing == 1
    expected_sum, expected_sumsig = _expected(dcu, final.snapshot.series, missing=(5,))
    np.testing.assert_array_equal(final.snapshot.buffers["sum_image"], expected_sum)
    np.testing.assert_array_equal(final.snapshot.buffers["sumsig_image"], expected_sumsig)
    assert "1 missing" in final.progress.message


@pytest.mark.parametrize("command", ["stop", "abort"])
def test_stop_or_abort_mid_series_then_an_exact_acquisition(fresh, command):
    dcu, _stream, acquisition, finals, _factory = fresh
    dcu.hold_after = 5  # frames 0..5 sent, then the DCU waits
    before = len(finals.items)
    acquisition.start(AcquisitionRequest(("sum", "sumsig"), nav_shape=NAV))
    _wait_processing(acquisition, dcu, 4)
    getattr(acquisition, command)()
    assert acquisition.wait(60), acquisition.progress()
    assert {"stop": "cancel", "abort": "abort"}[command] in dcu.commands[-4:], dcu.commands
    if command == "stop":
        assert len(finals.items) == before + 1, (acquisition.last_error, acquisition.progress().message, dcu.commands)
        (final,) = finals.items[before:]
        assert final.snapshot.frames_processed >= 4 and final.snapshot.frames_processed <= 6
        assert "stopped" in final.progress.message
    dcu.hold_after = None
    final = _run_active(acquisition, finals)
    assert final.snapshot.frames_missing == 0
    expected_sum, _ = _expected(dcu, final.snapshot.series)
    np.testing.assert_array_equal(final.snapshot.buffers["sum_image"], expected_sum)


def test_a_worker_that_dies_fails_the_series_and_the_next_is_exact(fresh):
    dcu, _stream, acquisition, finals, factory = fresh
    dcu.hold_after = 3
    acquisition.start(AcquisitionRequest(("sum",), nav_shape=NAV))
    _wait_processing(acquisition, dcu, 4)
    pool = acquisition._runner.pool  # noqa: SLF001 - the test plays a crashing worker
    built = factory.runners_built
    for process in pool._processes:  # noqa: SLF001
        process.kill()
    dcu.release.set()
    assert acquisition.wait(60)
    assert acquisition.last_error is not None or "failed" in acquisition.progress().message, \
        acquisition.progress().message
    dcu.hold_after = None
    dcu.release.clear()
    final = _run_active(acquisition, finals, analyses=("sum",))
    assert factory.runners_built == built + 1  # a new pool for the next acquisition
    expected_sum, _ = _expected(dcu, final.snapshot.series)
    np.testing.assert_array_equal(final.snapshot.buffers["sum_image"], expected_sum)


def test_a_refused_trigger_ends_the_series_with_the_dcus_text(fresh):
    dcu, _stream, acquisition, finals, _factory = fresh
    dcu.refuse_trigger = True
    acquisition.start(AcquisitionRequest(("sum",), nav_shape=NAV))
    assert acquisition.wait(60)
    assert "trigger unit fault" in (acquisition.last_error or "")
    assert dcu.commands[-1] in ("abort", "disarm")
    dcu.refuse_trigger = False
    final = _run_active(acquisition, finals, analyses=("sum",))
    assert final.snapshot.frames_missing == 0


def test_passive_acquisitions_of_series_armed_elsewhere(fresh):
    dcu, stream, acquisition, finals, _factory = fresh
    dcu.config[("detector", "nimages")] = 12
    dcu.config[("detector", "ntrigger")] = 1
    before = len(finals.items)
    acquisition.listen(AcquisitionRequest(("sum", "sumsig"), nav_shape=NAV))
    series = []
    for round_ in range(2):
        wait_until(lambda: "listening" in acquisition.progress().message, 30, "listening")
        series.append(dcu.arm())  # someone else arms and triggers
        dcu.trigger()
        wait_until(lambda: len(finals.items) - before == round_ + 1, 60, f"series {round_ + 1} published")
    acquisition.stop()
    assert acquisition.wait(60)
    assert stream.listening is False
    for update, number in zip(finals.items[before:], series):
        expected_sum, expected_sumsig = _expected(dcu, number)
        assert update.snapshot.series == number
        np.testing.assert_array_equal(update.snapshot.buffers["sum_image"], expected_sum)
        np.testing.assert_array_equal(update.snapshot.buffers["sumsig_image"], expected_sumsig)
