"""An embedded Tango database (pytango-db's Python DataBaseds) and server registration.

For the demo, the integration tests and a lab bench without a facility Tango host: starts the
database on a free port, registers ``DectrisLive`` devices with their properties and starts the
server through its console entry point, as a user would.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import tango

from .server import SERVER_NAME

_LISTENING = re.compile(r"Database DS listening on:.*, port=(\d+)\.")


class StartupError(RuntimeError):
    """A process did not come up; the message carries what it printed."""


def _wait_for_output_line(proc: subprocess.Popen, log_path: Path, pattern: re.Pattern[str],
                          timeout: float) -> re.Match[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log_path.read_text(errors="replace")
        match = pattern.search(text)
        if match:
            return match
        if proc.poll() is not None:
            raise StartupError(f"process exited with code {proc.returncode}:\n{text}")
        time.sleep(0.05)
    raise StartupError(f"no line matching {pattern.pattern!r} after {timeout:.0f} s:\n"
                       f"{log_path.read_text(errors='replace')}")


def stop_process(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class EmbeddedTangoDatabase:
    """A DataBaseds process on ``host`` and a free port, with an in-memory (or file) database."""

    def __init__(self, host: str = "127.0.0.1", db_file: str = ":memory:", port: int = 0) -> None:
        self.host = host
        self.db_file = db_file
        self._wanted_port = port  # 0: a free port chosen when starting
        self.port: int | None = None
        self._proc: subprocess.Popen | None = None
        self._workdir = Path(tempfile.mkdtemp(prefix="tango-db-"))
        self._servers: list[subprocess.Popen] = []
        self.servers: dict[str, subprocess.Popen] = {}  # instance -> its server process (the latest)

    @property
    def tango_host(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> "EmbeddedTangoDatabase":
        log_path = self._workdir / "databaseds.log"
        env = dict(os.environ, PYTANGO_DATABASE_NAME=self.db_file)
        with open(log_path, "wb") as log:
            self._proc = subprocess.Popen(
                [sys.executable, "-c", "import sys; from databaseds.database import main; "
                 "sys.exit(main())", "--host", self.host, "--port", str(self._wanted_port), "--print-host-port", "2"],
                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self._workdir)
        self.port = int(_wait_for_output_line(self._proc, log_path, _LISTENING, timeout).group(1))
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.database().get_info()
                return self
            except tango.DevFailed as exc:
                if time.monotonic() > deadline:
                    raise StartupError(f"the Tango database on {self.tango_host} does not answer: "
                                       f"{exc.args[0].desc}") from exc
                time.sleep(0.1)

    def database(self) -> tango.Database:
        return tango.Database(self.host, self.port)

    def register_device(self, instance: str, device: str, properties: dict[str, object]) -> None:
        """Add ``device`` of class DectrisLive to server ``DectrisLive/<instance>``."""
        info = tango.DbDevInfo()
        info.name = device
        info._class = "DectrisLive"
        info.server = f"{SERVER_NAME}/{instance}"
        db = self.database()
        db.add_device(info)
        db.put_device_property(device, {k: [str(v)] for k, v in properties.items()})

    def start_server(self, instance: str, device: str, timeout: float = 60.0,
                     extra_args: tuple[str, ...] = ()) -> subprocess.Popen:
        """Start ``tango-dectris-live INSTANCE`` against this database; return once ``device``
        answers a ping."""
        executable = shutil.which("tango-dectris-live", path=str(Path(sys.executable).parent)) \
            or shutil.which("tango-dectris-live")
        if executable is None:
            raise StartupError("the tango-dectris-live entry point is not installed "
                               "(pip install -e . in this environment)")
        log_path = self._workdir / f"server-{instance}.log"
        env = dict(os.environ, TANGO_HOST=self.tango_host)
        with open(log_path, "wb") as log:
            proc = subprocess.Popen([executable, instance, "-ORBendPoint", f"giop:tcp:{self.host}:0",
                                     *extra_args], stdout=log, stderr=subprocess.STDOUT, env=env)
        self._servers.append(proc)
        self.servers[instance] = proc
        deadline = time.monotonic() + timeout
        while True:
            try:
                tango.DeviceProxy(f"tango://{self.tango_host}/{device}").ping()
                return proc
            except tango.DevFailed as exc:
                if proc.poll() is not None:
                    raise StartupError(f"server {instance} exited with code {proc.returncode}:\n"
                                       f"{log_path.read_text(errors='replace')}") from exc
                if time.monotonic() > deadline:
                    raise StartupError(f"device {device} not exported after {timeout:.0f} s:\n"
                                       f"{log_path.read_text(errors='replace')}") from exc
                time.sleep(0.2)

    def stop(self) -> None:
        for proc in self._servers:
            stop_process(proc)
        self._servers.clear()
        if self._proc is not None:
            stop_process(self._proc)
            self._proc = None
        shutil.rmtree(self._workdir, ignore_errors=True)

    def __enter__(self) -> "EmbeddedTangoDatabase":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
