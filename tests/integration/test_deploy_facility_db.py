"""The deployment as a facility has it: MariaDB + Debian's DataBaseds, the device registered with
``deploy/register.py``, the server started by Debian's Starter by its name (``DectrisLive``, found
in the Starter's StartDsPath), a live acquisition through the database-resolved device name; the
server killed with SIGKILL, restarted by the Starter on its own, with its memorized settings.
And the other files of ``deploy/``: the dsconfig file and the systemd unit, checked as far as the
machine allows (``systemd-analyze verify``; dsconfig's json2tango is not installed here).

The Starter runs in its DEBUG mode here: there, AutoRestartDuration counts seconds instead of
minutes, so that a server that ran a few seconds is restarted (in production, with
``--auto-restart 1``, it must have run for more than a minute; see docs/deployment.md).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import pytest
import requests
import tango
from tango import DevState
from tango.server import device_property

from sim.server import SimulatorServer
from tango_dectris_live.device.dectris_live import DectrisLive
from tango_dectris_live.testing import acquire, wait_for
from tango_dectris_live.testing.facility_db import (FacilityTangoDatabase, TangoStarter, exported_server_pid,
                                                    missing_debian_parts, short_host_name, stop_exported_server)

from .live_reference import simulator_ground_truth

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PROJECT_ROOT = Path(__file__).resolve().parents[2]
REGISTER = PROJECT_ROOT / "deploy" / "register.py"
DSCONFIG = PROJECT_ROOT / "deploy" / "dsconfig.json"
UNIT = PROJECT_ROOT / "deploy" / "tango-dectris-live@.service"
UNIT_BIN = "/opt/tango-dectris-live/.venv/bin"  # where the unit expects the venv; a facility edits it
BIN = Path(sys.executable).parent  # the venv's bin: where pip put the DectrisLive executable
# Unique on the machine: the Starter also looks for a process running "DectrisLive <instance>"
INSTANCE = f"facility{os.getpid()}"
SERVER = f"DectrisLive/{INSTANCE}"
DEVICE = "test/facility/dectris"
NAV = (6, 8)
COUNT = int(np.prod(NAV))
TIMEOUT = 90.0
ARINA96 = (("binning_mode", "2x2"), ("pixel_format", "uint16"))  # ARINA binned: 96 x 96 uint16


def device_properties() -> dict[str, device_property]:
    return {name: value for name, value in vars(DectrisLive).items() if isinstance(value, device_property)}



# ---- the files, without a database ---------------------------------------------------------------

def test_dsconfig_file_has_the_dsconfig_layout_and_only_real_properties():
    """What json2tango checks first (its schema: no other top-level key, server/instance/class/
    device/properties, every value a list of strings), and that every property exists."""
    config = json.loads(DSCONFIG.read_text())
    assert set(config) <= {"_title", "_date", "_source", "_version", "servers", "classes"}, set(config)
    devices = [(server, cls, device, entry) for server, instances in config["servers"].items()
               for classes in instances.values() for cls, devices_of in classes.items()
               for device, entry in devices_of.items()]
    assert devices, "no device in dsconfig.json"
    known = device_properties()
    for server, cls, device, entry in devices:
        assert (server, cls) == ("DectrisLive", "DectrisLive")
        assert re.fullmatch(r"[-\w]+/[-\w]+/[-\w]+", device), device
        assert set(entry) <= {"properties", "attribute_properties"}, set(entry)
        assert {"DcuHost", "DcuPort"} <= set(entry["properties"])
        for name, values in entry["properties"].items():
            assert name in known, f"{name}: DectrisLive has no such property"
            assert values and all(isinstance(value, str) for value in values), f"{name}: {values!r}"


def test_systemd_unit_verifies_and_starts_the_server_by_name(tmp_path):
    unit = UNIT.read_text()
    assert f"ExecStart={UNIT_BIN}/DectrisLive %i" in unit
    assert re.search(r"^Restart=on-failure$", unit, re.MULTILINE)
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")
    # verify wants the ExecStart program to exist: the unit as installed next to this venv
    local = tmp_path / UNIT.name
    local.write_text(unit.replace(UNIT_BIN, str(BIN)))
    done = subprocess.run([analyze, "verify", str(local)], capture_output=True, text=True, timeout=60,
                          check=False)
    # an unknown or misspelt key is only a warning (exit code 0): the output must be empty too
    assert done.returncode == 0 and not (done.stdout + done.stderr).strip(), done.stdout + done.stderr


def test_register_says_when_tango_host_is_missing():
    env = {key: value for key, value in os.environ.items() if key != "TANGO_HOST"}
    done = subprocess.run([sys.executable, str(REGISTER), INSTANCE, DEVICE, "127.0.0.1"], env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode != 0 and "TANGO_HOST is not set" in done.stderr


# ---- against MariaDB + DataBaseds + Starter --------------------------------------------------------


@dataclass
class Facility:
    db: FacilityTangoDatabase
    starter: TangoStarter
    sim: SimulatorServer
    saving_base: Path
    register_output: str

    def proxy(self) -> tango.DeviceProxy:
        """The device by the name the database resolves (TANGO_HOST-style, no address of the server)."""
        return tango.DeviceProxy(f"tango://{self.db.tango_host}/{DEVICE}")


def register(db: FacilityTangoDatabase, *args: str) -> str:
    """``python deploy/register.py ...`` with TANGO_HOST set, as an administrator runs it."""
    done = subprocess.run([sys.executable, str(REGISTER), *args], env=db.environment(), capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0, f"register.py failed:\n{done.stdout}{done.stderr}"
    return done.stdout


def answers(proxy_of: Callable[[], tango.DeviceProxy]) -> bool:
    """Whether the device answers a ping now (a fresh proxy each time: it may have moved)."""
    try:
        proxy_of().ping()
        return True
    except tango.DevFailed:
        return False


@pytest.fixture(scope="module")
def facility(tmp_path_factory):
    missing = missing_debian_parts()
    if missing:
        pytest.skip(f"the facility set-up is not installed: {', '.join(missing)} (as root, "
                    f"bash tools/system_packages.sh installs tools/debian-packages/deploy.txt)")
    saving_base = tmp_path_factory.mktemp("facility_saving")
    host = short_host_name()
    with SimulatorServer(host="127.0.0.1", model="ARINA") as sim:
        rest = f"{sim.rest_url}/detector/api/1.8.0"
        requests.put(f"{rest}/command/initialize", timeout=60).raise_for_status()
        for key, value in (("trigger_mode", "ints"), *ARINA96):
            requests.put(f"{rest}/config/{key}", json={"value": value}, timeout=10).raise_for_status()
        requests.put(f"{sim.rest_url}/sim/api/config", json={"pacing": "max", "nav_shape": list(NAV)},
                     timeout=10).raise_for_status()
        with FacilityTangoDatabase() as db:
            output = register(db, INSTANCE, DEVICE, "127.0.0.1", str(sim.port),
                              "-p", f"StreamPort={sim.stream_port}", "-p", f"Stream2Port={sim.stream2_port}",
                              "-p", "StatePollPeriod=0.1", "-p", f"SavingBaseDirectory={saving_base}",
                              "--starter", host, "--auto-restart", "1")
            # The servers' logs (LogFileHome, /var/tmp/ds.log by default) in the test's folder.
            db.database().put_device_property(f"tango/admin/{host}", {"LogFileHome": [str(db.workdir)]})
            starter = TangoStarter(db, host, debug=True).start()
            try:
                yield Facility(db, starter, sim, saving_base, output)
            finally:
                starter.stop()  # first, or it would restart the server stopped next
                stop_exported_server(db.database(), SERVER)


def starter_entry(facility: Facility) -> str:
    """The Starter's line for our server: 'name<TAB>state<TAB>controlled<TAB>level<TAB>...'."""
    lines = facility.starter.proxy().read_attribute("Servers").value or ()
    return next((line for line in lines if line.split("\t")[0] == SERVER), "")


