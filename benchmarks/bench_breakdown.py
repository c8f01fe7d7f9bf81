"""Where the time from ``Start`` to (final result published, State ON) goes, step by step.

The same set-up as ``bench_start_turnaround.py`` -- one simulator in this process (REST + stream
threads), one ``DectrisLive`` device in its own process (``DeviceTestContext(process=True)``),
analyses sum + sumsig -- but the device class is a subclass, :class:`ProbedDectrisLive`, whose
``init_device`` first wraps methods along the path of a Start (command, REST calls, receiver,
series run, workers, publisher, State) with timestamping wrappers (``time.perf_counter``, which is
``CLOCK_MONOTONIC`` on Linux: one clock for every process of the machine). Product code is not
changed. The wrapped methods record (name, start, end, thread, detail); the client fetches the
records with the subclass' ``DumpProbes`` command between acquisitions (outside the measured
time). The worker processes write the time of each stack they process to files (``_process_stack``
wrapped in the worker). The simulator's REST handler is wrapped in this process.

For each series length (``--frames``, default 1, 1000 and 65536; ARINA binned 96x96 uint16,
pacing max, trigger mode ints) ``--reps`` acquisitions are timed after one warm-up; printed per
length: each milestone's time after the client called Start (median, p90), the step from the
milestone before, and the HTTP requests of one Start (count and time, client side and simulator
side). ``--wait event`` waits for State ON by change event instead of polling State every 1 ms.

``--py-spy OUT`` instead records the device server process with ``py-spy record --idle
--format raw`` during ``--py-spy-reps`` 1-frame Starts (then nothing is timed).

    .venv/bin/python benchmarks/bench_breakdown.py --frames 1 1000 65536 --reps 20 5 3
    .venv/bin/python benchmarks/bench_breakdown.py --frames 1 --reps 30 --timeline
    .venv/bin/python benchmarks/bench_breakdown.py --py-spy /tmp/device.txt --py-spy-reps 200
"""
from __future__ import annotations

import argparse
import functools
import importlib
import json
import math
import multiprocessing
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests
import tango
from tango import DevState
from tango.server import command

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tango_dectris_live.device.dectris_live import DectrisLive

MODULE = "benchmarks.bench_breakdown"  # the name the device process imports the probes under
WORKER_DIR_ENV = "BENCH_BREAKDOWN_WORKER_DIR"
ARINA96 = (("binning_mode", "2x2"), ("pixel_format", "uint16"), ("frame_time", 1 / 60000))

# ---------------------------------------------------------------------------------------------
# Probes: run inside the device server process (and, for _process_stack, in its workers)

_RECORDS: list[tuple[str, float, float, str, Any]] = []
_INSTALLED = False
now = time.perf_counter


def _record(name: str, start: float, end: float, detail: Any = None) -> None:
    _RECORDS.append((name, start, end, threading.current_thread().name, detail))


def _wrap(owner: Any, attr: str, name: str, detail: Callable[..., Any] | None = None,
          result_detail: Callable[[Any, tuple], Any] | None = None, keep: Callable[[Any], bool] | None = None) -> None:
    """Replace ``owner.attr`` by a wrapper recording its span (``detail(*args)`` from the
    arguments, ``result_detail(result, args)`` from the result; ``keep(result)`` False: not recorded).
    A method the code no longer has is left out (said on stderr): the probes follow the code."""
    original = getattr(owner, attr, None)
    if original is None:
        print(f"bench_breakdown: {owner.__name__}.{attr} not found, not timed", file=sys.stderr)
        return

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        info = detail(*args, **kwargs) if detail is not None else None
        start = now()
        result = None
        try:
            result = original(*args, **kwargs)
            return result
        finally:
            if keep is None or keep(result):
                if result_detail is not None:
                    info = result_detail(result, args)
                _record(name, start, now(), info)

    setattr(owner, attr, wrapper)


