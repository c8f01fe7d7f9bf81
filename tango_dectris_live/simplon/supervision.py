"""Watching a DCU: its state, its reachability, and the slow commands running against it.

The device layer turns a :class:`DetectorHealth` into a Tango State/Status; everything that decides
*what* the health is lives here so it can be tested without Tango.
"""
from __future__ import annotations

import enum
import logging
import threading
from dataclasses import dataclass
from typing import Callable

from .client import DetectorClient
from .errors import DcuConnectionError, SimplonError, UnknownParameterError

log = logging.getLogger(__name__)


class DetectorCondition(enum.Enum):
    UNREACHABLE = "unreachable"  # no answer from the DCU (reconnecting)
    NOT_INITIALIZED = "not_initialized"  # SIMPLON state "na": Initialize is needed
    INITIALIZING = "initializing"
    IDLE = "idle"
    BUSY = "busy"  # configure / ready / acquire, or a blocking command in progress
    ERROR = "error"  # SIMPLON state "error", or a command failed


# SIMPLON detector/status/state values (SIMPLON.md §2.2) → condition.
_CONDITION_OF_STATE = {
    "na": DetectorCondition.NOT_INITIALIZED,
    "initialize": DetectorCondition.INITIALIZING,
    "idle": DetectorCondition.IDLE,
    "configure": DetectorCondition.BUSY,
    "ready": DetectorCondition.BUSY,
    "acquire": DetectorCondition.BUSY,
    "test": DetectorCondition.BUSY,
    "error": DetectorCondition.ERROR,
}


# A DCU without detector/status/state (LiberTEM-live's simulator): the SIMPLON state it would
# report after each activity event of the client (see DetectorClient.add_activity_listener).
# trigger_done and trigger_failed are handled in DetectorSupervisor._infer_state.
_INFERRED_STATE_AFTER = {
    "initialize": "idle",
    "arm": "ready",
    "trigger_started": "acquire",
    "series_started": "acquire",
    "disarm": "idle",
    "cancel": "idle",
    "abort": "idle",
    "series_ended": "idle",
}

# The state a DCU is in once a command of ours that ends a series succeeded (SIMPLON 1.8).
_STATE_AFTER_OWN_COMMAND = {"initialize": "idle", "disarm": "idle", "abort": "idle"}

NO_STATE_NOTE = ("the DCU reports no state: detector/status/state not provided; state inferred from "
                 "this device's commands and the stream")


@dataclass(frozen=True)
class DetectorHealth:
    condition: DetectorCondition
    dcu_state: str | None  # the SIMPLON state (inferred on a DCU without one), None when unreachable
    message: str  # one human sentence for Status
    state_inferred: bool = False  # dcu_state was inferred: the DCU provides no detector/status/state


