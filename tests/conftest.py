"""Shared pytest fixtures: the real captures in ../shared/testdata and the simulator."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

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
