"""The ``DectrisLive`` Tango device: a DECTRIS detector (SIMPLON API) in the control system.

Thin by design: the DCU client (:mod:`tango_dectris_live.simplon`) does the talking and the
:class:`~tango_dectris_live.simplon.supervision.DetectorSupervisor` decides the health; this class
only translates them into Tango attributes, commands, State/Status and events.
"""
from __future__ import annotations

import logging
import os
import threading
from typing import Any, Callable

import tango
from tango import DevState
from tango.server import Device, command, device_property

from ..simplon.client import DetectorClient
from ..simplon.errors import DetectorNotInitializedError, SimplonError, UnknownParameterError
from ..simplon.supervision import DetectorCondition, DetectorHealth, DetectorSupervisor
from .simplon_attributes import (
    CORE_KEYS,
    UNLISTED_KEYS,
    SimplonAttribute,
    attribute_name,
    describe_attribute,
    tango_attribute_kwargs,
)

log = logging.getLogger(__name__)

_STATE_OF_CONDITION = {
    DetectorCondition.UNREACHABLE: DevState.UNKNOWN,
    DetectorCondition.NOT_INITIALIZED: DevState.OFF,
    DetectorCondition.INITIALIZING: DevState.INIT,
    DetectorCondition.IDLE: DevState.ON,
    DetectorCondition.BUSY: DevState.RUNNING,
    DetectorCondition.ERROR: DevState.FAULT,
}

# (module, task) pairs whose parameters become attributes, in creation order.
_PARAMETER_GROUPS = (
    ("detector", "config"), ("detector", "status"),
    ("stream", "config"), ("stream", "status"),
    ("filewriter", "config"), ("filewriter", "status"),
    ("monitor", "config"), ("monitor", "status"),
)

# Fallbacks for a device started with -nodb (no properties): set by ``--dcu HOST:PORT``.
ENV_DCU_HOST = "DECTRIS_LIVE_DCU_HOST"
ENV_DCU_PORT = "DECTRIS_LIVE_DCU_PORT"


def _throw(exc: Exception, origin: str) -> None:
    """Re-raise a client-side error as the DevFailed a Tango client sees (reason = error class)."""
    tango.Except.throw_exception(type(exc).__name__, str(exc), origin)


