"""The detector component: one DECTRIS detector with live processing, Tango-free.

:class:`LiveDetector` owns the DCU client, the supervisor that watches the DCU, and the live
acquisition; it holds the validated :class:`~.settings.LiveSettings` and decides the device's
condition (state and status lines). It tells its :class:`DetectorListener` -- the Tango device,
or a test -- what changed; the device only translates (as ska-tango-base's component managers).

Threads: the supervisor's poll thread and the acquisition's threads call the listener; the
parameter catalogue is read in a thread of its own (seconds on a real DCU) and the worker
processes are started in one at start-up. Commands return as soon as the DCU answered.
"""
from __future__ import annotations

import enum
import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from tango_dectris_live.processing.acquisition import (AcquisitionMode, AcquisitionProgress, AcquisitionUpdate,
                                                       LiveAcquisition)
from tango_dectris_live.processing.analyses import AnalysisRegistry
from tango_dectris_live.processing.limits import SettingRefused
from tango_dectris_live.processing.series_saving import SeriesSaving
from tango_dectris_live.processing.snapshot import ResultSnapshot
from tango_dectris_live.simplon.client import DetectorClient
from tango_dectris_live.simplon.errors import SimplonError, UnknownParameterError
from tango_dectris_live.simplon.supervision import DetectorCondition, DetectorHealth, DetectorSupervisor

from .catalogue import ParameterCatalogue, read_catalogue
from .settings import LiveSettings, SettingsContext

log = logging.getLogger(__name__)


class DeviceState(enum.Enum):
    """The device's state, Tango-free (the device maps it 1:1 onto DevState)."""

    ON = "ON"  # idle
    RUNNING = "RUNNING"  # armed, acquiring, or an active live acquisition
    OFF = "OFF"  # the DCU needs Initialize
    INIT = "INIT"  # initializing, or reading the detector's parameters
    FAULT = "FAULT"
    UNKNOWN = "UNKNOWN"  # the DCU does not answer


_STATE_OF_CONDITION = {
    DetectorCondition.UNREACHABLE: DeviceState.UNKNOWN,
    DetectorCondition.NOT_INITIALIZED: DeviceState.OFF,
    DetectorCondition.INITIALIZING: DeviceState.INIT,
    DetectorCondition.IDLE: DeviceState.ON,
    DetectorCondition.BUSY: DeviceState.RUNNING,
    DetectorCondition.ERROR: DeviceState.FAULT,
}


@dataclass(frozen=True)
class DeviceCondition:
    state: DeviceState
    status: str


class CommandRefused(RuntimeError):
    """A command that the detector's state does not allow now (the message says why)."""


@dataclass(frozen=True)
class DetectorAddress:
    """Where the DCU and its stream are."""

    host: str
    port: int = 80
    api_version: str | None = None
    stream_host: str = ""  # empty: the DCU host
    stream_ports: Mapping[int, int] = field(default_factory=lambda: {1: 9999, 2: 31001})
    poll_period: float = 1.0


class DetectorListener(Protocol):
    """What the component tells its owner; called from the component's threads."""

    def condition_changed(self, condition: DeviceCondition) -> None: ...

    def acquisition_updated(self, update: AcquisitionUpdate) -> None: ...

    def parameters_read(self, catalogue: ParameterCatalogue) -> None: ...

    def parameter_changed(self, module: str, key: str, value: Any) -> None: ...

    def settings_changed(self, settings: LiveSettings) -> None: ...


AcquisitionFactory = Callable[..., LiveAcquisition]


