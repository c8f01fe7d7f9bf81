"""The server as a user runs it: `tango-dectris-live INSTANCE` against an embedded Tango database."""
from __future__ import annotations

import pytest
import requests
import tango
from tango import DevState

from tango_dectris_live.device.embedded_db import EmbeddedTangoDatabase
from tango_dectris_live.testing import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DEVICE = "test/dectris/1"


@pytest.fixture
def tango_db():
    with EmbeddedTangoDatabase() as db:
        yield db


def test_entry_point_serves_the_device_from_the_database(tango_db, simulator):
    tango_db.register_device("it", DEVICE, {"DcuHost": "127.0.0.1", "DcuPort": simulator.port,
                                            "StatePollPeriod": 0.1})
    tango_db.start_server("it", DEVICE)
    proxy = tango.DeviceProxy(f"tango://{tango_db.tango_host}/{DEVICE}")
    assert proxy.info().dev_class == "DectrisLive"
    assert proxy.get_property("DcuPort")["DcuPort"] == [str(simulator.port)]
    assert proxy.state() == DevState.OFF
    proxy.Initialize()
    wait_for(lambda: proxy.state() == DevState.ON, what="ON after Initialize")
    # No receiver here: with the stream off the simulator sends nothing, like a DCU.
    proxy.stream_mode = list(proxy.get_attribute_config("stream_mode").enum_labels).index("disabled")
    proxy.nimages = 4
    assert proxy.nimages == 4
    labels = list(proxy.get_attribute_config("trigger_mode").enum_labels)
    proxy.trigger_mode = labels.index("exts")
    # the simulated trigger input would otherwise fire at once and the series could be over (State
    # ON again) before the state is read
    requests.put(f"http://127.0.0.1:{simulator.port}/sim/api/config", json={"ext_trigger_delay_s": 600},
                 timeout=10).raise_for_status()
    series = proxy.Arm()
    assert proxy.state() == DevState.RUNNING, proxy.status()
    assert proxy.Disarm() == series
    wait_for(lambda: proxy.state() == DevState.ON, what="ON after Disarm")


def test_entry_point_without_database(simulator, tmp_path):
    """-nodb -port N -dlist NAME with the DCU address given by --dcu."""
    import socket
    import subprocess
    import sys
    from pathlib import Path

    from tango_dectris_live.device.embedded_db import stop_process

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = Path(sys.executable).parent / "tango-dectris-live"
    log = tmp_path / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(exe), "nodb", "-nodb", "-port", str(port), "-dlist", DEVICE,
                                 "-ORBendPoint", f"giop:tcp:127.0.0.1:{port}",
                                 "--dcu", f"127.0.0.1:{simulator.port}"], stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        proxy = tango.DeviceProxy(f"tango://127.0.0.1:{port}/{DEVICE}#dbase=no")

        def answers():
            try:
                return proxy.state()
            except tango.DevFailed:
                assert proc.poll() is None, log.read_text()
                return None

        assert wait_for(answers, what="the -nodb server to answer") == DevState.OFF
    finally:
        stop_process(proc)


def test_live_settings_come_back_after_a_restart(tango_db, simulator):
    """Radii, nav_shape, beam centre, analyses, series_timeout written by a client are there
    again after the server restarts; the ring comes back with inner < outer whatever the order."""
    from tango_dectris_live.device.embedded_db import stop_process

    tango_db.register_device("it", DEVICE, {"DcuHost": "127.0.0.1", "DcuPort": simulator.port,
                                            "StatePollPeriod": 0.1})
    server = tango_db.start_server("it", DEVICE)
    proxy = tango.DeviceProxy(f"tango://{tango_db.tango_host}/{DEVICE}")
    proxy.adf_outer_radius = 60.0
    proxy.adf_inner_radius = 30.0  # above the default outer radius: only valid after the write above
    proxy.bf_radius = 20.0
    proxy.nav_shape = [16, 32]
    proxy.analyses = ["sum", "bf"]
    proxy.series_timeout = 7.5
    stop_process(server)
    tango_db.start_server("it", DEVICE)
    proxy = tango.DeviceProxy(f"tango://{tango_db.tango_host}/{DEVICE}")
    wait_for(lambda: proxy.series_timeout == 7.5, what="memorized attributes restored")
    assert (proxy.bf_radius, proxy.adf_inner_radius, proxy.adf_outer_radius) == (20.0, 30.0, 60.0)
    assert list(proxy.nav_shape) == [16, 32]
    assert list(proxy.analyses) == ["sum", "bf"]