def _event_detail(event: Any) -> str:
    kind = type(event).__name__
    handle = getattr(event, "handle", None)
    if handle is not None:
        return f"{kind} {handle.frames} frames from {handle.first_frame}"
    return kind


def install_probes() -> None:
    """Wrap the methods on the path of a Start (idempotent; in the device server process)."""
    global _INSTALLED
    if _INSTALLED:
        return
    _INSTALLED = True
    from tango_dectris_live.component import detector as component
    from tango_dectris_live.processing import (
        acquisition,
        live_dataset,
        runner,
        series_control,
    )
    from tango_dectris_live.receiver import receiver
    from tango_dectris_live.simplon import client, supervision

    dev = DectrisLive
    _wrap(dev, "_call", "dev._call", detail=lambda self, name, action: name)
    _wrap(dev, "acquisition_updated", "dev.acquisition_updated",
          detail=lambda self, update: f"final={update.final} snapshot={update.snapshot is not None}")
    _wrap(dev, "_publish_results", "dev._publish_results", detail=lambda self, snapshot, final: f"final={final}")
    _wrap(dev, "_set_condition", "dev._set_condition", detail=lambda self, condition: condition.state.value)

    det = component.LiveDetector
    _wrap(det, "start_acquisition", "det.start_acquisition")
    _wrap(det, "_compose", "det._compose")

    acq = acquisition.LiveAcquisition
    for attr in ("_begin", "check_request", "stream_geometry", "_run_active", "_prepare_pipeline", "_process",
                 "_follow", "_session_main", "_trigger", "_ensure_runner", "progress"):
        _wrap(acq, attr, f"acq.{attr}")
    _wrap(acq, "_request_publish", "acq._request_publish",
          detail=lambda self, final=None: "final" if final is not None else "progress")

    ctl = series_control.SeriesControl
    for attr in ("stream_geometry", "trigger_mode", "configure_scan", "enable_stream", "with_beam_centre",
                 "frame_time", "trigger", "scan_shape"):
        _wrap(ctl, attr, f"ctl.{attr}")
    _wrap(ctl, "tell", "ctl.tell", detail=lambda self, what, call, quiet_when_idle=False: what)

    dcu = client.DetectorClient
    _wrap(dcu, "_request", "http", detail=lambda self, method, url, *, call, value=None, timeout=None:
          f"{method} {call}")
    for attr in ("trigger_timeout", "arm", "trigger", "disarm", "write"):
        _wrap(dcu, attr, f"dcu.{attr}")
    _wrap(supervision.DetectorSupervisor, "refresh", "sup.refresh")

    rx = receiver.StreamReceiver
    for attr in ("connect", "arm", "cancel", "_on_header", "_on_end", "_disconnect", "_try_connect",
                 "_assign_slot"):
        _wrap(rx, attr, f"rx.{attr}")
    _wrap(rx, "_finish", "rx._finish", detail=lambda self, reason: reason)
    _wrap(rx, "start", "rx.start")
    original_init = rx.__init__

    @functools.wraps(original_init)
    def receiver_init(self: Any, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        put = self._events.put

        def recording_put(item: Any, *a: Any, **k: Any) -> None:
            t = now()
            put(item, *a, **k)
            _record("rx.event", t, t, _event_detail(item))
        self._events.put = recording_put
    rx.__init__ = receiver_init

    _wrap(live_dataset.ReceiverFrameSource, "next_event", "src.next_event",
          result_detail=lambda event, args: _event_detail(event), keep=lambda event: event is not None)

    run = runner.SeriesRun
    for attr in ("_set_up", "_dispatch", "_merge", "_run", "snapshot", "_begin"):
        _wrap(run, attr, f"run.{attr}")
    _wrap(run, "_take_outcome", "run._take_outcome", detail=lambda self, message: type(message).__name__)
    pool = runner.WorkerPool
    _wrap(pool, "begin_series", "pool.begin_series")
    _wrap(pool, "dispatch", "pool.dispatch", detail=lambda self, run_id, seq, stack, begin=0, end=None:
          f"seq {seq} [{begin}, {end}) of {stack.frames}")
    _wrap(runner.LiveRunner, "process", "runner.process")
    # the workers: started after this (the pool starts in init_device's background thread)
    runner._worker_main = probe_worker_main


def probe_worker_main(tasks: Any, results: Any, active_run: Any) -> None:
    """A worker process (spawned: a fresh interpreter) whose ``_process_stack`` is timed into a file."""
    from tango_dectris_live.processing import runner

    directory = os.environ.get(WORKER_DIR_ENV)
    original = runner._process_stack
    if directory:
        # open for the worker's life (it ends with the process)
        out = open(os.path.join(directory, f"{os.getpid()}.txt"), "a", buffering=1)  # noqa: SIM115

        def timed(spec: Any, stack: Any, env: Any, begin: int = 0, end: int | None = None) -> Any:
            start = now()
            result = original(spec, stack, env, begin, end)
            out.write(f"{start!r} {now()!r} {stack.series} {begin} {stack.frames if end is None else end}\n")
            return result
        runner._process_stack = timed
    runner._worker_main(tasks, results, active_run)


def dump() -> str:
    records = list(_RECORDS)
    del _RECORDS[:len(records)]
    return json.dumps(records)


class ProbedDectrisLive(DectrisLive):
    """``DectrisLive`` with the probes installed and a command to fetch their records."""

    def init_device(self) -> None:
        importlib.import_module(MODULE).install_probes()
        super().init_device()

    @command(dtype_out=str, doc_out="the probe records since the last call, as JSON")
    def DumpProbes(self) -> str:
        return importlib.import_module(MODULE).dump()


# ---------------------------------------------------------------------------------------------
# The client side: simulator, device, acquisitions


class SimRest:
    """The simulator's REST handler, timed (this process)."""

    def __init__(self) -> None:
        from sim import rest

        self.records: list[tuple[str, float, float]] = []
        handler = rest.SimplonRequestHandler
        original = handler._answer
        records = self.records

        def answer(self: Any, method: str) -> None:
            start = now()
            try:
                original(self, method)
            finally:
                records.append((f"{method} {self.path}", start, now()))
        handler._answer = answer


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.001)


