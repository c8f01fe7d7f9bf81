"""Command to result, as a step-scan user waits: ``Start`` on the device -> the final result's
data-ready event at the client -> State ON again, for small acquisitions back to back.

One simulator (ARINA, pacing max, ints) and one device (``DeviceTestContext``, its own process)
for the whole run; per setting (``stream_connection`` x frames per acquisition) ``--reps``
acquisitions in a row, the settings taking turns over ``--rounds`` rounds. Printed: median, 10th
and 90th percentile per setting (the first acquisition of each block is left out: it may rebuild
the receiver for the new setting), and the points per second a step scan of such points would
reach.

    .venv/bin/python benchmarks/bench_start_turnaround.py --rounds 3 --reps 15 --frames 1 16
"""
from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
import threading
import time
from pathlib import Path

import requests
import tango
from tango import DevState

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sim.server import SimulatorServer  # noqa: E402
from tango_dectris_live.device.dectris_live import DectrisLive  # noqa: E402


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.001)


def measure(rounds: int, reps: int, frames: list[int], policies: list[str]) -> dict[tuple[str, int], list[float]]:
    from tango.test_context import DeviceTestContext

    times: dict[tuple[str, int], list[float]] = {}
    with SimulatorServer(host="127.0.0.1", model="ARINA") as sim:
        base = f"{sim.rest_url}/detector/api/1.8.0"
        requests.put(f"{base}/command/initialize", timeout=60).raise_for_status()
        requests.put(f"{base}/config/trigger_mode", json={"value": "ints"}, timeout=10).raise_for_status()
        requests.put(f"{sim.rest_url}/sim/api/config", json={"pacing": "max"}, timeout=10).raise_for_status()
        properties = {"DcuHost": "127.0.0.1", "DcuPort": sim.port, "StreamPort": sim.stream_port,
                      "Stream2Port": sim.stream2_port}
        with DeviceTestContext(DectrisLive, properties=properties, process=True, timeout=60) as proxy:
            wait_until(lambda: proxy.state() == DevState.ON, 60, "State ON")
            proxy.analyses = ["sum", "sumsig"]
            done = threading.Event()
            proxy.subscribe_event("sum_image", tango.EventType.DATA_READY_EVENT, lambda _event: done.set())
            for _round in range(rounds):
                for policy in policies:
                    proxy.stream_connection = policy
                    for count in frames:
                        proxy.nav_shape = [count]
                        block = []
                        for _ in range(reps):
                            done.clear()
                            started = time.perf_counter()
                            proxy.Start()
                            if not done.wait(60):
                                raise RuntimeError(f"no final result: {proxy.status()}")
                            wait_until(lambda: proxy.state() == DevState.ON, 60, "State ON after the result")
                            block.append(time.perf_counter() - started)
                        times.setdefault((policy, count), []).extend(block[1:])
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--frames", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--policies", nargs="+", default=["per_series", "always"])
    args = parser.parse_args()
    multiprocessing.set_start_method("forkserver", force=True)
    times = measure(args.rounds, args.reps, args.frames, args.policies)
    print(f"{'stream_connection':>18} {'frames':>6} {'median ms':>10} {'p10':>7} {'p90':>7} {'points/s':>9} {'n':>4}")
    for (policy, count), values in times.items():
        values = sorted(values)
        median = statistics.median(values)
        print(f"{policy:>18} {count:>6} {median * 1e3:>10.1f} {values[len(values) // 10] * 1e3:>7.1f} "
              f"{values[9 * len(values) // 10] * 1e3:>7.1f} {1 / median:>9.1f} {len(values):>4}")


if __name__ == "__main__":
    main()