class DetectorSupervisor:
    """Polls ``detector/status/state`` and reports every change of health.

    ``on_change`` is called from the polling thread (or from the thread that called
    :meth:`refresh`) whenever the health differs from the previous one; ``on_reconnect`` once each
    time the DCU answers again after being unreachable (and at the first successful poll), so the
    caller can (re)read the DCU's parameter set.

    A DCU that does not provide ``detector/status/state`` (:attr:`dcu_reports_state` False) is
    still polled for reachability (the state URL's "not provided" answer proves it answers); its
    state is inferred from the client's activity events (commands, and the stream events the
    acquisition reports), and each such event publishes the health at once, from the thread
    that sent the command or saw the stream event. Should the DCU provide a state again, it is
    read again.
    """

    def __init__(self, client: DetectorClient, poll_period: float = 1.0,
                 on_change: Callable[[DetectorHealth], None] | None = None,
                 on_reconnect: Callable[[], None] | None = None) -> None:
        self.client = client
        self.poll_period = poll_period
        self._on_change = on_change
        self._on_reconnect = on_reconnect
        self._lock = threading.Lock()
        self._published = 0  # health updates so far (see _publish)
        self._health = DetectorHealth(DetectorCondition.UNREACHABLE, None,
                                      f"not yet connected to the DCU at {client.host}:{client.port}")
        self._reachable = False
        self._running_command: str | None = None
        self._last_command_error: str | None = None
        # Reads are numbered when they start: a poll that read the state before a command and
        # finishes after the command's own refresh must not publish its older state over it.
        self._reads_started = 0
        self._newest_read_published = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._background: threading.Thread | None = None
        # None until the DCU first answered the state request; False: it does not provide one.
        self._dcu_reports_state: bool | None = None
        self._inferred_state = "idle"  # a reachable DCU without state is taken as initialized
        self._state_before_trigger = "ready"
        add_listener = getattr(client, "add_activity_listener", None)
        if add_listener is not None:
            add_listener(self._on_activity)

    @property
    def health(self) -> DetectorHealth:
        with self._lock:
            return self._health

    @property
    def dcu_reports_state(self) -> bool:
        """False once the DCU answered that it does not provide ``detector/status/state``."""
        with self._lock:
            return self._dcu_reports_state is not False

    @property
    def inferred_state(self) -> str:
        """The SIMPLON state inferred from the activity events (used when the DCU reports none)."""
        with self._lock:
            return self._inferred_state

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._poll_loop, name="dcu-supervisor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=max(5.0, 2 * self.poll_period))
            self._thread = None
        if self._background is not None:
            self._background.join(timeout=1.0)

    def _poll_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.refresh()
            except Exception:  # noqa: BLE001 - a failing callback must not end the supervision
                log.exception("supervising the DCU failed; polling goes on")
            self._stop.wait(self.poll_period)

    def refresh(self) -> DetectorHealth:
        """Poll the DCU now and publish the resulting health."""
        was_reachable = self._reachable
        with self._lock:
            self._reads_started += 1
            read = self._reads_started
        dcu_state: str | None
        try:
            dcu_state = self.client.state()
        except DcuConnectionError as exc:
            self._reachable = False
            return self._publish(DetectorHealth(
                DetectorCondition.UNREACHABLE, None,
                f"DCU unreachable: {exc}; retrying every {self.poll_period:g} s"), read)
        except UnknownParameterError as exc:
            dcu_state = None  # the DCU answered: it is reachable, it just has no state
            self._note_reports_state(False, exc)
        except SimplonError as exc:
            self._reachable = True
            return self._publish(DetectorHealth(
                DetectorCondition.ERROR, None, f"DCU answered the state request with an error: {exc}"), read)
        else:
            self._note_reports_state(True)
        self._reachable = True
        if not was_reachable and self._on_reconnect is not None:
            try:
                self._on_reconnect()
            except SimplonError as exc:
                # The DCU went away again while its parameters were read: retry on the next poll.
                self._reachable = False
                return self._publish(DetectorHealth(
                    DetectorCondition.UNREACHABLE, None,
                    f"DCU answered but reading its parameters failed: {exc}; retrying"), read)
        if dcu_state is None:
            return self._publish(self._inferred_health(), read)
        return self._publish(self._health_from_state(dcu_state), read)

    def _note_reports_state(self, reports: bool, reason: SimplonError | None = None) -> None:
        with self._lock:
            before, self._dcu_reports_state = self._dcu_reports_state, reports
        if reports and before is False:
            log.info("the DCU at %s:%s reports its state again; reading it from now on",
                     self.client.host, self.client.port)
        elif not reports and before is not False:
            log.warning("%s (%s)", NO_STATE_NOTE, reason)

    # -- a DCU without state: the state inferred from the activity ----------------------------

    def _on_activity(self, event: str) -> None:
        """An activity event of the client: infer the state, and on a DCU without state publish
        the health at once (a newer read than any poll in flight, so no poll overwrites it).

        On a DCU with a state, a command of ours that ended a series tells the state it left the
        DCU in just as well: published at once too, or a poll read just before the command (ready,
        acquire) would show the detector busy until the next poll, a second later."""
        with self._lock:
            self._infer_state(event)
            reports = self._dcu_reports_state
            if not self._reachable or (reports is not False and event not in _STATE_AFTER_OWN_COMMAND):
                return  # the DCU's own state (or its absence) is what the polls publish
            self._reads_started += 1
            read = self._reads_started
        if reports is False:
            self._publish(self._inferred_health(), read)
        else:
            self._publish(self._health_from_state(_STATE_AFTER_OWN_COMMAND[event]), read)

    def _infer_state(self, event: str) -> None:
        """Called with the lock held."""
        current = self._inferred_state
        if event == "trigger_started":
            self._state_before_trigger = current
        if event == "trigger_done":
            # an ints trigger answers when its images are done: ready for the next trigger, unless
            # the stream already showed the series end (the DCU then disarmed by itself)
            if current == "acquire":
                self._inferred_state = "ready"
        elif event == "trigger_failed":
            if current == "acquire":
                self._inferred_state = self._state_before_trigger
        elif event in _INFERRED_STATE_AFTER:
            self._inferred_state = _INFERRED_STATE_AFTER[event]
        else:
            log.debug("activity event %r does not change the inferred state", event)

    def _inferred_health(self) -> DetectorHealth:
        with self._lock:
            inferred = self._inferred_state
        health = self._health_from_state(inferred, state_label="inferred state")
        return DetectorHealth(health.condition, health.dcu_state, f"{health.message} ({NO_STATE_NOTE})",
                              state_inferred=True)

    def _health_from_state(self, dcu_state: str, state_label: str = "DCU state") -> DetectorHealth:
        condition = _CONDITION_OF_STATE.get(dcu_state)
        if condition is None:
            return DetectorHealth(DetectorCondition.ERROR, dcu_state,
                                  f"DCU reports an unknown state {dcu_state!r}")
        with self._lock:
            running, failed = self._running_command, self._last_command_error
        if running is not None:
            return DetectorHealth(
                DetectorCondition.INITIALIZING if running == "initialize" else DetectorCondition.BUSY,
                dcu_state, f"{running} in progress ({state_label} {dcu_state})")
        if condition is DetectorCondition.ERROR:
            return DetectorHealth(condition, dcu_state, f"DCU in error: {self._read_dcu_error()}")
        if failed is not None:
            if condition is DetectorCondition.BUSY:
                # The acquisition goes on; the refusal is reported, not turned into a fault.
                return DetectorHealth(condition, dcu_state, f"detector {dcu_state}; {failed}")
            return DetectorHealth(DetectorCondition.ERROR, dcu_state, failed)
        messages = {
            DetectorCondition.NOT_INITIALIZED: "detector not initialized (DCU state na): run Initialize",
            DetectorCondition.INITIALIZING: "detector initializing",
            DetectorCondition.IDLE: "detector idle",
            DetectorCondition.BUSY: f"detector {dcu_state}",
        }
        return DetectorHealth(condition, dcu_state, messages[condition])

    def _read_dcu_error(self) -> str:
        try:
            error = self.client.get_value("detector", "status", "error")
        except SimplonError as exc:
            return f"(the DCU's error text could not be read: {exc})"
        if isinstance(error, list):
            error = "; ".join(str(e) for e in error)
        return str(error) if error else "(the DCU gives no error text)"

    def _publish(self, health: DetectorHealth, read: int | None = None) -> DetectorHealth:
        """Publish ``health``; from a state read, only if no read that started later was published.

        Callbacks run without a lock held (the device's takes Tango's monitor, which a command
        thread calling :meth:`refresh` already holds), so two publishes may call back out of
        order: one that finds a newer health published when its callback returns calls back
        again with the newest, so the device always ends with it."""
        with self._lock:
            if read is not None:
                if read < self._newest_read_published:
                    return self._health
                self._newest_read_published = read
            changed = health != self._health
            self._health = health
            self._published += 1
            seen = self._published
        if not changed or self._on_change is None:
            return health
        self._on_change(health)
        while True:
            with self._lock:
                if self._published == seen:
                    return health
                seen, newest = self._published, self._health
            self._on_change(newest)  # ours may have been applied after a newer one

    # -- blocking commands -------------------------------------------------------------------

    def run_in_background(self, name: str, action: Callable[[], object]) -> None:
        """Run a command that blocks on the DCU (initialize, an ints trigger) without blocking
        the caller; health says BUSY/INITIALIZING meanwhile and ERROR with the reason if it fails.
        Only one such command runs at a time."""
        with self._lock:
            if self._running_command is not None:
                raise SimplonError(f"cannot {name}: {self._running_command} is still in progress")
            self._running_command = name
            self._last_command_error = None
        self._background = threading.Thread(target=self._run_command, args=(name, action),
                                            name=f"dcu-{name}", daemon=True)
        self._background.start()
        self.refresh()

    def _run_command(self, name: str, action: Callable[[], object]) -> None:
        error = None
        try:
            action()
        except SimplonError as exc:
            error = f"{name} failed: {exc}"
            log.error(error)
        except Exception as exc:  # noqa: BLE001 - reported in Status, never lost with the thread
            error = f"{name} failed unexpectedly: {type(exc).__name__}: {exc}"
            log.exception(error)
        finally:
            with self._lock:
                self._running_command = None
                self._last_command_error = error
        self.refresh()

    def wait_for_command(self, timeout: float) -> bool:
        """Wait until the background command (if any) has finished; False on timeout."""
        thread = self._background
        if thread is not None:
            thread.join(timeout)
            return not thread.is_alive()
        return True

    def clear_command_error(self) -> None:
        """Forget the last failed command (a new command was accepted)."""
        with self._lock:
            self._last_command_error = None

    @property
    def running_command(self) -> str | None:
        with self._lock:
            return self._running_command
