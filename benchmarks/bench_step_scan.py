"""A step scan as Sardana runs one: N acquisitions back to back through the ``DectrisLive`` device,
each Start -> final result -> State ON -> result read, nothing written between points.

One simulator in this process (ARINA, trigger mode ints; ``--geometry arina96``: binned 96x96
uint16) and one device in its own process (``DeviceTestContext(process=True)``, analyses
``--analyses``), as ``bench_start_turnaround.py``. Per series length (``--frames``, default 1 and
16 frames per point) the scan is prepared once (``count_time`` and ``nav_shape`` written through
the device, only where they differ from what it has; one point not counted, so that the
receiver is built), then ``--points`` points run back to back: ``Start``; wait for the final
result (the data-ready event of ``sum_image``) and State ON (its change event, or with ``--wait
poll`` State read every ``--poll-interval`` seconds); read the result attributes. Printed per
length: points/s over the whole scan, and per point median, p90, max and mean ms.

The simulator paces the frames at the frame time (``--pacing frame_time``, count_time + readout:
a 16-frame point at 1 ms exposes for ~16 ms) or sends them at once (``--pacing max``).

    .venv/bin/python benchmarks/bench_step_scan.py --points 100 --frames 1 16
    .venv/bin/python benchmarks/bench_step_scan.py --points 200 --frames 1 --pacing max --wait poll
"""
from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import requests
import tango
from tango import DevState

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sim.server import SimulatorServer
from tango_dectris_live.device.dectris_live import DectrisLive

ARINA96 = (("binning_mode", "2x2"), ("pixel_format", "uint16"))