@pytest.fixture(scope="module")
def started(facility):
    """DevStart on the Starter, as Astor's 'start server' does; returns once the device answers."""
    facility.starter.proxy().DevStart(SERVER)
    wait_for(lambda: answers(facility.proxy), TIMEOUT,
             lambda: f"{DEVICE} exported by the server the Starter started:\n{facility.starter.log()}\n"
                     f"{server_log(facility)}")
    proxy = facility.proxy()
    wait_for(lambda: proxy.state() == DevState.ON, TIMEOUT, lambda: f"State ON ({proxy.status()})")
    proxy.analyses = ["sum", "sumsig"]
    proxy.nav_shape = list(NAV)
    return facility


def server_log(facility: Facility) -> str:
    """What the server printed: the Starter sends it to LogFileHome/ds.log/DectrisLive_<instance>.log."""
    path = facility.db.workdir / "ds.log" / f"DectrisLive_{INSTANCE}.log"
    return path.read_text(errors="replace")[-3000:] if path.exists() else f"(no {path})"


def sum_image_is_exact(facility: Facility, proxy: tango.DeviceProxy) -> None:
    truth = simulator_ground_truth(facility.sim, NAV)
    np.testing.assert_array_equal(proxy.sum_image, truth.sum_frames(range(COUNT)))


def test_register_writes_device_properties_and_starter_control(facility):
    db = facility.db.database()
    info = db.get_device_info(DEVICE)
    assert (info.class_name, info.ds_full_name) == ("DectrisLive", SERVER)
    properties = db.get_device_property(DEVICE, ["DcuHost", "DcuPort", "StreamPort", "SavingBaseDirectory"])
    assert list(properties["DcuHost"]) == ["127.0.0.1"]
    assert list(properties["DcuPort"]) == [str(facility.sim.port)]
    assert list(properties["StreamPort"]) == [str(facility.sim.stream_port)]
    assert list(properties["SavingBaseDirectory"]) == [str(facility.saving_base)]
    server_info = db.get_server_info(SERVER)
    assert (server_info.host, server_info.mode, server_info.level) == (facility.starter.instance, 1, 1)
    starter = db.get_device_property(facility.starter.device_name, ["StartDsPath", "AutoRestartDuration"])
    assert str(BIN.resolve()) in list(starter["StartDsPath"])
    assert list(starter["AutoRestartDuration"]) == ["1"]
    assert db.get_device_info(facility.starter.device_name).class_name == "Starter"
    assert f"{SERVER} controlled by the Starter of {facility.starter.instance} at startup level 1" \
        in facility.register_output


