"""Depth 2: the DectrisLive Tango device, driven through a DeviceProxy that subscribes to its results.

Started once, outside the measured time: an embedded Tango database, the simulator (its own
process), one ``tango-dectris-live`` server process (its worker processes are its children); the
device gets the analyses, ``nav_shape`` and tuning, and ``Listen`` (passive mode). Each run then
arms and triggers one series over the simulator's REST API from this process -- exactly as
``bench_pipeline.py`` does in its default ``listen`` mode, so both depths time the same interval:

* ``elapsed``: trigger sent -> the last result attribute's FINAL change event (quality VALID, not
  CHANGING) received by this process' subscriber; frames/s and MB/s = frames (raw bytes) / elapsed;
* ``latency``: the simulator's last frame handed to ZeroMQ (its trigger returns) -> that event.

CPU seconds per component: ``simulator``, ``receiver`` (the server's StreamReceiver thread, found
by name with ``py-spy dump``; left out, and counted in ``device``, where py-spy cannot attach),
``device`` (the rest of the server process: Tango, merging, publishing), ``workers`` (the server's
worker processes) and ``client`` (this process: trigger, event reception). Peak memory is the
server's plus its workers'. Every run's final event images are checked against the ground truth.

    .venv/bin/python benchmarks/bench_device.py --scenario arina96-quick --analyses sum+sumsig --runs 1
    .venv/bin/python benchmarks/bench_device.py --scenario quadro512 --runs 3 --json out.json
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import tango

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_pipeline import json_default, print_figures  # noqa: E402
from benchmarks.scenarios import (  # noqa: E402
    ClosingBench, add_run_arguments, measure_series,
    RunFigures, Scenario, SimulatorControl, SimulatorProcess, TriggerThread, analyses_by_name,
    check_results, child_pids, cpu_seconds, figures_from_timing, ground_truth, peak_rss_mb, reset_peak_rss,
    scenario_by_name)
from tango_dectris_live.device.embedded_db import EmbeddedTangoDatabase  # noqa: E402
from tango_dectris_live.processing.analyses import AnalysisParameters  # noqa: E402
from tango_dectris_live.testing import (  # noqa: E402
    ChangeEvent, EventRecorder, result_attributes, stop_leftovers, wait_for)

DEPTH = "device"
DEVICE = "bench/dectris/1"
INSTANCE = "bench"
RUN_TIMEOUT_S = 600.0
STARTUP_TIMEOUT_S = 180.0  # device ON, workers spawned, listening
_PY_SPY_THREAD = re.compile(r'^Thread (\d+) \([^)]*\): "([^"]*)"', re.MULTILINE)


def final_results(events: EventRecorder, results: list[str]) -> dict[str, ChangeEvent] | None:
    """Each result's final change event (not CHANGING) since the last clear; None until all came."""
    final = {name: events.latest(name) for name in results}
    if all(event is not None and event.quality != tango.AttrQuality.ATTR_CHANGING for event in final.values()):
        return final
    return None


