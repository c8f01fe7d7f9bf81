"""The trigger generator wired to the simulator's external trigger input, as a Sardana
TriggerGate controller: for hardware-synchronised (continuous) scans on the detector simulator
(``simplon-sim``), in the tests and the demo. A beamline uses its own trigger generator's
controller (PandA, a timer card) instead; nothing in the DectrisLive controllers depends on this one.

The simulator fires its external triggers itself once armed (``ext_trigger_delay_s``, then one
every ``ext_trigger_period_s``); this controller programs those two from Sardana's
synchronisation description (time domain) and reports Moving while the detector takes them.
"""
from __future__ import annotations

import json
import time
import urllib.request

from sardana import State
from sardana.pool.controller import Description, TriggerGateController, Type
from sardana.pool.pooldefs import SynchDomain, SynchParam

_ARMED = ("ready", "acquire", "configure")


class SimplonSimTriggerGateController(TriggerGateController):
    """Programs the detector simulator's external trigger source (time domain only)."""

    gender = "Simulation"
    model = "simplon-sim external trigger"
    organization = "tango-dectris-live"
    MaxDevice = 1
    ctrl_properties = {
        "SimulatorUrl": {Type: str, Description: "Base URL of the simulator, e.g. http://127.0.0.1:8080"},
    }

    def __init__(self, inst, props, *args, **kwargs):
        TriggerGateController.__init__(self, inst, props, *args, **kwargs)
        self._expected_duration = 0.0
        self._started_at: float | None = None
        self._seen_armed = False

    def AddDevice(self, axis: int) -> None:
        pass

    def SynchOne(self, axis: int, configuration: list[dict]) -> None:
        if len(configuration) != 1:
            raise ValueError(f"the simulator's trigger source takes one group of triggers, got {len(configuration)}")
        group = configuration[0]
        delay = group.get(SynchParam.Delay, {}).get(SynchDomain.Time)
        total = group.get(SynchParam.Total, {}).get(SynchDomain.Time)
        repeats = int(group.get(SynchParam.Repeats, 1))
        if delay is None or total is None:
            raise ValueError("the simulator's trigger source works in the time domain: give delay and total times")
        self._put({"ext_trigger_delay_s": float(delay), "ext_trigger_period_s": float(total)})
        self._expected_duration = float(delay) + repeats * float(total)

    def PreStartOne(self, axis: int, value: float | None = None) -> bool:
        return True  # a trigger/gate controller's pre-start takes only the axis

    def StartOne(self, axis: int) -> None:
        self._started_at = time.monotonic()
        self._seen_armed = False

    def StateOne(self, axis: int) -> tuple[State, str]:
        if self._started_at is None:
            return State.On, "idle"
        state = self._detector_state()
        if state in _ARMED:
            self._seen_armed = True
            return State.Moving, f"triggering (detector {state})"
        # the detector is armed a little after the scan starts this controller: until it was
        # seen armed (or the triggers would long be over), the triggers are still to come
        waited = time.monotonic() - self._started_at
        if not self._seen_armed and waited < self._expected_duration + 10.0:
            return State.Moving, f"waiting for the detector to be armed (detector {state})"
        self._started_at = None
        return State.On, "triggers sent"

    def AbortOne(self, axis: int) -> None:
        self._started_at = None

    def _detector_state(self) -> str:
        with urllib.request.urlopen(f"{self.SimulatorUrl}/detector/api/1.8.0/status/state", timeout=5) as answer:
            return str(json.load(answer).get("value"))

    def _put(self, settings: dict) -> None:
        request = urllib.request.Request(f"{self.SimulatorUrl}/sim/api/config", data=json.dumps(settings).encode(),
                                         method="PUT", headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=5) as answer:
            answer.read()