class DectrisLive(Device):
    """A DECTRIS detector: every SIMPLON parameter as a typed attribute, SIMPLON commands,
    State from the detector state (ON idle, RUNNING armed/acquiring, OFF needs Initialize,
    FAULT detector error, UNKNOWN DCU unreachable)."""

    DcuHost = device_property(dtype=str, default_value="",
                              doc="Host name or address of the DCU (the detector control unit)")
    DcuPort = device_property(dtype=int, default_value=80, doc="HTTP port of the SIMPLON API")
    ApiVersion = device_property(dtype=str, default_value="",
                                 doc="SIMPLON API version (1.8.0 or 1.6.0); empty: ask the DCU")
    StreamPort = device_property(dtype=int, default_value=9999, doc="Stream v1 (legacy) port")
    Stream2Port = device_property(dtype=int, default_value=31001, doc="Stream v2 (CBOR) port")
    StatePollPeriod = device_property(dtype=float, default_value=1.0,
                                      doc="Seconds between two reads of the detector state")

    # -- life cycle -------------------------------------------------------------------------

    def init_device(self) -> None:
        super().init_device()
        for name in ("State", "Status"):
            self.set_change_event(name, True, False)
        self._attributes: dict[str, SimplonAttribute] = {}
        self._attribute_lock = threading.Lock()
        self._attribute_builder: threading.Thread | None = None
        self._builder_lock = threading.Lock()
        self._config_attributes_built = False
        self._missing_parameters: list[str] = []
        host = self.DcuHost or os.environ.get(ENV_DCU_HOST, "")
        port = self.DcuPort if self.DcuHost else int(os.environ.get(ENV_DCU_PORT, self.DcuPort))
        self._supervisor = None
        if not host:
            self._set_health(DevState.FAULT, "the DcuHost property is not set: set it to the DCU's "
                                             "address (or start the server with --dcu HOST:PORT)")
            return
        self._client = DetectorClient(host, port, api_version=self.ApiVersion or None,
                                      on_changed=self._on_dcu_changed)
        self._supervisor = DetectorSupervisor(self._client, poll_period=self.StatePollPeriod,
                                              on_change=self._on_health,
                                              on_reconnect=self._on_reconnect)
        self._set_health(DevState.UNKNOWN, f"connecting to the DCU at {host}:{port}")
        self._supervisor.refresh()  # so that a reachable DCU's attributes exist at once
        self._supervisor.start()

    def delete_device(self) -> None:
        if self._supervisor is not None:
            self._supervisor.stop()
            self._client.close()
        super().delete_device()

    # -- health → State/Status ----------------------------------------------------------------

    def _set_health(self, state: DevState, status: str) -> None:
        state_changed = state != self.get_state()
        self.set_state(state)
        self.set_status(status)
        if state_changed:
            self.push_change_event("State", state)
        self.push_change_event("Status", status)

    def _on_health(self, health: DetectorHealth) -> None:
        if health.dcu_state not in (None, "na") and not self._config_attributes_built:
            # Reading ~100 parameters takes longer than a Tango client waits for a command, and
            # this may run in one (Initialize): build in the background, State INIT meanwhile.
            self._start_attribute_build()
            self._set_health(DevState.INIT, "reading the detector's parameters from the DCU")
            return
        status = health.message
        if self._missing_parameters:
            status += ("\nThe DCU does not provide: " + ", ".join(self._missing_parameters))
        self._set_health(_STATE_OF_CONDITION[health.condition], status)

    def _start_attribute_build(self) -> None:
        with self._builder_lock:
            if self._attribute_builder is not None and self._attribute_builder.is_alive():
                return
            self._attribute_builder = threading.Thread(target=self._build_then_publish,
                                                       name="simplon-attributes", daemon=True)
            self._attribute_builder.start()

    def _build_then_publish(self) -> None:
        try:
            self._build_simplon_attributes()
        except SimplonError as exc:
            # Retried at the next change of the DCU's health (e.g. once it answers again).
            self._set_health(DevState.FAULT, f"reading the detector's parameters failed: {exc}")
            return
        self._on_health(self._supervisor.health)

    def _on_reconnect(self) -> None:
        if not self.ApiVersion:
            self._client.discover_version()
        self._build_simplon_attributes()

    # -- SIMPLON parameters as dynamic attributes -------------------------------------------

    def _build_simplon_attributes(self) -> None:
        """Create an attribute for every parameter the DCU lists (plus the core set and the
        unlisted quirks). Before Initialize (``na``) a DCU answers only its state, so the rest is
        built when it leaves ``na``; existing attributes are kept."""
        dcu_state = self._client.state()
        with self._attribute_lock:
            missing = []
            for module, task in _PARAMETER_GROUPS:
                if dcu_state == "na" and (module, task) != ("detector", "status"):
                    continue
                keys = ["state"] if dcu_state == "na" else self._keys_of(module, task, missing)
                for key in keys:
                    name = attribute_name(module, task, key)
                    if name in self._attributes:
                        continue
                    try:
                        info = self._client.describe(module, task, key)
                    except (UnknownParameterError, DetectorNotInitializedError):
                        if key in CORE_KEYS.get((module, task), ()):
                            missing.append(f"{module}/{task}/{key}")
                        continue
                    spec = describe_attribute(info)
                    if spec is not None:
                        self._add_simplon_attribute(spec)
            if dcu_state != "na":
                self._config_attributes_built = True
            self._missing_parameters = missing

    def _keys_of(self, module: str, task: str, missing: list[str]) -> list[str]:
        try:
            keys = list(self._client.list_keys(module, task))
        except UnknownParameterError:
            # No listing (older firmware, minimal simulators): fall back to the core keys.
            missing.append(f"{module}/{task}/keys")
            keys = list(CORE_KEYS.get((module, task), ()))
        for key in UNLISTED_KEYS.get((module, task), ()):
            if key not in keys:
                keys.append(key)
        return keys

    def _add_simplon_attribute(self, spec: SimplonAttribute) -> None:
        kwargs = tango_attribute_kwargs(spec)
        attr = tango.Attr(spec.name, spec.dtype, spec.access) if spec.dformat == tango.AttrDataFormat.SCALAR \
            else tango.SpectrumAttr(spec.name, spec.dtype, spec.access, kwargs["max_dim_x"])
        props = tango.UserDefaultAttrProp()
        props.set_description(kwargs["doc"])
        if "unit" in kwargs:
            props.set_unit(kwargs["unit"])
            props.set_display_unit(kwargs["unit"])
        if "enum_labels" in kwargs:
            props.set_enum_labels(kwargs["enum_labels"])
        attr.set_default_properties(props)
        writer = self._write_simplon if spec.access == tango.AttrWriteType.READ_WRITE else None
        self.add_attribute(attr, r_meth=self._read_simplon, w_meth=writer)
        self.set_change_event(spec.name, True, False)
        self._attributes[spec.name] = spec

    def _read_simplon(self, attr: tango.Attribute) -> None:
        spec = self._attributes[attr.get_name()]
        try:
            value = self._client.get_value(spec.module, spec.info.task, spec.key)
        except SimplonError as exc:
            _throw(exc, f"DectrisLive.read({spec.name})")
        try:
            attr.set_value(spec.to_tango(value))
        except ValueError as exc:
            _throw(exc, f"DectrisLive.read({spec.name})")

    def _write_simplon(self, attr: tango.WAttribute) -> None:
        spec = self._attributes[attr.get_name()]
        value = spec.from_tango(attr.get_write_value())
        try:
            self._client.write(spec.module, spec.key, value)
        except SimplonError as exc:
            _throw(exc, f"DectrisLive.write({spec.name})")

    def _on_dcu_changed(self, module: str, key: str, value: Any) -> None:
        """The DCU reported ``key`` as changed by a write: push it to subscribers."""
        spec = self._attributes.get(attribute_name(module, "config", key))
        if spec is None or spec.info.task != "config":
            return
        try:
            self.push_change_event(spec.name, spec.to_tango(value))
        except ValueError as exc:
            log.warning("cannot publish the change of %s: %s", spec.name, exc)

    # -- SIMPLON commands -------------------------------------------------------------------

    def _require(self, condition: bool, name: str, reason: str) -> None:
        if not condition:
            tango.Except.throw_exception("CommandNotAllowed", f"{name} refused in State "
                                         f"{self.get_state()}: {reason}", f"DectrisLive.{name}")

    def _call(self, name: str, action: Callable[[], Any]) -> Any:
        if self._supervisor is None:
            tango.Except.throw_exception("NotConfigured", self.get_status(), f"DectrisLive.{name}")
        try:
            result = action()
        except SimplonError as exc:
            _throw(exc, f"DectrisLive.{name}")
        self._supervisor.clear_command_error()
        self._supervisor.refresh()
        return result

    @command(doc_in="Initialize the detector (runs in the background, up to minutes on real "
                    "hardware: State is INIT meanwhile, then ON)")
    def Initialize(self) -> None:
        self._call("Initialize",
                   lambda: self._supervisor.run_in_background("initialize", self._client.initialize))

    @command(dtype_out=int, doc_out="the series id of the armed series")
    def Arm(self) -> int:
        self._require(self.get_state() in (DevState.ON, DevState.FAULT), "Arm",
                      "the detector must be idle (State ON) to arm")
        return self._call("Arm", self._client.arm)

    @command(doc_in="Software trigger (ints/inte). Returns at once; in ints the series runs in the "
                    "background and State is RUNNING until it is done")
    def Trigger(self) -> None:
        self._require(self.get_state() == DevState.RUNNING and self._supervisor.running_command is None,
                      "Trigger", "the detector must be armed (State RUNNING, no trigger in progress)")
        def trigger_in_background() -> None:
            # The timeout needs three reads: do them now, so the trigger reaches the DCU as soon as
            # possible after this command returns (a client may Cancel right after).
            timeout = self._client.trigger_timeout()
            self._supervisor.run_in_background(
                "trigger", lambda: self._client.trigger(timeout=timeout))

        self._call("Trigger", trigger_in_background)

    @command(dtype_out=int, doc_out="the series id")
    def Disarm(self) -> int:
        return self._call("Disarm", self._client.disarm)

    @command(dtype_out=int, doc_out="the series id")
    def Cancel(self) -> int:
        return self._call("Cancel", self._client.cancel)

    @command(dtype_out=int, doc_out="the series id")
    def Abort(self) -> int:
        return self._call("Abort", self._client.abort)

    # -- helpers for clients ----------------------------------------------------------------

    @command(dtype_out=[str], doc_out="attribute name → SIMPLON module/task/key, one per line")
    def ListSimplonAttributes(self) -> list[str]:
        return [f"{name} {spec.module}/{spec.info.task}/{spec.key}"
                for name, spec in sorted(self._attributes.items())]