def wait_until(condition: Callable[[], bool], timeout: float, what: str, interval: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(interval)


class Scanner:
    """The device's events, and one point: Start, final result, State ON, result read."""

    def __init__(self, proxy: tango.DeviceProxy, results: list[str], wait: str, poll_interval: float) -> None:
        self.proxy = proxy
        self.results = results
        self.wait = wait
        self.poll_interval = poll_interval
        self.done = threading.Event()
        self.on = threading.Event()
        self._ids = [proxy.subscribe_event("sum_image", tango.EventType.DATA_READY_EVENT, self._data_ready),
                     proxy.subscribe_event("State", tango.EventType.CHANGE_EVENT, self._state)]

    def _data_ready(self, _event: Any) -> None:
        self.done.set()

    def _state(self, event: Any) -> None:
        if not event.err and event.attr_value is not None and event.attr_value.value == DevState.ON:
            self.on.set()

    def point(self) -> tuple[tuple[float, float, float], list[np.ndarray]]:
        """One point; (to the final result, to State ON, to the results read) in seconds, and the
        result images read."""
        self.done.clear()
        self.on.clear()
        started = time.perf_counter()
        self.proxy.Start()
        if not self.done.wait(120):
            raise RuntimeError(f"no final result: {self.proxy.status()}")
        result = time.perf_counter()
        if self.wait == "event":
            # an ON event pushed before the data-ready one belongs to nothing of this point: the
            # device goes RUNNING at Start and ON once the series is published
            if not self.on.wait(60):
                raise RuntimeError(f"no State ON event: {self.proxy.status()}")
        else:
            wait_until(lambda: self.proxy.state() == DevState.ON, 60, "State ON", self.poll_interval)
        on = time.perf_counter()
        images = [value.value for value in self.proxy.read_attributes(self.results)]
        return (result - started, on - started, time.perf_counter() - started), images


def check_point(results: list[str], images: list[np.ndarray], frames: int) -> None:
    """Every result read is a non-empty image; a scan-shaped one (sumsig) has one value per frame."""
    for name, image in zip(results, images):
        if image is None or np.size(image) == 0:
            raise RuntimeError(f"{name} read empty after the final result")
        if name == "sumsig_image" and np.size(image) != frames:
            raise RuntimeError(f"{name} has {np.size(image)} values, expected {frames}")


def write_if_changed(proxy: tango.DeviceProxy, name: str, value: Any) -> None:
    current = proxy.read_attribute(name).value
    if np.array_equal(np.atleast_1d(current), np.atleast_1d(value)):
        return
    proxy.write_attribute(name, value)


def scan(args: argparse.Namespace) -> list[tuple[int, list[float], float]]:
    from tango.test_context import DeviceTestContext

    figures = []
    with SimulatorServer(host="127.0.0.1", model="ARINA") as sim:
        base = f"{sim.rest_url}/detector/api/1.8.0"
        requests.put(f"{base}/command/initialize", timeout=60).raise_for_status()
        for key, value in (("trigger_mode", "ints"), *(ARINA96 if args.geometry == "arina96" else ())):
            requests.put(f"{base}/config/{key}", json={"value": value}, timeout=10).raise_for_status()
        requests.put(f"{sim.rest_url}/sim/api/config", json={"pacing": args.pacing}, timeout=10).raise_for_status()
        properties = {"DcuHost": "127.0.0.1", "DcuPort": sim.port, "StreamPort": sim.stream_port,
                      "Stream2Port": sim.stream2_port}
        with DeviceTestContext(DectrisLive, properties=properties, process=True, timeout=60) as proxy:
            wait_until(lambda: proxy.state() == DevState.ON, 120, "State ON", 0.01)
            write_if_changed(proxy, "analyses", args.analyses)
            proxy.config_reuse = args.config_reuse
            names = dict(line.split(": ", 1) for line in proxy.result_attributes)
            results = [name for analysis in args.analyses for name in names[analysis].split(", ")]
            scanner = Scanner(proxy, results, args.wait, args.poll_interval)
            write_if_changed(proxy, "count_time", args.count_time)
            for frames in args.frames:
                write_if_changed(proxy, "nav_shape", [frames])
                scanner.point()  # not counted: the receiver may be built for the new setting
                durations = []
                started = time.perf_counter()
                for _ in range(args.points):
                    times, images = scanner.point()
                    durations.append(times)
                    if args.check:
                        check_point(results, images, frames)
                elapsed = time.perf_counter() - started
                figures.append((frames, durations, elapsed))
                print_figures(args, [figures[-1]], header=len(figures) == 1)
    return figures


def print_figures(args: argparse.Namespace, figures: list[tuple[int, list[tuple[float, float, float]], float]],
                  header: bool) -> None:
    if header:
        print(f"step scan: {args.points} points, count_time {args.count_time * 1e3:g} ms, pacing {args.pacing}, "
              f"wait {args.wait}, analyses {'+'.join(args.analyses)}, geometry {args.geometry}, "
              f"config_reuse {args.config_reuse:g} s")
        print("per point, ms: Start -> results read (median, p90, max, mean; points over 100 ms); medians of "
              "Start -> final result event and -> State ON")
        print(f"{'frames/point':>12} {'points/s':>9} {'median':>7} {'p90':>7} {'max':>7} {'mean':>7} {'>100ms':>6} "
              f"{'result':>7} {'ON':>7}")
    for frames, times, elapsed in figures:
        ordered = sorted(t[2] for t in times)
        slow = sum(1 for d in ordered if d > 0.1)
        print(f"{frames:>12} {len(ordered) / elapsed:>9.1f} {statistics.median(ordered) * 1e3:>7.1f} "
              f"{ordered[min(len(ordered) - 1, 9 * len(ordered) // 10)] * 1e3:>7.1f} {ordered[-1] * 1e3:>7.1f} "
              f"{statistics.fmean(ordered) * 1e3:>7.1f} {slow:>6} {statistics.median(t[0] for t in times) * 1e3:>7.1f} "
              f"{statistics.median(t[1] for t in times) * 1e3:>7.1f}")
    sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--points", type=int, default=100, help="acquisitions per scan")
    parser.add_argument("--frames", type=int, nargs="+", default=[1, 16], help="frames per point (one scan each)")
    parser.add_argument("--count-time", type=float, default=0.001, help="seconds")
    parser.add_argument("--pacing", choices=("frame_time", "max"), default="frame_time",
                        help="the simulator sends at the frame time, or as fast as it can")
    parser.add_argument("--wait", choices=("event", "poll"), default="event",
                        help="State ON by change event, or by reading State every --poll-interval")
    parser.add_argument("--poll-interval", type=float, default=0.001, help="seconds (--wait poll)")
    parser.add_argument("--analyses", nargs="+", default=["sum", "sumsig"])
    parser.add_argument("--config-reuse", type=float, default=0.0,
                        help="the device's config_reuse (s): DCU settings read for one point serve the next")
    parser.add_argument("--geometry", choices=("arina96", "default"), default="arina96",
                        help="ARINA binned 96x96 uint16, or the simulator's ARINA default")
    parser.add_argument("--no-check", dest="check", action="store_false",
                        help="do not check the size of the result read at each point")
    args = parser.parse_args()
    if "sum" not in args.analyses:
        parser.error("the final result is awaited on sum_image: include the analysis sum")
    multiprocessing.set_start_method("forkserver", force=True)
    scan(args)


if __name__ == "__main__":
    main()
