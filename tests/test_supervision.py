"""DetectorSupervisor: how the DCU's state, reachability and slow commands become one health."""
from __future__ import annotations

import threading

import pytest

from tango_dectris_live.simplon.errors import DcuConnectionError, InvalidValueError
from tango_dectris_live.simplon.supervision import DetectorCondition, DetectorSupervisor


class ScriptedDcu:
    """Stands in for DetectorClient: answers state() from a variable, or fails like a dead DCU."""

    host, port = "127.0.0.1", 1234

    def __init__(self) -> None:
        self.dcu_state = "na"
        self.reachable = True
        self.error_text = ["over-temperature on module 3"]

    def state(self) -> str:
        if not self.reachable:
            raise DcuConnectionError("127.0.0.1:1234 refused the connection")
        return self.dcu_state

    def get_value(self, module, task, key):
        assert (module, task, key) == ("detector", "status", "error")
        return self.error_text


@pytest.fixture
def dcu():
    return ScriptedDcu()


def test_states_map_to_conditions(dcu):
    changes = []
    supervisor = DetectorSupervisor(dcu, on_change=changes.append)
    expected = {"na": DetectorCondition.NOT_INITIALIZED, "idle": DetectorCondition.IDLE,
                "ready": DetectorCondition.BUSY, "acquire": DetectorCondition.BUSY,
                "configure": DetectorCondition.BUSY, "initialize": DetectorCondition.INITIALIZING,
                "error": DetectorCondition.ERROR, "bogus": DetectorCondition.ERROR}
    for state, condition in expected.items():
        dcu.dcu_state = state
        assert supervisor.refresh().condition is condition, state
    assert "over-temperature on module 3" in changes[-2].message  # the DCU's error text
    assert "bogus" in changes[-1].message
    assert len(changes) == len(expected)  # one callback per change, none for repeats
    supervisor.refresh()
    assert len(changes) == len(expected)


def test_unreachable_then_reconnect_calls_back_once(dcu):
    reconnects = []
    supervisor = DetectorSupervisor(dcu, on_reconnect=lambda: reconnects.append(1))
    assert supervisor.refresh().condition is DetectorCondition.NOT_INITIALIZED
    assert reconnects == [1]
    dcu.reachable = False
    health = supervisor.refresh()
    assert health.condition is DetectorCondition.UNREACHABLE
    assert "refused" in health.message and "retrying" in health.message
    supervisor.refresh()
    dcu.reachable = True
    supervisor.refresh()
    supervisor.refresh()
    assert reconnects == [1, 1]


def test_background_command_busy_then_error_with_reason(dcu):
    dcu.dcu_state = "idle"
    supervisor = DetectorSupervisor(dcu)
    release = threading.Event()
    finished = threading.Event()

    def failing_trigger():
        release.wait(10)
        try:
            raise InvalidValueError("trigger refused: not armed", status_code=400,
                                    dcu_message="not armed", url="u", method="PUT")
        finally:
            finished.set()

    supervisor.run_in_background("trigger", failing_trigger)
    assert supervisor.health.condition is DetectorCondition.BUSY
    with pytest.raises(Exception, match="still in progress"):
        supervisor.run_in_background("initialize", lambda: None)
    release.set()
    assert finished.wait(10)
    assert supervisor.wait_for_command(10)
    health = supervisor.refresh()
    assert health.condition is DetectorCondition.ERROR
    assert "trigger failed" in health.message and "not armed" in health.message
    supervisor.clear_command_error()
    assert supervisor.refresh().condition is DetectorCondition.IDLE


def test_polling_thread_reports_changes_and_stops(dcu):
    seen = threading.Event()
    supervisor = DetectorSupervisor(
        dcu, poll_period=0.01,
        on_change=lambda h: seen.set() if h.condition is DetectorCondition.IDLE else None)
    supervisor.start()
    try:
        dcu.dcu_state = "idle"
        assert seen.wait(10)
    finally:
        supervisor.stop()
    assert not any(t.name == "dcu-supervisor" for t in threading.enumerate())


def test_a_slow_callback_cannot_apply_an_older_state_last(dcu):
    """A poll that publishes idle and is still in its callback when a command's refresh publishes
    ready: the device must end with ready (it used to end with the poll's older idle, seen as
    State ON right after Arm)."""
    applied = []
    in_callback, release = threading.Event(), threading.Event()

    def on_change(health):
        if health.condition is DetectorCondition.IDLE and not applied:
            in_callback.set()
            release.wait(10)
        applied.append(health.condition)

    supervisor = DetectorSupervisor(dcu, on_change=on_change)
    dcu.dcu_state = "idle"
    poll = threading.Thread(target=supervisor.refresh)
    poll.start()
    assert in_callback.wait(10)
    dcu.dcu_state = "ready"
    command = threading.Thread(target=supervisor.refresh)
    command.start()
    command.join(0.5)  # gives an unordered publish the time to call back first; not needed to pass
    release.set()
    poll.join(10)
    command.join(10)
    assert applied[-1] is DetectorCondition.BUSY  # the newest is applied last
    assert supervisor.health.condition is DetectorCondition.BUSY