def test_register_refuses_an_unknown_property(facility):
    done = subprocess.run([sys.executable, str(REGISTER), INSTANCE, DEVICE, "127.0.0.1", "-p", "DcuHots=x"],
                          env=facility.db.environment(), capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode != 0 and "DcuHots: DectrisLive has no such property" in done.stderr


def test_the_starter_starts_the_server_by_its_name(started):
    pid = exported_server_pid(started.db.database(), SERVER)
    command = psutil.Process(pid).cmdline()
    # a console script: the venv's Python runs <bin>/DectrisLive <instance>
    assert command[-2:] == [str(BIN.resolve() / "DectrisLive"), INSTANCE], command
    wait_for(lambda: starter_entry(started).split("\t")[1:4] == ["ON", "1", "1"], 30,
             lambda: f"the Starter showing {SERVER} ON, controlled, level 1 (Servers: {starter_entry(started)!r})")


def test_live_acquisition_through_the_database_name(started):
    proxy = started.proxy()
    assert proxy.get_property("DcuPort")["DcuPort"] == [str(started.sim.port)]
    acquire(proxy, TIMEOUT)
    assert proxy.frames_processed == COUNT
    sum_image_is_exact(started, proxy)


@dataclass
class Restart:
    killed_pid: int
    killed_children: list[psutil.Process]  # its worker processes when it was killed


@pytest.fixture(scope="module")
def restarted(started):
    """Memorized settings written, then the server killed with SIGKILL: the Starter sees it fail (its
    ping thread) and, the server being controlled and AutoRestartDuration set, starts it again."""
    proxy = started.proxy()
    proxy.saving_mode = "results"
    proxy.saving_name_pattern = "after_restart_{series_id}.h5"
    proxy.config_reuse = 2.5
    database = started.db.database()
    pid = exported_server_pid(database, SERVER)
    server = psutil.Process(pid)
    children = server.children(recursive=True)
    os.kill(pid, signal.SIGKILL)
    server.wait(30)
    wait_for(lambda: exported_server_pid(database, SERVER) not in (None, pid) and answers(started.proxy), TIMEOUT,
             lambda: f"{SERVER} restarted by the Starter (Servers: {starter_entry(started)!r}):\n"
                     f"{started.starter.log()}")
    yield Restart(pid, children)
    # whatever the killed server left behind, ended by pid (test_the_killed_servers_workers_end_with_it
    # checks that nothing is)
    for leftover in children:
        try:
            leftover.kill()
        except psutil.NoSuchProcess:
            continue


def test_the_starter_restarts_a_killed_server(started, restarted):
    assert "Restart it" in started.starter.log()  # the Starter's own words: not a manual DevStart
    new_pid = exported_server_pid(started.db.database(), SERVER)
    assert new_pid != restarted.killed_pid
    assert psutil.Process(new_pid).cmdline()[-2:] == [str(BIN.resolve() / "DectrisLive"), INSTANCE]


def test_memorized_settings_are_back_and_a_second_acquisition_works(started, restarted):
    proxy = started.proxy()
    wait_for(lambda: proxy.state() == DevState.ON, TIMEOUT, lambda: f"State ON after the restart ({proxy.status()})")
    assert proxy.saving_mode == "results"
    assert proxy.saving_name_pattern == "after_restart_{series_id}.h5"
    assert proxy.config_reuse == 2.5
    assert list(proxy.nav_shape) == list(NAV)
    assert list(proxy.analyses) == ["sum", "sumsig"]

    acquire(proxy, TIMEOUT)
    sum_image_is_exact(started, proxy)
    wait_for(lambda: proxy.saving_status.startswith("saved"), TIMEOUT, lambda: proxy.saving_status)
    saved = Path(proxy.last_saved_file)
    assert saved.parent == started.saving_base and saved.name == f"after_restart_{proxy.series_id}.h5"


def test_the_killed_servers_workers_end_with_it(restarted):
    assert restarted.killed_children, "the server had no worker processes to check"
    _, alive = psutil.wait_procs(restarted.killed_children, timeout=20)
    assert not alive, f"left behind by the killed server: {[' '.join(p.cmdline())[:90] for p in alive]}"


def test_sigterm_ends_a_server_started_by_the_starter(started, restarted):
    pid = exported_server_pid(started.db.database(), SERVER)
    server = psutil.Process(pid)
    server.terminate()
    _, alive = psutil.wait_procs([server], timeout=15)
    assert not alive, f"SIGTERM pending and blocked: {Path(f'/proc/{pid}/status').read_text()[-400:]}"
