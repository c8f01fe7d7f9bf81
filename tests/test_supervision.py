"""DetectorSupervisor: how the DCU's state, reachability and slow commands become one health."""
from __future__ import annotations

import threading

import pytest

from tango_dectris_live.simplon.errors import DcuConnectionError, InvalidValueError, UnknownParameterError
from tango_dectris_live.simplon.supervision import NO_STATE_NOTE, DetectorCondition, DetectorSupervisor


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


# -- a DCU without detector/status/state ------------------------------------------------------


class ScriptedDcuWithoutState(ScriptedDcu):
    """A DCU whose state() is 'not provided' while ``dcu_state`` is None, with the client's
    activity listeners (the events are sent with ``announce``)."""

    def __init__(self) -> None:
        super().__init__()
        self.dcu_state = None
        self.listeners = []

    def state(self) -> str:
        if self.reachable and self.dcu_state is None:
            raise UnknownParameterError(
                "GET detector/status/state: the DCU does not provide this parameter (DCU said HTTP 404)",
                status_code=404, dcu_message="", url="u", method="GET")
        return super().state()

    def add_activity_listener(self, listener) -> None:
        self.listeners.append(listener)

    def announce(self, *events: str) -> None:
        for event in events:
            for listener in self.listeners:
                listener(event)


@pytest.fixture
def stateless_dcu():
    return ScriptedDcuWithoutState()


def test_without_state_the_health_follows_the_activity(stateless_dcu):
    published = []
    supervisor = DetectorSupervisor(stateless_dcu, on_change=published.append)
    stateless_dcu.announce("arm")  # before the first poll nothing is known: nothing published
    assert published == []
    health = supervisor.refresh()
    assert supervisor.dcu_reports_state is False
    assert (health.condition, health.dcu_state, health.state_inferred) == (DetectorCondition.BUSY, "ready", True)
    assert health.message == f"detector ready ({NO_STATE_NOTE})"
    expected = [("disarm", DetectorCondition.IDLE, "idle"),
                ("initialize", DetectorCondition.IDLE, "idle"),
                ("arm", DetectorCondition.BUSY, "ready"),
                ("series_started", DetectorCondition.BUSY, "acquire"),
                ("series_ended", DetectorCondition.IDLE, "idle"),
                ("trigger_done", DetectorCondition.IDLE, "idle"),  # the series ended before the answer
                ("arm", DetectorCondition.BUSY, "ready"),
                ("trigger_started", DetectorCondition.BUSY, "acquire"),
                ("trigger_failed", DetectorCondition.BUSY, "ready"),  # back to before the trigger
                ("trigger_started", DetectorCondition.BUSY, "acquire"),
                ("trigger_done", DetectorCondition.BUSY, "ready"),
                ("cancel", DetectorCondition.IDLE, "idle"),
                ("arm", DetectorCondition.BUSY, "ready"),
                ("abort", DetectorCondition.IDLE, "idle")]
    for event, condition, state in expected:
        stateless_dcu.announce(event)
        health = supervisor.health  # published by the event itself: no refresh
        assert (health.condition, health.dcu_state) == (condition, state), event
    assert published[-1] == supervisor.health


def test_without_state_unreachable_then_back(stateless_dcu):
    supervisor = DetectorSupervisor(stateless_dcu)
    assert supervisor.refresh().condition is DetectorCondition.IDLE
    stateless_dcu.reachable = False
    assert supervisor.refresh().condition is DetectorCondition.UNREACHABLE
    stateless_dcu.announce("arm")
    assert supervisor.health.condition is DetectorCondition.UNREACHABLE  # events wait for the DCU
    stateless_dcu.reachable = True
    health = supervisor.refresh()
    assert (health.condition, health.dcu_state) == (DetectorCondition.BUSY, "ready")


def test_a_dcu_that_provides_its_state_again_is_read_again(stateless_dcu):
    supervisor = DetectorSupervisor(stateless_dcu)
    supervisor.refresh()
    stateless_dcu.announce("arm")
    assert supervisor.health.state_inferred
    stateless_dcu.dcu_state = "idle"  # e.g. a firmware update
    health = supervisor.refresh()
    assert supervisor.dcu_reports_state is True
    assert (health.condition, health.state_inferred, health.message) == (DetectorCondition.IDLE, False, "detector idle")
    stateless_dcu.announce("arm")  # the DCU's own state rules now
    assert supervisor.health.condition is DetectorCondition.IDLE


def test_without_state_a_running_command_and_its_failure_are_reported(stateless_dcu):
    supervisor = DetectorSupervisor(stateless_dcu)
    supervisor.refresh()
    stateless_dcu.announce("arm")
    release = threading.Event()

    def failing_trigger():
        stateless_dcu.announce("trigger_started")
        release.wait(10)
        stateless_dcu.announce("trigger_failed")
        raise InvalidValueError("trigger refused: not armed", status_code=400,
                                dcu_message="not armed", url="u", method="PUT")

    supervisor.run_in_background("trigger", failing_trigger)
    health = supervisor.health
    assert health.condition is DetectorCondition.BUSY
    assert health.message.startswith("trigger in progress (inferred state")
    release.set()
    assert supervisor.wait_for_command(10)
    health = supervisor.refresh()
    assert health.condition is DetectorCondition.BUSY and "trigger failed" in health.message
    assert NO_STATE_NOTE in health.message


def test_an_activity_event_is_not_overwritten_by_a_slower_poll(stateless_dcu):
    """A poll publishing idle is still in its callback when Arm's event publishes ready: the
    device must end with ready."""
    applied = []
    in_callback, release = threading.Event(), threading.Event()

    def on_change(health):
        if health.condition is DetectorCondition.IDLE and not applied:
            in_callback.set()
            release.wait(10)
        applied.append(health.condition)

    supervisor = DetectorSupervisor(stateless_dcu, on_change=on_change)
    poll = threading.Thread(target=supervisor.refresh)
    poll.start()
    assert in_callback.wait(10)
    command = threading.Thread(target=stateless_dcu.announce, args=("arm",))
    command.start()
    command.join(0.5)  # gives an unordered publish the time to call back first; not needed to pass
    release.set()
    poll.join(10)
    command.join(10)
    assert applied[-1] is DetectorCondition.BUSY
    assert supervisor.health.condition is DetectorCondition.BUSY


def test_with_state_our_own_ending_command_is_published_at_once():
    """A poll read 'ready' during an acquisition; our disarm succeeded: the detector is idle now,
    not at the next poll a second later (a step scan would wait that second at every point)."""
    dcu = ScriptedDcuWithoutState()
    dcu.dcu_state = "ready"
    supervisor = DetectorSupervisor(dcu)
    assert supervisor.refresh().condition is DetectorCondition.BUSY
    dcu.dcu_state = "idle"  # the DCU after our disarm; no poll has read it yet
    dcu.announce("disarm")
    assert (supervisor.health.condition, supervisor.health.dcu_state) == (DetectorCondition.IDLE, "idle")
    dcu.announce("arm", "trigger_started", "series_started")  # the polls tell these
    assert supervisor.health.dcu_state == "idle" and supervisor.dcu_reports_state
