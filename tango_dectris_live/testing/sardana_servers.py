"""Sardana as a beamline runs it, for the integration tests and benchmarks: a Pool and a
MacroServer with a Door (Sardana's own ``Sardana`` server process) registered in a Tango database,
the Pool's controller path and the MacroServer's macro path given by the caller (the DectrisLive
ones: ``tango_dectris_live.sardana.CONTROLLER_PATH``/``MACRO_PATH``), macros run through the Door as
``spock`` runs them (RunMacro; State, Output and Error followed by change events)."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import tango

LOGS = ("Output", "Error", "Warning", "Info")


class StartupError(RuntimeError):
    """Sardana did not come up; the message carries what it printed."""


@dataclass
class MacroRun:
    """What a macro left: the Door's State at its end and every line of its logs."""

    state: tango.DevState
    logs: dict[str, list[str]] = field(default_factory=dict)

    @property
    def output(self) -> str:
        return "\n".join(self.logs.get("Output", []))

    @property
    def errors(self) -> str:
        return "\n".join(self.logs.get("Error", []))


class DoorClient:
    """A Door driven like spock: RunMacro, then the Door's State and logs by change events."""

    def __init__(self, name: str) -> None:
        self.proxy = tango.DeviceProxy(name)
        self._changed = threading.Condition()
        self._states: list[tango.DevState] = []
        self._logs: dict[str, list[str]] = {name: [] for name in LOGS}
        self._subscriptions = [self.proxy.subscribe_event("State", tango.EventType.CHANGE_EVENT, self._on_state)]
        for log in LOGS:
            self._subscriptions.append(self.proxy.subscribe_event(log, tango.EventType.CHANGE_EVENT,
                                                                  self._log_callback(log)))

    def _on_state(self, event: tango.EventData) -> None:
        if event.err or event.attr_value is None:
            return
        with self._changed:
            self._states.append(event.attr_value.value)
            self._changed.notify_all()

    def _log_callback(self, name: str):
        def push(event: tango.EventData) -> None:
            if event.err or event.attr_value is None or event.attr_value.value is None:
                return
            with self._changed:
                self._logs[name].extend(str(line) for line in event.attr_value.value)
        return push

    def run(self, *words: object, timeout: float = 120.0) -> MacroRun:
        """Run ``macro param ...`` and wait until the Door is no longer RUNNING."""
        with self._changed:
            seen = len(self._states)
            for lines in self._logs.values():
                lines.clear()
        self.proxy.RunMacro([str(word) for word in words])
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                after = self._states[seen:]
                if tango.DevState.RUNNING in after and after[-1] != tango.DevState.RUNNING:
                    return MacroRun(after[-1], {name: list(lines) for name, lines in self._logs.items()})
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"macro {' '.join(map(str, words))} still running after {timeout:.0f} s; "
                                       f"output so far: {self._logs}")
                self._changed.wait(left)

    def start(self, *words: object) -> None:
        """Start a macro and return at once (for a Stop in its middle)."""
        with self._changed:
            for lines in self._logs.values():
                lines.clear()
        self.proxy.RunMacro([str(word) for word in words])

    def wait_idle(self, timeout: float = 60.0) -> tango.DevState:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.proxy.state()
            if state not in (tango.DevState.RUNNING, tango.DevState.MOVING):
                return state
            time.sleep(0.05)
        raise TimeoutError(f"the Door is still {self.proxy.state()} after {timeout:.0f} s")

    def close(self) -> None:
        for subscription in self._subscriptions:
            try:
                self.proxy.unsubscribe_event(subscription)
            except tango.DevFailed:
                pass


@contextmanager
def default_database(tango_host: str) -> Iterator[None]:
    """Inside the block this process' default Tango database -- the one short device names and
    Sardana's aliases are looked up in -- is the one at ``tango_host``. The client library reads
    TANGO_HOST once and keeps that database for the process, so for a second (embedded) database in
    the same process, such as another test module's, its state is dropped first
    (``ApiUtil.cleanup``: proxies made before are not valid any more)."""
    saved = os.environ.get("TANGO_HOST")
    os.environ["TANGO_HOST"] = tango_host
    tango.ApiUtil.cleanup()
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("TANGO_HOST", None)
        else:
            os.environ["TANGO_HOST"] = saved


class SardanaServers:
    """``Sardana <instance>``: Pool ``<prefix>/pool/1``, MacroServer ``<prefix>/ms/1``, Door
    ``<prefix>/door/1``, registered in the database at ``tango_host`` (``host:port``) with the
    given controller and macro paths."""

    def __init__(self, tango_host: str, workdir: Path, controller_path: str, macro_path: str,
                 instance: str = "test", prefix: str = "test") -> None:
        self.tango_host = tango_host
        self.host = tango_host.rsplit(":", 1)[0]
        self.controller_path = controller_path
        self.macro_path = macro_path
        self.workdir = workdir
        self.instance = instance
        self.pool = f"{prefix}/pool/1"
        self.macro_server = f"{prefix}/ms/1"
        self.door = f"{prefix}/door/1"
        self._proc: subprocess.Popen | None = None
        self.log_path = workdir / "sardana.log"

    def start(self, timeout: float = 120.0) -> "SardanaServers":
        host, port = self.tango_host.rsplit(":", 1)
        database = tango.Database(host, int(port))
        for name, cls in ((self.pool, "Pool"), (self.macro_server, "MacroServer"), (self.door, "Door")):
            info = tango.DbDevInfo()
            info.name, info._class, info.server = name, cls, f"Sardana/{self.instance}"
            database.add_device(info)
        database.put_device_property(self.pool, {"PoolPath": [self.controller_path]})
        database.put_device_property(self.macro_server, {"PoolNames": [self.pool], "MacroPath": [self.macro_path],
                                                         "EnvironmentDb": [str(self.workdir / "macroserver.env")]})
        executable = shutil.which("Sardana", path=str(Path(sys.executable).parent))
        if executable is None:
            raise StartupError("Sardana's server is not installed (pip install tango-dectris-live[sardana])")
        env = dict(os.environ, TANGO_HOST=self.tango_host)
        with open(self.log_path, "wb") as log:
            self._proc = subprocess.Popen([executable, self.instance, "-ORBendPoint", f"giop:tcp:{self.host}:0"],
                                          stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.workdir)
        deadline = time.monotonic() + timeout
        while True:
            try:
                tango.DeviceProxy(self.door).ping()
                return self
            except tango.DevFailed as exc:
                if self._proc.poll() is not None:
                    raise StartupError(f"Sardana exited with code {self._proc.returncode}:\n"
                                       f"{self.log_path.read_text(errors='replace')}") from exc
                if time.monotonic() > deadline:
                    raise StartupError(f"the Door is not exported after {timeout:.0f} s:\n"
                                       f"{self.log_path.read_text(errors='replace')}") from exc
                time.sleep(0.2)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 20.0) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
