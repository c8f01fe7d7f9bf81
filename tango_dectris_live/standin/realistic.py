"""The realistic stand-in: the real DectrisLive server on a simulated DCU, in an embedded Tango DB.

Made of the pieces the demo and the integration tests use: the simulator
(:class:`sim.server.SimulatorServer`, in this process), the embedded database and the server as a
user starts it (:class:`~tango_dectris_live.device.embedded_db.EmbeddedTangoDatabase`). Once
started the device has been initialized and is ON: a client finds it as it would find a detector
at the beamline.
"""
from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType

import tango

from sim.models import MODELS
from sim.server import SimulatorServer

from ..device.embedded_db import EmbeddedTangoDatabase
from ..testing import wait_for

DEFAULT_DEVICE = "test/dectris/1"
DEFAULT_MODEL = "ARINA"
SERVER_INSTANCE = "standin"
MODEL_NAMES = tuple(sorted(MODELS))


class StandInError(RuntimeError):
    """A setting of the stand-in is refused, or it is used before it is started; the message says which."""


class RealisticStandIn:
    """Simulator + embedded Tango DB + DectrisLive server, started and stopped together.

    ``saving_base``: the device's ``SavingBaseDirectory`` (None: a new temporary folder, removed by
    :meth:`stop` when no file was saved in it, else kept: it holds the user's series files).
    ``host``: where everything listens; ``port``: the Tango database's (0: a free one); the other
    ports are free ones chosen when starting.
    """

    def __init__(self, model: str = DEFAULT_MODEL, device: str = DEFAULT_DEVICE, host: str = "127.0.0.1",
                 saving_base: Path | None = None, state_poll_period: float = 0.2, port: int = 0) -> None:
        if model not in MODELS:
            raise StandInError(f"unknown detector model {model!r}: choose one of {', '.join(MODEL_NAMES)}")
        if device.count("/") != 2 or not all(device.split("/")):
            raise StandInError(f"device name {device!r} is not domain/family/member")
        if not 0 <= port <= 65535:
            raise StandInError(f"port {port} is not a TCP port (0: a free one)")
        self.model = model
        self.port = port
        self.device = device
        self.host = host
        self.saving_base = saving_base
        self.state_poll_period = state_poll_period
        self.simulator: SimulatorServer | None = None
        self.database: EmbeddedTangoDatabase | None = None
        self._proxy: tango.DeviceProxy | None = None
        self.server_process: subprocess.Popen | None = None
        self._made_saving_base = False

    @property
    def tango_host(self) -> str:
        if self.database is None:
            raise StandInError("the stand-in is not started")
        return self.database.tango_host

    @property
    def device_url(self) -> str:
        """The device's full name, usable without setting TANGO_HOST."""
        return f"tango://{self.tango_host}/{self.device}"

    @property
    def proxy(self) -> tango.DeviceProxy:
        if self._proxy is None:
            raise StandInError("the stand-in is not started")
        return self._proxy

    def start(self, timeout: float = 120.0) -> RealisticStandIn:
        """Start the simulator, the database and the server; Initialize; return once State is ON."""
        try:
            self.simulator = SimulatorServer(host=self.host, model=self.model).start()
            self.database = EmbeddedTangoDatabase(host=self.host, port=self.port).start()
            if self.saving_base is None:
                self.saving_base = Path(tempfile.mkdtemp(prefix="dectris-standin-"))
                self._made_saving_base = True
            self.saving_base.mkdir(parents=True, exist_ok=True)
            self.database.register_device(SERVER_INSTANCE, self.device, {
                "DcuHost": self.host, "DcuPort": self.simulator.port, "StreamPort": self.simulator.stream_port,
                "Stream2Port": self.simulator.stream2_port, "StatePollPeriod": self.state_poll_period,
                "SavingBaseDirectory": str(self.saving_base.resolve())})
            self.server_process = self.database.start_server(SERVER_INSTANCE, self.device, timeout=timeout)
            self._proxy = tango.DeviceProxy(self.device_url)
            self._proxy.set_timeout_millis(10000)
            self._proxy.Initialize()
            wait_for(lambda: self._proxy.state() == tango.DevState.ON, timeout,
                     lambda: f"the stand-in device ON after Initialize (Status: {self._proxy.status()})")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop the server, the database and the simulator (idempotent); remove the temporary
        series folder if nothing was saved in it."""
        self._proxy = None
        self.server_process = None
        if self.database is not None:
            self.database.stop()
            self.database = None
        if self.simulator is not None:
            self.simulator.stop()
            self.simulator = None
        if self._made_saving_base and self.saving_base is not None \
                and not any(path.is_file() for path in self.saving_base.rglob("*")):
            shutil.rmtree(self.saving_base, ignore_errors=True)

    def __enter__(self) -> RealisticStandIn:  # noqa: PYI034 - Python 3.10 has no typing.Self
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
