"""Sardana scans as a user waits for them: macros sent to the Door, timed from ``RunMacro`` to the
Door back ON (the scan's data recorded, the device ready again).

Started once, outside the measured time: the simulator (ARINA binned 96x96, pacing at the frame
time unless ``--pacing max``), the embedded Tango database, the ``DectrisLive`` server, Sardana's
``Sardana`` server (Pool + MacroServer + Door) with a dummy motor, ``dectris_live_setup`` (the
detector image and the five virtual counters in one measurement group), and one warm-up ``ct``.
The dummy motor is set to move at once (velocity 1000, acceleration 1 ms). Then, per round: the
same ``ct`` and ``ascan`` with Sardana's own dummy counter/timer (what Sardana itself takes), then
with the DectrisLive group: ``ct`` ``--ct`` times (median and p90 ms), an ``ascan`` of
``--points`` points (points/s, the Door's time for the whole macro including its file), and an
``ascanct`` of the same number of points with the simulator's trigger input (hardware-triggered
counters only).

    .venv/bin/python benchmarks/bench_sardana.py --ct 20 --points 50 --rounds 3 [--config-reuse 2]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import requests
import tango

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sim.server import SimulatorServer  # noqa: E402
from tango_dectris_live.device.embedded_db import EmbeddedTangoDatabase  # noqa: E402
from tango_dectris_live.sardana import CONTROLLER_PATH, MACRO_PATH  # noqa: E402
from tango_dectris_live.testing import wait_for  # noqa: E402
from tango_dectris_live.testing.sardana_servers import DoorClient, SardanaServers  # noqa: E402

DEVICE = "bench/dectris/1"
COUNTERS = ("dlive_sumsig", "dlive_bf", "dlive_adf", "dlive_com_x", "dlive_com_y")


def timed(door: DoorClient, *words: object) -> float:
    started = time.perf_counter()
    run = door.run(*words, timeout=600)
    elapsed = time.perf_counter() - started
    if run.state != tango.DevState.ON:
        raise RuntimeError(f"{' '.join(map(str, words))} ended {run.state}: {run.errors}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ct", type=int, default=20, help="ct macros per round")
    parser.add_argument("--points", type=int, default=50, help="points of the ascan and the ascanct")
    parser.add_argument("--integration", type=float, default=0.001, help="integration time per point (s)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pacing", choices=("frame_time", "max"), default="frame_time")
    parser.add_argument("--config-reuse", type=float, default=0.0,
                        help="the device's config_reuse (s): DCU settings read once per this long")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="bench-sardana-"))
    (base / "data").mkdir()
    (base / "scans").mkdir()
    with SimulatorServer(host="127.0.0.1", model="ARINA") as sim, EmbeddedTangoDatabase() as db:
        os.environ["TANGO_HOST"] = db.tango_host
        rest = f"{sim.rest_url}/detector/api/1.8.0"
        requests.put(f"{rest}/command/initialize", timeout=60).raise_for_status()
        for key, value in (("trigger_mode", "ints"), ("binning_mode", "2x2"), ("pixel_format", "uint16")):
            requests.put(f"{rest}/config/{key}", json={"value": value}, timeout=10).raise_for_status()
        requests.put(f"{sim.rest_url}/sim/api/config", json={"pacing": args.pacing, "nav_shape": [1, 1]},
                     timeout=10).raise_for_status()
        db.register_device("bench", DEVICE, {
            "DcuHost": "127.0.0.1", "DcuPort": sim.port, "StreamPort": sim.stream_port,
            "Stream2Port": sim.stream2_port, "StatePollPeriod": 1.0, "SavingBaseDirectory": str(base / "data")})
        db.start_server("bench", DEVICE)
        device = tango.DeviceProxy(DEVICE)
        wait_for(lambda: device.state() == tango.DevState.ON, 60, lambda: f"device ON ({device.status()})")
        device.config_reuse = args.config_reuse
        sardana = SardanaServers(db.tango_host, base, CONTROLLER_PATH, MACRO_PATH).start()
        door = DoorClient(sardana.door)
        try:
            for words in (("defctrl", "DummyMotorController", "motctrl"), ("defelem", "dummy_mot", "motctrl", "1"),
                          ("dectris_live_setup", DEVICE), ("senv", "ScanDir", str(base / "scans")),
                          ("defctrl", "SimplonSimTriggerGateController", "simtg", "SimulatorUrl", sim.rest_url),
                          ("defelem", "simtg01", "simtg", "1"), ("defmeas", "dlive_hw_mg", *COUNTERS),
                          ("set_meas_conf", "Synchronizer", "simtg01", "[]", "dlive_hw_mg"),
                          ("set_meas_conf", "Synchronization", "Trigger", "[]", "dlive_hw_mg"),
                          ("defctrl", "DummyCounterTimerController", "ctdummy"),
                          ("defelem", "dummy_ct01", "ctdummy", "1"), ("defelem", "dummy_ct02", "ctdummy", "2"),
                          ("defmeas", "dummy_mg", "dummy_ct01", "dummy_ct02"),
                          ("defmeas", "dlive_counters_mg", *COUNTERS),
                          ("senv", "ActiveMntGrp", "dlive_mg"), ("ct", args.integration)):
                timed(door, *words)
            # the motor moves at once: the scan's time is the acquisitions' and Sardana's
            motor = tango.DeviceProxy("dummy_mot")
            motor.acceleration = motor.deceleration = 0.001
            motor.velocity = 1000.0
            print(f"ARINA 96x96, pacing {args.pacing}, integration {args.integration} s, config_reuse "
                  f"{args.config_reuse:g} s; "
                  f"group dlive_mg = image + 5 virtual counters")
            for round_ in range(1, args.rounds + 1):
                # Sardana's own dummy counters: what Sardana itself takes per ct and per point
                timed(door, "senv", "ActiveMntGrp", "dummy_mg")
                dummy_cts = sorted(timed(door, "ct", args.integration) * 1000 for _ in range(args.ct))
                timed(door, "senv", "ScanFile", f"dummy_ascan_{round_}.h5")
                dummy_ascan = timed(door, "ascan", "dummy_mot", 0, 1, args.points - 1, args.integration)
                timed(door, "senv", "ActiveMntGrp", "dlive_counters_mg")
                counter_cts = sorted(timed(door, "ct", args.integration) * 1000 for _ in range(args.ct))
                timed(door, "senv", "ActiveMntGrp", "dlive_mg")
                cts = sorted(timed(door, "ct", args.integration) * 1000 for _ in range(args.ct))
                timed(door, "senv", "ScanFile", f"ascan_{round_}.h5")
                ascan = timed(door, "ascan", "dummy_mot", 0, 1, args.points - 1, args.integration)
                timed(door, "senv", "ActiveMntGrp", "dlive_hw_mg")
                timed(door, "senv", "ScanFile", f"ascanct_{round_}.h5")
                requests.put(f"{sim.rest_url}/sim/api/config", json={"nav_shape": [1, args.points]},
                             timeout=10).raise_for_status()
                ascanct = timed(door, "ascanct", "dummy_mot", 0, 1, args.points, max(args.integration, 0.005))
                requests.put(f"{sim.rest_url}/sim/api/config", json={"nav_shape": [1, 1]}, timeout=10).raise_for_status()
                p90 = cts[min(len(cts) - 1, int(0.9 * len(cts)))]
                print(f"round {round_}: ct median {statistics.median(cts):.1f} ms (p90 {p90:.1f}; Sardana's dummy "
                      f"counters {statistics.median(dummy_cts):.1f}; the 5 virtual counters without the image "
                      f"{statistics.median(counter_cts):.1f}); ascan {args.points} points {ascan:.2f} s = "
                      f"{args.points / ascan:.1f} points/s (dummy counters {args.points / dummy_ascan:.1f}); "
                      f"ascanct {args.points} points {ascanct:.2f} s", flush=True)
        finally:
            door.close()
            sardana.stop()


if __name__ == "__main__":
    main()
