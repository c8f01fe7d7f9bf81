"""LiveAcquisition (Tango-free) against the simulator: active and passive acquisitions end to end."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import requests

from sim.data import ScanDataGenerator
from sim.encode import dtype_for_bit_depth
from tango_dectris_live.processing.acquisition import (AcquisitionBusyError, AcquisitionMode, AcquisitionRequest,
                                                       AcquisitionUpdate, LiveAcquisition, PipelineSettings)
from tango_dectris_live.processing.analyses import UnknownAnalysisError
from tango_dectris_live.processing.snapshot import RunState
from tango_dectris_live.simplon.client import DetectorClient
from tango_dectris_live.testing import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

NAV = (6, 10)  # not square: a transposed result cannot pass


def _put(simulator, module, task, key, value=None):
    url = f"{simulator.rest_url}/{module}/api/1.8.0/{task}/{key}"
    response = requests.put(url, json=None if value is None else {"value": value}, timeout=30)
    assert response.status_code == 200, response.text


def _sim_config(simulator, **changes):
    requests.put(f"{simulator.rest_url}/sim/api/config", json=changes, timeout=10).raise_for_status()


def _truth(simulator, nav_shape) -> ScanDataGenerator:
    config = simulator.detector.get_config
    settings = simulator.sink.get_sim_config()
    return ScanDataGenerator(config("detector", "x_pixels_in_detector")["value"],
                             config("detector", "y_pixels_in_detector")["value"],
                             dtype_for_bit_depth(config("detector", "bit_depth_image")["value"]),
                             nav_shape=nav_shape, seed=settings["seed"], dose=settings["dose"],
                             pool_size=settings["pool_size"])


class Updates:
    def __init__(self) -> None:
        self.items: list[AcquisitionUpdate] = []
        self._lock = threading.Lock()

    def __call__(self, update: AcquisitionUpdate) -> None:
        with self._lock:
            self.items.append(update)

    def finals(self) -> list[AcquisitionUpdate]:
        with self._lock:
            return [u for u in self.items if u.final]


def _prepare(simulator) -> None:
    """An initialized simulator streaming NAV frames per series at full speed."""
    _put(simulator, "detector", "command", "initialize")
    _put(simulator, "detector", "config", "trigger_mode", "ints")
    _put(simulator, "stream", "config", "mode", "enabled")
    _sim_config(simulator, pacing="max", nav_shape=list(NAV))


@pytest.fixture(scope="module")
def live():
    """One simulator and one LiveAcquisition (its worker processes start once) for the module."""
    from sim.server import SimulatorServer

    with SimulatorServer(host="127.0.0.1", model="ARINA") as simulator:
        _prepare(simulator)
        client = DetectorClient("127.0.0.1", simulator.port)
        updates = Updates()
        acquisition = LiveAcquisition(client, "127.0.0.1", {1: simulator.stream_port, 2: simulator.stream2_port},
                                      settings=PipelineSettings(workers=2, frame_stack_size=8),
                                      on_update=updates, series_timeout=5.0)
        try:
            yield simulator, acquisition, updates
        finally:
            acquisition.close()
            client.close()


@pytest.mark.parametrize("stream_format", ["legacy", "cbor"])
def test_active_acquisition_results_equal_the_ground_truth(live, stream_format):
    simulator, acquisition, updates = live
    _put(simulator, "stream", "config", "format", stream_format)
    before = len(updates.finals())
    acquisition.start(AcquisitionRequest(("sum", "sumsig", "last_frame"), nav_shape=NAV))
    assert acquisition.wait(60), acquisition.progress()
    assert acquisition.last_error is None
    final = updates.finals()[before:]
    assert len(final) == 1
    snapshot = final[0].snapshot
    truth = _truth(simulator, NAV)
    count = int(np.prod(NAV))
    assert snapshot.state == RunState.FINISHED and snapshot.scan_shape == NAV
    np.testing.assert_array_equal(snapshot.buffers["sum_image"], truth.sum_frames(range(count)))
    np.testing.assert_array_equal(snapshot.buffers["sumsig_image"],
                                  truth.sum_per_frame(range(count)).reshape(NAV))
    np.testing.assert_array_equal(snapshot.buffers["last_frame"], truth.frame(count - 1))
    progress = final[0].progress
    assert (progress.frames_processed, progress.frames_expected, progress.frames_missing) == (count, count, 0)
    assert progress.frames_received == count
    assert progress.transport == "zmtp"  # auto: the receiver's own reader for tcp://
    assert acquisition.mode == AcquisitionMode.IDLE
    assert simulator.detector.state == "idle"  # disarmed after the series


def test_passive_mode_processes_every_series_until_stopped(live):
    simulator, acquisition, updates = live
    _put(simulator, "stream", "config", "format", "legacy")
    _put(simulator, "detector", "config", "nimages", int(np.prod(NAV)))
    _put(simulator, "detector", "config", "ntrigger", 1)
    before = len(updates.finals())
    acquisition.listen(AcquisitionRequest(("sumsig",), nav_shape=NAV))
    with pytest.raises(AcquisitionBusyError):
        acquisition.start(AcquisitionRequest(("sum",)))
    series_ids = []
    for round_ in range(3):
        wait_for(lambda: "listening" in acquisition.progress().message, 30, "listening")
        _put(simulator, "detector", "command", "arm")
        series_ids.append(simulator.detector.series_id)
        _put(simulator, "detector", "command", "trigger")
        wait_for(lambda: len(updates.finals()) - before == round_ + 1, 30, f"series {round_ + 1} published")
    acquisition.stop()
    assert acquisition.wait(30)
    finals = updates.finals()[before:]
    assert [u.snapshot.series for u in finals] == series_ids
    truth = _truth(simulator, NAV).sum_per_frame(range(int(np.prod(NAV)))).reshape(NAV)
    for update in finals:
        np.testing.assert_array_equal(update.snapshot.buffers["sumsig_image"], truth)


def test_passive_mode_infers_the_scan_shape_when_nav_shape_does_not_fit(live):
    simulator, acquisition, updates = live
    _put(simulator, "stream", "config", "format", "cbor")
    _put(simulator, "detector", "config", "nimages", 36)
    before = len(updates.finals())
    acquisition.listen(AcquisitionRequest(("sumsig",), nav_shape=(5, 5)))
    wait_for(lambda: "listening" in acquisition.progress().message, 30, "listening")
    _put(simulator, "detector", "command", "arm")
    _put(simulator, "detector", "command", "trigger")
    wait_for(lambda: len(updates.finals()) > before, 30, "series published")
    acquisition.stop()
    assert acquisition.wait(30)
    snapshot = updates.finals()[before].snapshot
    assert snapshot.scan_shape == (6, 6)
    assert "36" in snapshot.scan_shape_note or "square" in snapshot.scan_shape_note


def test_missing_frames_are_nan_and_counted(live):
    simulator, acquisition, updates = live
    _put(simulator, "stream", "config", "format", "legacy")
    _sim_config(simulator, faults=[{"kind": "drop", "frames": [5, 17]}])
    before = len(updates.finals())
    acquisition.start(AcquisitionRequest(("sumsig", "sum"), nav_shape=NAV))
    assert acquisition.wait(60)
    final = updates.finals()[before]
    sumsig = final.snapshot.buffers["sumsig_image"].ravel()
    assert final.progress.frames_missing == 2 == final.snapshot.frames_missing
    assert np.flatnonzero(np.isnan(sumsig)).tolist() == [5, 17]
    kept = [n for n in range(int(np.prod(NAV))) if n not in (5, 17)]
    truth = _truth(simulator, NAV)
    np.testing.assert_array_equal(sumsig[kept], truth.sum_per_frame(kept))
    np.testing.assert_array_equal(final.snapshot.buffers["sum_image"], truth.sum_frames(kept))


@pytest.mark.parametrize("how", ["stop", "abort"])
def test_stop_or_abort_mid_series_then_a_full_acquisition(live, how):
    simulator, acquisition, updates = live
    _put(simulator, "stream", "config", "format", "legacy")
    _put(simulator, "detector", "config", "frame_time", 0.02)
    _sim_config(simulator, pacing="frame_time", nav_shape=[20, 20])
    try:
        before = len(updates.finals())
        previous_series = acquisition.progress().series_id
        acquisition.start(AcquisitionRequest(("sumsig",), nav_shape=(20, 20)))

        def started_processing() -> bool:
            progress = acquisition.progress()
            return progress.series_id > previous_series and progress.frames_processed > 0

        wait_for(started_processing, 60, "first frames of the new series processed")
        getattr(acquisition, how)()
        assert acquisition.wait(30)
        final = updates.finals()[before:]
        assert len(final) == 1, (acquisition.last_error, acquisition.progress())
        assert 0 < final[0].snapshot.frames_processed < 400
        expected_state = RunState.ABORTED if how == "abort" else RunState.FINISHED
        assert final[0].snapshot.state == expected_state
        assert how in final[0].progress.message  # "series N stopped: ..." / "... aborted: ..."
        wait_for(lambda: simulator.detector.state == "idle", 10, "detector idle")
    finally:
        _put(simulator, "detector", "config", "frame_time", 0.001)
        _sim_config(simulator, pacing="max", nav_shape=list(NAV))
    before = len(updates.finals())
    acquisition.start(AcquisitionRequest(("sumsig",), nav_shape=NAV))
    assert acquisition.wait(60)
    final = updates.finals()[before]
    assert final.snapshot.state == RunState.FINISHED and final.snapshot.frames_missing == 0
    np.testing.assert_array_equal(final.snapshot.buffers["sumsig_image"],
                                  _truth(simulator, NAV).sum_per_frame(range(60)).reshape(NAV))


def test_unknown_analysis_and_bad_settings_are_refused_before_anything_runs(live):
    _simulator, acquisition, _updates = live
    with pytest.raises(UnknownAnalysisError, match="available"):
        acquisition.start(AcquisitionRequest(("sum", "no_such_analysis")))
    with pytest.raises(ValueError, match="nav_shape"):
        acquisition.start(AcquisitionRequest(("sum",), nav_shape=(0, 4)))
    with pytest.raises(ValueError, match="result_event_rate"):
        acquisition.event_rate = 0
    with pytest.raises(ValueError, match="workers"):
        PipelineSettings(workers=-1)
    with pytest.raises(ValueError, match="StreamTransport must be one of auto, zmtp, libzmq, got 'udp'"):
        LiveAcquisition(acquisition.detector, "127.0.0.1", {1: 1, 2: 2}, transport="udp")
    assert not acquisition.busy


def test_active_acquisition_through_libzmq_when_the_transport_asks_for_it():
    """transport="libzmq" (the device's StreamTransport property): the same results via pyzmq.
    Its own simulator: a second receiver on the module's stream would take half the messages
    (PUSH sockets deal them out round-robin)."""
    from sim.server import SimulatorServer

    with SimulatorServer(host="127.0.0.1", model="ARINA") as simulator:
        _prepare(simulator)
        client = DetectorClient("127.0.0.1", simulator.port)
        updates = Updates()
        acquisition = LiveAcquisition(client, "127.0.0.1", {1: simulator.stream_port, 2: simulator.stream2_port},
                                      settings=PipelineSettings(workers=1, frame_stack_size=8), on_update=updates,
                                      series_timeout=5.0, transport="libzmq")
        try:
            acquisition.start(AcquisitionRequest(("sum", "sumsig"), nav_shape=NAV))
            assert acquisition.wait(60), acquisition.progress()
            assert acquisition.last_error is None
            (final,) = updates.finals()
            truth = _truth(simulator, NAV)
            count = int(np.prod(NAV))
            np.testing.assert_array_equal(final.snapshot.buffers["sum_image"], truth.sum_frames(range(count)))
            np.testing.assert_array_equal(final.snapshot.buffers["sumsig_image"],
                                          truth.sum_per_frame(range(count)).reshape(NAV))
            assert final.progress.transport == "libzmq" and final.progress.frames_missing == 0
        finally:
            acquisition.close()
            client.close()


def test_active_acquisition_without_a_stream_ends_with_a_clear_error(live):
    """The DCU arms but its header never reaches us (wrong port, firewall): no hang, a reason."""
    import socket

    simulator, _acquisition, _updates = live
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        silent_port = unused.getsockname()[1]
    client = DetectorClient("127.0.0.1", simulator.port)
    acquisition = LiveAcquisition(client, "127.0.0.1", {1: silent_port, 2: silent_port},
                                  settings=PipelineSettings(workers=1), series_timeout=1.0)
    try:
        acquisition.start(AcquisitionRequest(("sum",), nav_shape=(2, 2)))
        assert acquisition.wait(60)
        # nothing listens on that port: the receiver cannot connect, so the detector is not armed
        assert acquisition.last_error is not None and "no stream connection" in acquisition.last_error
        assert "the detector was not armed" in acquisition.last_error
        assert "active acquisition failed" in acquisition.progress().message
        assert not acquisition.busy
    finally:
        acquisition.close()
        client.close()
    wait_for(lambda: simulator.detector.state == "idle", 10, "the simulator disarmed")


def _exact_active(simulator, acquisition, updates) -> None:
    before = len(updates.finals())
    acquisition.start(AcquisitionRequest(("sum", "sumsig"), nav_shape=NAV))
    assert acquisition.wait(60), acquisition.progress()
    assert acquisition.last_error is None, acquisition.last_error
    (final,) = updates.finals()[before:]
    count = int(np.prod(NAV))
    np.testing.assert_array_equal(final.snapshot.buffers["sum_image"], _truth(simulator, NAV).sum_frames(range(count)))
    assert final.progress.frames_missing == 0


def test_a_start_whose_workers_cannot_start_leaves_the_acquisition_usable(live, monkeypatch):
    """The worker pool fails to start (as with too few file descriptors): the Start fails with the
    reason, the detector is not armed, and the next Start builds a new pool and is exact."""
    from tango_dectris_live.processing.runner import WorkerStartError

    simulator, acquisition, updates = live
    _put(simulator, "stream", "config", "format", "legacy")
    attempts = []

    def failing_runner(*args, **kwargs):
        attempts.append(args)
        raise WorkerStartError("could not start 3 worker processes (1 started): Too many open files")

    monkeypatch.setattr(acquisition.pipeline_factory, "runner", failing_runner)
    previous = acquisition.settings
    acquisition.settings = PipelineSettings(workers=3, frame_stack_size=8)  # another pool size
    try:
        acquisition.start(AcquisitionRequest(("sum",), nav_shape=NAV))
        assert acquisition.wait(60)
        assert attempts and "Too many open files" in acquisition.last_error
        assert simulator.detector.state == "idle"  # never armed
    finally:
        monkeypatch.undo()
        acquisition.settings = previous
    _exact_active(simulator, acquisition, updates)


def test_a_start_that_fails_after_the_arm_disarms_and_the_next_is_exact(live, monkeypatch):
    """The software trigger fails after the detector was armed: the series ends with the reason,
    the detector is put back to idle, and the next Start is exact."""
    from tango_dectris_live.simplon.errors import DcuRequestError

    simulator, acquisition, updates = live
    _put(simulator, "stream", "config", "format", "legacy")

    def refused_trigger(*args, **kwargs):
        raise DcuRequestError("PUT detector/command/trigger failed (HTTP 500: trigger unit fault)", status_code=500,
                              dcu_message="trigger unit fault", url="", method="PUT")

    monkeypatch.setattr(acquisition.detector, "trigger", refused_trigger)
    acquisition.start(AcquisitionRequest(("sum",), nav_shape=NAV))
    assert acquisition.wait(60)
    assert acquisition.last_error is not None and "trigger unit fault" in acquisition.last_error
    wait_for(lambda: simulator.detector.state == "idle", 10, "the detector disarmed")
    monkeypatch.undo()
    _exact_active(simulator, acquisition, updates)


def test_start_is_accepted_as_soon_as_the_end_is_published(live):
    """A step scan starts the next point the moment it sees the acquisition idle: that is while
    the ending session's thread is still returning, and must not be refused as busy."""
    simulator, acquisition, _updates = live
    _put(simulator, "stream", "config", "format", "legacy")
    outcome: list[object] = []
    follow_up = threading.Event()
    previous = acquisition.on_update

    def start_next_when_idle(update: AcquisitionUpdate) -> None:
        previous(update)
        if update.progress.mode == AcquisitionMode.IDLE and not follow_up.is_set() and outcome == ["first"]:
            follow_up.set()
            try:
                acquisition.start(AcquisitionRequest(("sum",), nav_shape=NAV))
                outcome.append("second started")
            except AcquisitionBusyError as error:
                outcome.append(error)

    acquisition.on_update = start_next_when_idle
    try:
        acquisition.start(AcquisitionRequest(("sum",), nav_shape=NAV))
        outcome.append("first")
        wait_for(follow_up.is_set, 60, "the first acquisition's end published")
        wait_for(lambda: len(outcome) == 2, 10, "the follow-up Start")
        assert outcome[1] == "second started", outcome
        wait_for(lambda: not acquisition.busy, 60, "the second acquisition done")
        assert acquisition.last_error is None
    finally:
        acquisition.on_update = previous