def server_worker_pids(server_pid: int) -> list[int]:
    """The server's children that are worker processes (not multiprocessing's resource tracker)."""
    workers = []
    for pid in child_pids(server_pid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                if b"resource_tracker" in handle.read():
                    continue
        except FileNotFoundError:
            continue
        workers.append(pid)
    return workers


def thread_id_by_name(pid: int, name_prefix: str) -> int | None:
    """Native id of the Python thread of process ``pid`` whose name starts with ``name_prefix``,
    from ``py-spy dump`` (Python 3.11 does not give its threads OS-level names); None when py-spy
    is missing or cannot attach (ptrace not permitted)."""
    py_spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if py_spy is None:
        return None
    try:
        dump = subprocess.run([py_spy, "dump", "--pid", str(pid)], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return None
    for tid, name in _PY_SPY_THREAD.findall(dump.stdout):
        if name.startswith(name_prefix):
            return int(tid)
    return None


def _is_own_resource_tracker(process: psutil.Process) -> bool:
    """This process' multiprocessing resource tracker: it lives as long as this process does, and
    killing it makes multiprocessing start another one that complains about unknown resources."""
    try:
        return process.ppid() == os.getpid() and "resource_tracker" in " ".join(process.cmdline())
    except psutil.NoSuchProcess:
        return False


class DeviceBench(ClosingBench):
    """Simulator + Tango database + one DectrisLive server listening, measured over several series."""

    def __init__(self, scenario: Scenario, analyses: str, *, workers: int = 2, stream_format: str = "legacy",
                 header_detail: str = "basic", frame_rate: float | None = None, num_slots: int | None = None,
                 frame_stack_size: int | None = None, result_event_rate: float = 10.0, saving: str = "off",
                 saving_base: str | None = None, saving_writers: int = 0) -> None:
        self.scenario = scenario
        self.saving_writers = saving_writers
        self.saving = saving
        # the series files go to a fresh folder (default: a temporary one, removed at the end)
        self._own_saving_base = saving != "off" and saving_base is None
        self.saving_base = tempfile.mkdtemp(prefix="bench-device-saving-") if self._own_saving_base \
            else (saving_base or "")
        self.analyses_name = analyses
        self.analyses = analyses_by_name(analyses)
        self.settings = {"workers": workers, "receiver_mode": "listen", "stream_format": stream_format,
                         "header_detail": header_detail, "num_slots": num_slots, "frame_stack_size": frame_stack_size,
                         "frame_rate": frame_rate, "result_event_rate": result_event_rate, "saving_mode": saving,
                         "saving_writers": saving_writers}
        self.db = EmbeddedTangoDatabase()
        self.sim: SimulatorProcess | None = None
        self.events: EventRecorder | None = None
        try:
            self._start(stream_format, header_detail, frame_rate, workers, num_slots, frame_stack_size,
                        result_event_rate)
        except BaseException:
            self.close()
            raise

    def _start(self, stream_format: str, header_detail: str, frame_rate: float | None, workers: int,
               num_slots: int | None, frame_stack_size: int | None, result_event_rate: float) -> None:
        self.sim = SimulatorProcess(self.scenario.model)
        self.control = SimulatorControl(self.sim.rest_url)
        self.control.prepare(self.scenario, stream_format=stream_format, header_detail=header_detail,
                             frame_rate=frame_rate)
        self.truth = ground_truth(self.scenario, self.analyses, self.control.sim_config())
        self.db.start()
        # The tuning as properties too: the worker pool the device spawns at start-up is the one used.
        self.db.register_device(INSTANCE, DEVICE, {
            "DcuHost": "127.0.0.1", "DcuPort": self.sim.rest_port, "StreamPort": self.sim.stream_port,
            "Stream2Port": self.sim.stream2_port, "Workers": workers, "NumSlots": num_slots or 0,
            "FrameStackSize": frame_stack_size or 0, "SavingBaseDirectory": self.saving_base,
            "SavingWriters": self.saving_writers})
        self.server_pid = self.db.start_server(INSTANCE, DEVICE).pid
        self.proxy = tango.DeviceProxy(f"tango://{self.db.tango_host}/{DEVICE}")
        self.proxy.set_timeout_millis(10_000)
        wait_for(lambda: self.proxy.state() == tango.DevState.ON, STARTUP_TIMEOUT_S,
                 lambda: f"device State ON (Status: {self.proxy.status()})", interval=0.1)
        self.proxy.analyses = list(self.analyses)
        self.proxy.nav_shape = list(self.scenario.nav_shape)
        self.proxy.workers = workers
        self.proxy.num_slots = num_slots or 0  # 0: automatic, from the frame geometry
        self.proxy.frame_stack_size = frame_stack_size or 0
        self.proxy.result_event_rate = result_event_rate
        self.proxy.saving_mode = self.saving
        # The parameters the ground truth is computed with: the frame's centre, not the beam centre
        # the simulated DCU reports (which the device would take by default).
        parameters = AnalysisParameters().resolved(self.scenario.frame_shape)
        self.proxy.beam_center = [parameters.beam_centre[1], parameters.beam_centre[0]]
        self.proxy.bf_radius = parameters.bf_radius
        self.proxy.adf_outer_radius = parameters.adf_outer_radius
        self.proxy.adf_inner_radius = parameters.adf_inner_radius
        self.results = result_attributes(self.proxy, self.analyses)
        # Only the latest event of each result is kept: the client's memory is measured too.
        self.events = EventRecorder(self.proxy, changes=tuple(self.results), keep=1).__enter__()
        wait_for(lambda: all(self.events.change_count(name) for name in self.results), 30,
                 "the subscriptions' initial events")
        self.proxy.Listen()
        wait_for(lambda: str(self.proxy.acquisition_status).startswith("listening"), STARTUP_TIMEOUT_S,
                 lambda: f"device listening (Status: {self.proxy.status()})", interval=0.1)
        wait_for(lambda: len(server_worker_pids(self.server_pid)) >= workers, STARTUP_TIMEOUT_S,
                 f"{workers} worker processes", interval=0.1)
        self.receiver_tid = thread_id_by_name(self.server_pid, "StreamReceiver(")
        self._next_series = 1  # the simulator counts series from 1 after initialize

    def close(self) -> None:
        """Stop everything this bench started, also after a failure or Ctrl-C."""
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut this short
        try:
            started = [p for p in psutil.Process().children(recursive=True) if not _is_own_resource_tracker(p)]
            if self.events is not None:
                try:
                    self.events.__exit__()
                except tango.DevFailed:
                    pass  # the server is gone already; stopping it below is all that is left
            self.db.stop()
            if self.sim is not None:
                self.control.close()
                self.sim.close()
            killed = stop_leftovers(started)
            if self._own_saving_base:
                shutil.rmtree(self.saving_base, ignore_errors=True)
            if killed:
                print(f"note: had to kill {len(killed)} leftover processes: {killed}", file=sys.stderr)
        finally:
            signal.signal(signal.SIGINT, previous)

    def _cpu(self, workers: list[int]) -> dict[str, float]:
        try:
            return self._cpu_of_processes(workers)
        except FileNotFoundError as error:
            raise RuntimeError(f"a process or the receiver thread of the device server ended during the run "
                               f"({error.filename} is gone): see the server's log") from error

    def _cpu_of_processes(self, workers: list[int]) -> dict[str, float]:
        server = cpu_seconds(self.server_pid)
        cpu = {"simulator": cpu_seconds(self.sim.pid)}
        if self.receiver_tid is not None:
            cpu["receiver"] = cpu_seconds(self.server_pid, self.receiver_tid)
            server -= cpu["receiver"]
        cpu.update(device=server, workers=sum(cpu_seconds(pid) for pid in workers),
                   client=cpu_seconds(os.getpid()))
        return cpu

    def run_once(self) -> RunFigures:
        """Process one series; its figures (``correct`` False when the results are wrong)."""
        series = self._next_series
        self.events.clear()
        armed = self.control.arm()
        if armed != series:
            raise RuntimeError(f"the simulator armed series {armed}, expected {series}")
        self._next_series += 1
        workers = server_worker_pids(self.server_pid)
        processes = [self.server_pid, *workers]
        for pid in (*processes, self.sim.pid, os.getpid()):
            reset_peak_rss(pid)
        cpu_before = self._cpu(workers)
        trigger = TriggerThread(self.control).start()
        # Gives up at once when the trigger failed (no frames will come) or the device sent errors.
        wait_for(lambda: trigger.error is not None or self.events.errors or final_results(self.events, self.results),
                 RUN_TIMEOUT_S, lambda: f"final events of {', '.join(self.results)}")
        trigger.join()  # raises with the simulator's answer when the trigger failed
        final = final_results(self.events, self.results)
        if final is None:
            raise RuntimeError(f"error events from the device: {'; '.join(self.events.errors)}")
        finished_at = max(event.received_at for event in final.values())
        cpu_after = self._cpu(workers)
        peak_mb = sum(peak_rss_mb(pid) for pid in processes)
        progress = {name: self.proxy.read_attribute(name).value
                    for name in ("series_id", "frames_processed", "frames_missing")}
        problems = []
        if int(progress["series_id"]) != series:
            problems.append(f"the device reports series {progress['series_id']}, expected {series}")
        if int(progress["frames_processed"]) != self.scenario.frames:
            problems.append(f"{progress['frames_processed']} of {self.scenario.frames} frames processed "
                            f"({progress['frames_missing']} missing)")
        problems += [f"{name}: final quality {event.quality}" for name, event in final.items()
                     if event.quality != tango.AttrQuality.ATTR_VALID]
        problems += check_results({name: np.asarray(event.value) for name, event in final.items()}, self.truth)
        # every change event of this series but the final one of each result was an intermediate one
        intermediate = sum(self.events.change_count(name) for name in self.results) - len(final)
        extra: dict[str, Any] = {
            "settings": self.settings, "intermediate_result_events": intermediate,
            "receiver_thread_separated": self.receiver_tid is not None,
            "peak_mb_simulator": round(peak_rss_mb(self.sim.pid), 1),
            "peak_mb_client": round(peak_rss_mb(os.getpid()), 1),
            "status": str(self.proxy.acquisition_status)}
        if self.saving != "off":
            # after the measured interval: the file closed, with every frame when frames are saved
            wait_for(lambda: str(self.proxy.saving_status).startswith(("saved", "saving stopped")), 120,
                     lambda: f"the series file closed ({self.proxy.saving_status})", interval=0.05)
            expected = self.scenario.frames if self.saving == "results_and_frames" else 0
            if int(self.proxy.frames_saved) != expected or not str(self.proxy.saving_status).startswith("saved"):
                problems.append(f"saving: {self.proxy.frames_saved} frames saved, expected {expected}: "
                                f"{self.proxy.saving_status}")
            extra["saving_status"] = str(self.proxy.saving_status)
        return figures_from_timing(self.scenario, DEPTH, self.analyses_name, trigger, finished_at,
                                   {k: cpu_after[k] - cpu_before[k] for k in cpu_after}, peak_mb, problems, extra)


def measure(scenario: Scenario, analyses: str, runs: int = 3, warmup: int = 1, **settings: Any) -> list[RunFigures]:
    """``warmup`` unreported series, then ``runs`` measured ones."""
    return measure_series(lambda: DeviceBench(scenario, analyses, **settings), runs, warmup)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_arguments(parser)
    parser.add_argument("--stream-format", default="legacy", choices=("legacy", "cbor"))
    parser.add_argument("--header-detail", default="basic", choices=("all", "basic", "none"))
    parser.add_argument("--frame-rate", type=float, default=None, help="pace the simulator (Hz); default: max")
    parser.add_argument("--num-slots", type=int, default=None, help="default: automatic")
    parser.add_argument("--frame-stack-size", type=int, default=None)
    parser.add_argument("--result-event-rate", type=float, default=10.0,
                        help="the device's result_event_rate (intermediate events per second)")
    parser.add_argument("--saving", default="off", choices=("off", "results", "results_and_frames"),
                        help="the device's saving_mode (files in a temporary folder, or --saving-base)")
    parser.add_argument("--saving-base", default=None, help="SavingBaseDirectory: measure this disk")
    parser.add_argument("--saving-writers", type=int, default=0,
                        help="the SavingWriters property: frame writer processes (0: automatic)")
    parser.add_argument("--json", type=Path, default=None, help="write the runs' figures here")
    args = parser.parse_args()
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    # SIGTERM (run_all.py's timeout, `kill`) cleans up like Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        figures = measure(scenario_by_name(args.scenario), args.analyses, args.runs, args.warmup,
                          workers=args.workers, stream_format=args.stream_format, header_detail=args.header_detail,
                          frame_rate=args.frame_rate, num_slots=args.num_slots,
                          frame_stack_size=args.frame_stack_size, result_event_rate=args.result_event_rate,
                          saving=args.saving, saving_base=args.saving_base, saving_writers=args.saving_writers)
    except KeyboardInterrupt:
        sys.exit("interrupted; every process this benchmark started is stopped")
    print_figures(figures)
    if args.json is not None:
        args.json.write_text(json.dumps([f.as_dict() for f in figures], default=json_default))


if __name__ == "__main__":
    main()