class Bench:
    """Simulator + probed device + event subscriptions; :meth:`acquire` times one Start."""

    def __init__(self, stack: Any, wait: str, analyses: list[str], pacing: str = "max") -> None:
        from tango.test_context import DeviceTestContext

        from sim.server import SimulatorServer

        self.wait_mode = wait
        self.worker_dir = tempfile.mkdtemp(prefix="bench_breakdown_workers_")
        os.environ[WORKER_DIR_ENV] = self.worker_dir  # before the device (and its workers) start
        self.sim_rest = SimRest()
        self.sim = stack.enter_context(SimulatorServer(host="127.0.0.1", model="ARINA"))
        base = f"{self.sim.rest_url}/detector/api/1.8.0"
        requests.put(f"{base}/command/initialize", timeout=60).raise_for_status()
        for key, value in (("trigger_mode", "ints"), *ARINA96):
            requests.put(f"{base}/config/{key}", json={"value": value}, timeout=10).raise_for_status()
        requests.put(f"{self.sim.rest_url}/sim/api/config", json={"pacing": pacing}, timeout=10).raise_for_status()
        properties = {"DcuHost": "127.0.0.1", "DcuPort": self.sim.port, "StreamPort": self.sim.stream_port,
                      "Stream2Port": self.sim.stream2_port}
        self.context = DeviceTestContext(ProbedDectrisLive, properties=properties, process=True, timeout=60)
        self.proxy = stack.enter_context(self.context)
        wait_until(lambda: self.proxy.state() == DevState.ON, 120, "State ON")
        self.proxy.analyses = analyses
        self.result_time: float | None = None
        self.on_time: float | None = None
        self.done = threading.Event()
        self.on = threading.Event()
        # the final result's data-ready event (analysis sum: attribute sum_image)
        self.proxy.subscribe_event("sum_image", tango.EventType.DATA_READY_EVENT, self._data_ready)
        self.proxy.subscribe_event("State", tango.EventType.CHANGE_EVENT, self._state_event)

    @property
    def device_pid(self) -> int:
        return self.context.thread.pid

    def _data_ready(self, _event: Any) -> None:
        self.result_time = now()
        self.done.set()

    def _state_event(self, event: Any) -> None:
        if not event.err and event.attr_value is not None and event.attr_value.value == DevState.ON:
            self.on_time = now()
            self.on.set()

    def acquire(self) -> dict[str, float]:
        """One Start -> final result -> State ON; the client's own times."""
        self.done.clear()
        self.on.clear()
        self.result_time = self.on_time = None
        started = now()
        self.proxy.Start()
        returned = now()
        if not self.done.wait(120):
            raise RuntimeError(f"no final result: {self.proxy.status()}")
        if self.wait_mode == "event":
            if not self.on.wait(60):
                raise RuntimeError(f"no State ON event: {self.proxy.status()}")
            on_seen = self.on_time
        else:
            wait_until(lambda: self.proxy.state() == DevState.ON, 60, "State ON after the result")
            on_seen = now()
            self.on.wait(0.1)  # for its arrival time only (after the measured interval)
        return {"t0": started, "client.Start returned": returned, "client.data_ready event": self.result_time,
                "client.State ON seen": on_seen, "client.State ON event": self.on_time}

    def dump(self) -> list[tuple]:
        return [tuple(r) for r in json.loads(self.proxy.DumpProbes())]

    def worker_records(self) -> list[tuple[float, float, int, int, int]]:
        rows = []
        for path in Path(self.worker_dir).glob("*.txt"):
            for line in path.read_text().splitlines():
                start, end, series, begin, stop = line.split()
                rows.append((float(start), float(end), int(series), int(begin), int(stop)))
        return rows

    def close(self) -> None:
        shutil.rmtree(self.worker_dir, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Analysis: milestones of one acquisition


def _first(records: list[tuple], name: str, pred: Callable[[tuple], bool] = lambda r: True,
           end: bool = True, after: float = float("-inf")) -> float | None:
    times = [r[2] if end else r[1] for r in records if r[0] == name and pred(r) and r[1] >= after]
    return min(times) if times else None


def _last(records: list[tuple], name: str, pred: Callable[[tuple], bool] = lambda r: True,
          end: bool = True) -> float | None:
    times = [r[2] if end else r[1] for r in records if r[0] == name and pred(r)]
    return max(times) if times else None


def _detail(text: str) -> Callable[[tuple], bool]:
    return lambda r: r[4] is not None and str(r[4]).startswith(text)


def milestones(client: dict[str, float], records: list[tuple], workers: list[tuple]) -> dict[str, float | None]:
    """Each step's end, seconds after the client called Start (None: did not happen)."""
    t0 = client["t0"]
    # the dump may hold the previous acquisition's tail (its threads end after its State ON)
    records = [r for r in records if r[1] >= t0]
    rx_stack = _detail("StackReady")
    src_stack = _detail("StackReady")
    first_dispatch = _first(records, "pool.dispatch", end=False)
    worker_rows = [w for w in workers
                   if first_dispatch is not None and first_dispatch <= w[0] <= client["client.State ON seen"]]
    final_publish = [r for r in records if r[0] == "dev._publish_results" and r[4] == "final=True"]
    on_pushed = _first(records, "dev._set_condition", lambda r: r[4] == "ON", end=False,
                       after=min((r[1] for r in final_publish), default=float("inf")))
    m: dict[str, float | None] = {
        "Start reaches the device (_call)": _first(records, "dev._call", _detail("Start"), end=False),
        "  stream geometry read (REST)": _first(records, "acq.stream_geometry"),
        "  request checked": _first(records, "acq.check_request"),
        "  session thread started (_begin)": _first(records, "acq._begin"),
        "Start command done in device": _first(records, "dev._call", _detail("Start")),
        "client: Start returned": client["client.Start returned"],
        "session: trigger_mode read (REST)": _first(records, "ctl.trigger_mode"),
        "session: nimages/ntrigger checked/written": _first(records, "ctl.configure_scan"),
        "session: stream mode read, pipeline ready": _first(records, "acq._prepare_pipeline"),
        "session: beam centre read (REST)": _first(records, "ctl.with_beam_centre"),
        "session: frame_time read (REST)": _first(records, "ctl.frame_time"),
        "stream connected (connect)": _first(records, "rx.connect"),
        "DCU armed (PUT arm)": _first(records, "dcu.arm"),
        "receiver armed": _first(records, "rx.arm"),
        "series run started (runner.process)": _first(records, "runner.process"),
        "header at receiver": _first(records, "rx._on_header"),
        "trigger timeout read (3 GETs)": _first(records, "dcu.trigger_timeout"),
        "trigger PUT sent": _first(records, "http", _detail("PUT detector/command/trigger"), end=False),
        "SeriesStarted at series run": _first(records, "src.next_event", _detail("SeriesStarted")),
        "first stack ready at receiver": _first(records, "rx.event", rx_stack),
        "first stack at series run": _first(records, "src.next_event", src_stack),
        "UDFs set up, BeginSeries sent (_set_up)": _first(records, "run._set_up"),
        "first stack dispatched": first_dispatch,
        "first stack: worker starts": min((w[0] for w in worker_rows), default=None),
        "first stack: worker done": min((w[1] for w in worker_rows), default=None),
        "first result at collector": _first(records, "run._take_outcome", _detail("StackDone"), end=False),
        "series complete at receiver (_finish)": _first(records, "rx._finish"),
        "trigger PUT answered": _first(records, "http", _detail("PUT detector/command/trigger")),
        "SeriesFinished at series run": _first(records, "src.next_event", _detail("SeriesFinished")),
        "last stack: worker done": max((w[1] for w in worker_rows), default=None),
        "last merge done": _last(records, "run._merge"),
        "series run ended (_run)": _first(records, "run._run"),
        "final publish starts (_publish_results)": min((r[1] for r in final_publish), default=None),
        "final result pushed (_publish_results)": min((r[2] for r in final_publish), default=None),
        "client: data-ready event": client["client.data_ready event"],
        "session: final publish request returned": _first(records, "acq._request_publish", _detail("final")),
        "DCU disarmed (PUT disarm)": _first(records, "dcu.disarm"),
        "session ended (mode IDLE)": _first(records, "acq._session_main"),
        "State ON pushed (_set_condition)": on_pushed,
        "client: State ON event": client["client.State ON event"],
        "client: State ON seen (wait done)": client["client.State ON seen"],
    }
    return {name: (t - t0 if t is not None else None) for name, t in m.items()}


def http_summary(records: list[tuple], sim_records: list[tuple], t0: float, t_end: float
                 ) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """HTTP requests in [t0, t_end]: per 'METHOD call' the durations (device side, simulator side)."""
    device: dict[str, list[float]] = {}
    for r in records:
        if r[0] == "http" and t0 <= r[1] <= t_end:
            key = f"{r[4]} [{r[3].split('(')[0]}]"
            device.setdefault(key, []).append(r[2] - r[1])
    sim: dict[str, list[float]] = {}
    for path, start, end in sim_records:
        if t0 <= start <= t_end:
            sim.setdefault(path, []).append(end - start)
    return device, sim


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def print_table(count: int, rows: list[dict[str, float | None]]) -> None:
    print(f"\n=== {count} frame(s) per acquisition, {len(rows)} acquisitions (ms after the client called Start) ===")
    print("(milestones in the order of their median; step: from the milestone above, median and p90 of the "
          "per-acquisition differences; threads run in parallel, so a step may be negative)")
    print(f"{'milestone':<46} {'at med':>8} {'at p90':>8} {'step med':>9} {'step p90':>9} {'n':>3}")
    seen = [name for name in rows[0] if any(r[name] is not None for r in rows)]
    names = sorted(seen, key=lambda name: statistics.median(r[name] for r in rows if r[name] is not None))
    previous: str | None = None
    for name in names:
        values = [r[name] for r in rows if r[name] is not None]
        steps = [r[name] - r[previous] for r in rows if previous is not None and r[name] is not None
                 and r[previous] is not None]
        step = f"{statistics.median(steps) * 1e3:>9.2f} {pct(steps, 0.9) * 1e3:>9.2f}" if steps else f"{'':>19}"
        print(f"{name:<46} {statistics.median(values) * 1e3:>8.2f} {pct(values, 0.9) * 1e3:>8.2f} {step} "
              f"{len(values):>3}")
        previous = name


def print_http(device: list[dict[str, list[float]]], sim: list[dict[str, list[float]]]) -> None:
    n = len(device)
    print(f"HTTP per acquisition, Start -> State ON seen (mean count; median ms per call), over {n} acquisitions:")
    keys = sorted({k for d in device for k in d})
    total_count = sum(len(v) for d in device for v in d.values()) / n
    total_time = sum(sum(v) for d in device for v in d.values()) / n
    for key in keys:
        durations = [x for d in device for x in d.get(key, [])]
        print(f"  device  {key:<70} {len(durations) / n:>5.2f} x {statistics.median(durations) * 1e3:>7.2f} ms")
    print(f"  device  total: {total_count:.1f} requests, {total_time * 1e3:.1f} ms of request time per acquisition")
    keys = sorted({k for d in sim for k in d})
    sim_count = sum(len(v) for d in sim for v in d.values()) / n
    sim_time = sum(sum(v) for d in sim for v in d.values()) / n
    for key in keys:
        durations = [x for d in sim for x in d.get(key, [])]
        print(f"  sim     {key:<70} {len(durations) / n:>5.2f} x {statistics.median(durations) * 1e3:>7.2f} ms")
    print(f"  sim     total: {sim_count:.1f} requests, {sim_time * 1e3:.1f} ms handled per acquisition")


def print_timeline(client: dict[str, float], records: list[tuple], workers: list[tuple], t_end: float) -> None:
    t0 = client["t0"]
    rows = [(r[1], r[2], r[0], r[3], r[4]) for r in records if t0 - 0.001 <= r[1] <= t_end]
    rows += [(w[0], w[1], "worker._process_stack", "worker", f"[{w[3]}, {w[4]})") for w in workers
             if t0 <= w[0] <= t_end]
    rows += [(t, t, name, "client", "") for name, t in client.items() if t is not None and name != "t0"]
    print("\n--- timeline of one acquisition (ms after Start: start, duration, name, thread, detail) ---")
    for start, end, name, thread, detail in sorted(rows):
        print(f"{(start - t0) * 1e3:8.2f} {(end - start) * 1e3:7.2f}  {name:<28} {thread:<28} {detail or ''}")


def nav_shape_of(count: int) -> list[int]:
    side = math.isqrt(count)
    return [side, side] if side * side == count and count > 1000 else [count]


def measure(bench: Bench, frames: list[int], reps: list[int], timeline: bool) -> None:
    for count, n in zip(frames, reps):
        bench.proxy.nav_shape = nav_shape_of(count)
        bench.acquire()  # warm-up: a new nav_shape, and the receiver built at the first Start
        bench.dump()
        rows, http_device, http_sim, supervisor_polls = [], [], [], []
        for _ in range(n):
            sim_mark = len(bench.sim_rest.records)
            client = bench.acquire()
            records = bench.dump()
            workers = bench.worker_records()
            t_end = client["client.State ON seen"]
            rows.append(milestones(client, records, workers))
            supervisor_polls.append(any(r[0] == "sup.refresh" and client["t0"] <= r[1] <= t_end for r in records))
            device_http, sim_http = http_summary(records, bench.sim_rest.records[sim_mark:], client["t0"], t_end)
            http_device.append(device_http)
            http_sim.append(sim_http)
            if timeline and len(rows) == n // 2 + 1:
                print_timeline(client, records, workers, t_end + 0.002)
        print_table(count, rows)
        print_http(http_device, http_sim)
        polled = sum(1 for flag in supervisor_polls if flag)
        print(f"acquisitions with a supervisor state poll (sup.refresh) between Start and ON: {polled} of {n}")
        totals = [r["client: State ON seen (wait done)"] for r in rows]
        print(f"Start -> State ON seen: median {statistics.median(totals) * 1e3:.2f} ms, "
              f"p90 {pct(totals, 0.9) * 1e3:.2f}, max {max(totals) * 1e3:.2f}, mean {statistics.fmean(totals) * 1e3:.2f}")
        sys.stdout.flush()


def profile(bench: Bench, out: str, reps: int, rate: int) -> None:
    """py-spy record of the device server process over ``reps`` 1-frame Starts."""
    py_spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if py_spy is None:
        raise SystemExit("py-spy not found (pip install py-spy)")
    bench.proxy.nav_shape = [1]
    for _ in range(3):
        bench.acquire()
    spy = subprocess.Popen([py_spy, "record", "--pid", str(bench.device_pid), "--idle", "--threads",
                            "--nonblocking", "--rate", str(rate), "--format", "raw", "-o", out],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(1.0)  # attached
    started = now()
    for _ in range(reps):
        bench.acquire()
        bench.dump()
    elapsed = now() - started
    spy.send_signal(signal.SIGINT)
    _, err = spy.communicate(timeout=60)
    print(f"{reps} 1-frame acquisitions in {elapsed:.2f} s ({elapsed / reps * 1e3:.1f} ms each, py-spy attached); "
          f"profile of device pid {bench.device_pid} in {out}")
    if spy.returncode not in (0, -signal.SIGINT):
        print(err.decode(errors="replace")[-2000:])


def main() -> None:
    from contextlib import ExitStack

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[1, 1000, 65536],
                        help="series lengths (frames per acquisition)")
    parser.add_argument("--reps", type=int, nargs="+", default=[20, 5, 3],
                        help="timed acquisitions per series length (one value, or one per --frames)")
    parser.add_argument("--wait", choices=("poll", "event"), default="poll",
                        help="wait for State ON by polling State every 1 ms (as bench_start_turnaround) "
                             "or by its change event")
    parser.add_argument("--analyses", nargs="+", default=["sum", "sumsig"])
    parser.add_argument("--config-reuse", type=float, default=0.0,
                        help="the device's config_reuse (s): DCU settings read for one Start serve the next")
    parser.add_argument("--pacing", choices=("max", "frame_time"), default="max",
                        help="the simulator sends as soon as triggered, or paced at the frame time")
    parser.add_argument("--timeline", action="store_true", help="also print one acquisition's raw timeline "
                                                                "per series length")
    parser.add_argument("--py-spy", metavar="OUT", default=None,
                        help="record the device process with py-spy (raw format) instead of timing steps")
    parser.add_argument("--py-spy-reps", type=int, default=200)
    parser.add_argument("--py-spy-rate", type=int, default=500, help="samples per second")
    args = parser.parse_args()
    reps = args.reps * len(args.frames) if len(args.reps) == 1 else args.reps
    if len(reps) != len(args.frames):
        parser.error("--reps takes one value or one per --frames value")
    multiprocessing.set_start_method("forkserver", force=True)
    with ExitStack() as stack:
        bench = Bench(stack, args.wait, args.analyses, args.pacing)
        bench.proxy.config_reuse = args.config_reuse
        stack.callback(bench.close)
        print(f"device pid {bench.device_pid}, {os.cpu_count()} CPUs, wait for ON: {args.wait}")
        if args.py_spy:
            profile(bench, args.py_spy, args.py_spy_reps, args.py_spy_rate)
        else:
            measure(bench, args.frames, reps, args.timeline)


if __name__ == "__main__":
    main()