class LiveDetector:
    """A DECTRIS detector with live processing; see the module docstring."""

    def __init__(self, address: DetectorAddress, listener: DetectorListener, *,
                 settings: LiveSettings = LiveSettings(), registry: AnalysisRegistry | None = None,
                 client: DetectorClient | None = None,
                 acquisition_factory: AcquisitionFactory = LiveAcquisition, saving_base_directory: str = "") -> None:
        self.address = address
        self._listener = listener
        self.registry = registry if registry is not None else AnalysisRegistry.discover()
        self._result_names: dict[str, list[str]] = {}
        self.analysis_problems: list[str] = []
        for name in self.registry.available():
            try:
                self._result_names[name] = self.registry.result_names(name)
            except Exception as exc:  # noqa: BLE001 - a facility analysis that cannot even run on blank frames
                log.error("analysis %s left out: %s", name, exc)
                self.analysis_problems.append(f"analysis {name} left out: {type(exc).__name__}: {exc}")
        self._settings = settings
        self.saving = SeriesSaving(saving_base_directory)
        self._settings.check(self._context(with_frame=False))
        self.saving.settings = settings.saving()
        # set before the acquisition exists: its publisher thread reports from the start
        self._progress = AcquisitionProgress(mode=AcquisitionMode.IDLE, message="idle")
        self._lock = threading.Lock()
        self._compose_lock = threading.Lock()
        self._compose_wanted = False
        self._catalogue: ParameterCatalogue | None = None
        self._catalogue_reader: threading.Thread | None = None
        self._condition = DeviceCondition(DeviceState.UNKNOWN, f"connecting to the DCU at {address.host}:{address.port}")
        self.acquisition: LiveAcquisition | None = None
        self.client = client if client is not None else DetectorClient(
            address.host, address.port, api_version=address.api_version, on_changed=listener.parameter_changed)
        self.supervisor = DetectorSupervisor(self.client, poll_period=address.poll_period,
                                             on_change=self._health_changed, on_reconnect=self._reconnected)
        self.acquisition = acquisition_factory(
            self.client, address.stream_host or address.host, dict(address.stream_ports), registry=self.registry,
            settings=settings.pipeline(), event_rate=settings.event_rate, series_timeout=settings.series_timeout,
            config_reuse=settings.config_reuse, saving=self.saving,
            on_update=self._acquisition_updated, transport=settings.transport, connection=settings.connection,
            result_counts={name: len(names) for name, names in self._result_names.items()})

    # ---- life cycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Read the DCU's health once (a reachable DCU's parameters are read at once), poll it from
        now on, and start the worker processes (seconds) in the background."""
        self._publish(self._condition)
        self.supervisor.refresh()
        self.supervisor.start()
        threading.Thread(target=self._prepare_workers, name="start-workers", daemon=True).start()

    def close(self) -> None:
        self.acquisition.close()
        self.supervisor.stop()
        self.client.close()

    def _prepare_workers(self) -> None:
        try:
            self.acquisition.prepare()
        except (OSError, RuntimeError, ValueError) as exc:
            log.error("worker processes could not start: %s", exc)

    # ---- what the listener reads ------------------------------------------------------------------

    @property
    def condition(self) -> DeviceCondition:
        return self._condition

    @property
    def settings(self) -> LiveSettings:
        return self._settings

    @property
    def progress(self) -> AcquisitionProgress:
        return self._progress

    @property
    def result_names(self) -> Mapping[str, list[str]]:
        """Result attribute names of every analysis that can be selected."""
        return self._result_names

    def available_analyses(self) -> list[str]:
        return [name for name in self.registry.available() if name in self._result_names]

    def snapshot(self) -> ResultSnapshot | None:
        return self.acquisition.snapshot()

    # ---- settings -------------------------------------------------------------------------------

    def change_settings(self, **changes: Any) -> LiveSettings:
        """Check and take new settings (SettingRefused names the limit); acquisition settings apply
        from the next Start/Listen, the event rate at once."""
        with self._lock:
            new = self._settings.changed(self._context(with_frame=True), **changes)
            self._settings = new
        self.acquisition.event_rate = new.event_rate
        self.acquisition.series_timeout = new.series_timeout
        self.acquisition.config_reuse = new.config_reuse
        self.saving.settings = new.saving()  # from the next series on
        self.acquisition.connection = new.connection
        self._listener.settings_changed(new)
        return new

    def _context(self, with_frame: bool) -> SettingsContext:
        return SettingsContext(check_analyses=self._check_analyses, result_count=self._result_count,
                               frame_shape=self.frame_shape if with_frame else (lambda: None),
                               check_saving=self.saving.check)

    def _check_analyses(self, names: tuple[str, ...]) -> None:
        self.registry.validate(list(names))  # UnknownAnalysisError names the available ones
        if any(name not in self._result_names for name in names):
            raise SettingRefused("; ".join(self.analysis_problems))

    def _result_count(self, names: tuple[str, ...]) -> int:
        return sum(len(self._result_names.get(name, ())) for name in names)

    def frame_shape(self) -> tuple[int, int] | None:
        """(height, width) of the detector's frames; None when the DCU cannot tell now."""
        try:
            return (int(self.client.get_value("detector", "config", "y_pixels_in_detector")),
                    int(self.client.get_value("detector", "config", "x_pixels_in_detector")))
        except (SimplonError, TypeError, ValueError):
            return None

    # ---- commands -------------------------------------------------------------------------------

    def initialize(self) -> None:
        self._command(lambda: self.supervisor.run_in_background("initialize", self.client.initialize))

    def arm(self) -> int:
        self._require(self._condition.state in (DeviceState.ON, DeviceState.FAULT), "Arm",
                      "the detector must be idle (State ON) to arm")
        return self._command(self.client.arm)

    def trigger(self) -> None:
        self._require(self._condition.state == DeviceState.RUNNING and self.supervisor.running_command is None,
                      "Trigger", "the detector must be armed (State RUNNING, no trigger in progress)")

        def trigger_in_background() -> None:
            # The timeout needs three reads: do them now, so the trigger reaches the DCU as soon as
            # possible after this command returns (a client may Cancel right after).
            timeout = self.client.trigger_timeout()
            self.supervisor.run_in_background("trigger", lambda: self.client.trigger(timeout=timeout))

        self._command(trigger_in_background)

    def disarm(self) -> int:
        return self._command(self.client.disarm)

    def cancel(self) -> int:
        return self._command(self.client.cancel)

    def abort(self) -> int:
        """Abort the detector and the live processing (pending frames are dropped)."""
        self.acquisition.abort()
        return self._command(self.client.abort)

    def start_acquisition(self) -> None:
        """Active live acquisition (configure, arm, receive, process, trigger); returns at once."""
        self._require(self._condition.state == DeviceState.ON, "Start", "the detector must be idle (State ON)")
        self._begin(self.acquisition.start)

    def listen(self) -> None:
        """Passive: every series armed by someone else is processed, until stop()."""
        self._begin(self.acquisition.listen)

    def stop(self) -> None:
        self.acquisition.stop()

    def _begin(self, begin: Callable) -> None:
        settings = self._settings
        self.acquisition.settings = settings.pipeline()
        begin(settings.request())
        self._compose()

    def _require(self, allowed: bool, name: str, reason: str) -> None:
        if not allowed:
            raise CommandRefused(f"{name} refused in State {self._condition.state.value}: {reason}")

    def _command(self, action: Callable[[], Any]) -> Any:
        # Cleared before, not after: a background command (Trigger) may fail before action() returns.
        self.supervisor.clear_command_error()
        result = action()
        self.supervisor.refresh()
        return result

    # ---- condition --------------------------------------------------------------------------------

    def _health_changed(self, health: DetectorHealth) -> None:
        if health.dcu_state not in (None, "na") and (self._catalogue is None or not self._catalogue.complete):
            # Reading ~100 parameters takes longer than a Tango client waits for a command, and
            # this may run in one (Initialize): read in the background, State INIT meanwhile.
            self._read_catalogue_in_background()
        self._compose()

    def _reconnected(self) -> None:
        if self.address.api_version is None:
            self.client.discover_version()
        self._read_catalogue()

    def _read_catalogue_in_background(self) -> None:
        with self._lock:
            if self._catalogue_reader is not None and self._catalogue_reader.is_alive():
                return
            self._catalogue_reader = threading.Thread(target=self._read_catalogue_then_compose,
                                                      name="simplon-parameters", daemon=True)
            self._catalogue_reader.start()

    def _read_catalogue_then_compose(self) -> None:
        try:
            self._read_catalogue()
        except SimplonError as exc:
            # Read again at the next change of the DCU's health (e.g. once it answers again).
            self._publish(DeviceCondition(DeviceState.FAULT, f"reading the detector's parameters failed: {exc}"))
            return
        self._compose()

    def _read_catalogue(self) -> None:
        try:
            dcu_state = self.client.state()
        except UnknownParameterError:
            dcu_state = "idle"  # a DCU that reports no state: taken as initialized (see the supervisor)
        catalogue = read_catalogue(self.client, dcu_state)
        self._catalogue = catalogue
        self._listener.parameters_read(catalogue)

    def _acquisition_updated(self, update: AcquisitionUpdate) -> None:
        previous, self._progress = self._progress, update.progress
        self._listener.acquisition_updated(update)
        if (previous.mode, previous.message, previous.hint, previous.saving_problem) != \
                (update.progress.mode, update.progress.message, update.progress.hint, update.progress.saving_problem):
            self._compose()

    def _compose(self) -> None:
        """State and Status from the DCU's health, the parameters read so far and the live processing.

        Commands, the supervisor and the publisher compose from their own threads, one at a time,
        each from what is current then: otherwise a composition read before a change could be
        published after the one that shows it (a Start's RUNNING after its session ended). A thread
        that finds another composing leaves the work to it (the other composes once more before it
        lets go) rather than wait: a Tango command holds the device's monitor, which the composing
        thread may need to push its events."""
        self._compose_wanted = True
        while self._compose_wanted and self._compose_lock.acquire(blocking=False):
            try:
                while self._compose_wanted:
                    self._compose_wanted = False
                    self._compose_now()
            finally:
                self._compose_lock.release()

    def _compose_now(self) -> None:
        health = self.supervisor.health
        catalogue = self._catalogue
        if health.dcu_state not in (None, "na") and (catalogue is None or not catalogue.complete):
            self._publish(DeviceCondition(DeviceState.INIT, "reading the detector's parameters from the DCU"))
            return
        lines = [health.message]
        if catalogue is not None and catalogue.missing:
            lines.append("The DCU does not provide: " + ", ".join(catalogue.missing))
        state = _STATE_OF_CONDITION[health.condition]
        acquisition, progress = self.acquisition, self._progress
        if acquisition.mode in (AcquisitionMode.ACTIVE, AcquisitionMode.NODE) and state == DeviceState.ON:
            state = DeviceState.RUNNING  # between series and triggers the DCU is idle: we are not
        if acquisition is None:
            self._publish(DeviceCondition(state, "\n".join(lines)))
            return
        lines.append(f"Live processing ({acquisition.mode.value}): {progress.message}")
        if progress.hint:
            lines.append(f"Pipeline: {progress.hint}")
        if acquisition.last_error:
            lines.append(f"Last acquisition error: {acquisition.last_error}")
        if progress.saving_problem:
            lines.append(f"Saving: {progress.saving_problem}")
        self._publish(DeviceCondition(state, "\n".join(lines)))

    def _publish(self, condition: DeviceCondition) -> None:
        self._condition = condition
        self._listener.condition_changed(condition)
