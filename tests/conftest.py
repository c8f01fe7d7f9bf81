"""Shared pytest fixtures: the real captures in ../shared/testdata and the simulator."""
from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

import pytest

# Device servers started by DeviceTestContext(process=True) must not be forked from a test process
# that holds a simulator's sockets: a forked child keeps the listening socket open, so a "stopped"
# simulator still accepts connections and its port cannot be bound again. forkserver children are
# exec'ed, and Python sockets are close-on-exec.
multiprocessing.set_start_method("forkserver", force=True)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
TESTDATA = Path(os.environ.get("DECTRIS_TESTDATA", PROJECT_ROOT.parent / "shared" / "testdata"))


@pytest.fixture(scope="session")
def testdata() -> Path:
    """The real detector captures; tests that need them skip where the folder is absent."""
    if not (TESTDATA / "stream_v1_eiger4m").is_dir():
        pytest.skip(f"real detector captures not found at {TESTDATA} (set DECTRIS_TESTDATA)")
    return TESTDATA


@pytest.fixture
def simulator(request):
    """A running simulator on 127.0.0.1 with free ports; model from ``@pytest.mark.parametrize``
    via indirect parametrisation, QUADRO by default. Stops cleanly after the test."""
    from sim.server import SimulatorServer

    model = getattr(request, "param", "QUADRO")
    server = SimulatorServer(host="127.0.0.1", port=0, stream_port=0, stream2_port=0, model=model)
    server.start()
    try:
        yield server
    finally:
        server.stop()
