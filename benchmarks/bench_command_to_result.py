"""Command to result, as a user waits: our DectrisLive device in active mode side by side with LiberTEM-live.

Both systems process the same stream (same scenario, simulator settings, seed and ground truth:
stream v1, ``header_detail`` basic, pacing max, trigger mode ints) with ``--workers`` worker
processes and the analyses ``--analyses``; each result is checked against the ground truth.

* **ours**: the ``DectrisLive`` device (embedded Tango database, its own server process, set up as
  in ``bench_device.py``, then switched from Listen to idle) is used in ACTIVE mode. The interval
  runs from just before the client calls ``proxy.Start()`` (the device reads the DCU's settings,
  sets nimages/ntrigger from ``nav_shape`` where they differ, connects its receiver -- its
  ``stream_connection`` is ``per_series``, so it is disconnected while idle --, arms, triggers,
  receives, processes, publishes) until the client has received BOTH the data-ready event of
  every result attribute (pushed after the final result) AND the State ON change event that
  follows the RUNNING of this Start.
* **LiberTEM-live**: ``bench_libertem_live.LiberTEMLiveBench.run_once`` (its own DECTRIS
  connection, passive mode): the interval runs from just before the REST ``arm`` (then
  ``wait_for_acquisition``, ``make_acquisition``, the trigger sent from a thread, ``run_udf``)
  until ``run_udf`` returns with the results.
* **streaming** (the interval of the other benchmarks, here timed on the simulator's side for both
  systems): the simulator starts handling the trigger -> the final result at the client (ours:
  the last final change event, as ``bench_device.py``; LiberTEM-live: ``run_udf`` returns).

Like ``run_all.py``, every (system, round) runs in its own Python process with its own simulator
(one warm-up series, then ``--runs`` measured ones), so only one consumer is ever connected to a
stream and LiberTEM-live's connection is closed while ours runs; the systems alternate round by
round (ours first in odd rounds, LiberTEM-live first in even ones). Medians are over all runs of
all rounds.

    .venv/bin/python benchmarks/bench_command_to_result.py --scenarios arina96 quadro512 --rounds 3 --runs 3
    .venv/bin/python benchmarks/bench_command_to_result.py --scenarios arina96-quick --rounds 1 --runs 2
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import scenarios  # noqa: E402
from benchmarks.scenarios import (SimulatorProcess, analyses_by_name, median, record_header,  # noqa: E402
                                  scenario_by_name)

SYSTEMS = ("ours", "libertem-live")
LABELS = {"ours": "ours (DectrisLive, Start)", "libertem-live": "LiberTEM-live 0.3"}
RUN_TIMEOUT_S = 120.0  # per series: Start -> final result and State ON


# ---------------------------------------------------------------------------------------------
# A simulator that notes when it handles arm and trigger (CLOCK_MONOTONIC: comparable across processes)

def _serve_timed_simulator(model: str, ports: Any, stop: Any, stamps: Any) -> None:
    """``scenarios._serve_simulator`` with SimulatedDetector.arm/trigger stamped: stamps[0] the
    trigger's start, stamps[1] its end (last frame handed to ZeroMQ), stamps[2] the arm's start."""
    from sim.detector import SimulatedDetector

    arm, trigger = SimulatedDetector.arm, SimulatedDetector.trigger

    def timed_arm(self: Any) -> Any:
        stamps[2] = time.perf_counter()
        return arm(self)

    def timed_trigger(self: Any, count_time: Any = None) -> Any:
        stamps[0], stamps[1] = time.perf_counter(), 0.0
        try:
            return trigger(self, count_time)
        finally:
            stamps[1] = time.perf_counter()

    SimulatedDetector.arm, SimulatedDetector.trigger = timed_arm, timed_trigger
    scenarios._serve_simulator(model, ports, stop)


class TimedSimulatorProcess(SimulatorProcess):
    """:class:`scenarios.SimulatorProcess` whose simulator stamps arm and trigger in ``stamps``."""

    def __init__(self, model: str, start_timeout: float = 60.0) -> None:
        self.stamps = multiprocessing.get_context("spawn").Array("d", 3, lock=False)
        super().__init__(model, start_timeout, serve=_serve_timed_simulator, extra_args=(self.stamps,))


# ---------------------------------------------------------------------------------------------
# ours: the device in active mode

def make_device_bench(scenario: Any, analyses: str, workers: int) -> Any:
    import tango

    from benchmarks import bench_device
    from benchmarks.start_timer import StartTimer
    from tango_dectris_live.testing import wait_for

    bench_device.SimulatorProcess = TimedSimulatorProcess  # this child process only

    class ActiveDeviceBench(bench_device.DeviceBench):
        """bench_device's set-up (which ends listening), then Stop: each run is one Start."""

        def __init__(self) -> None:
            super().__init__(scenario, analyses, workers=workers)
            self.settings["receiver_mode"] = "active (Start)"
            self.settings["stream_connection"] = str(self.proxy.stream_connection)
            self.proxy.Stop()
            wait_for(lambda: "Live processing (idle)" in self.proxy.status(), 60,
                     lambda: f"the device idle after Stop (Status: {self.proxy.status()})", interval=0.05)
            self.timer = StartTimer(self.proxy, tuple(self.results))

        def close(self) -> None:
            if getattr(self, "timer", None) is not None:
                self.timer.close()
            super().close()

        def run_once(self) -> dict[str, Any]:
            series = self._next_series
            self.events.clear()
            started = self.timer.start()
            try:
                result_at, ready_at = self.timer.wait(RUN_TIMEOUT_S)
            except RuntimeError as error:
                raise RuntimeError(f"{error} (errors: {self.events.errors})") from None
            self._next_series += 1
            final = bench_device.final_results(self.events, self.results)
            problems = []
            if final is None:
                problems.append(f"no final change event of every result (errors: {self.events.errors})")
                final_at = result_at
            else:
                final_at = max(event.received_at for event in final.values())
                problems += [f"{name}: final quality {event.quality}" for name, event in final.items()
                             if event.quality != tango.AttrQuality.ATTR_VALID]
                problems += scenarios.check_results({name: np.asarray(event.value) for name, event in final.items()},
                                                    self.truth)
            progress = {name: self.proxy.read_attribute(name).value
                        for name in ("series_id", "frames_processed", "frames_missing")}
            if int(progress["series_id"]) != series:
                problems.append(f"the device reports series {progress['series_id']}, expected {series}")
            if int(progress["frames_processed"]) != self.scenario.frames:
                problems.append(f"{progress['frames_processed']} of {self.scenario.frames} frames processed "
                                f"({progress['frames_missing']} missing)")
            trigger_start, trigger_end, arm_start = self.sim.stamps
            return record("ours", self.scenario, analyses, started, max(result_at, ready_at), problems,
                          result_s=result_at - started, ready_s=ready_at - started,
                          to_arm_s=arm_start - started, to_trigger_s=trigger_start - started,
                          streaming_s=final_at - trigger_start, latency_ms=(final_at - trigger_end) * 1e3,
                          sim_send_s=trigger_end - trigger_start, settings=self.settings)

    return ActiveDeviceBench()


# ---------------------------------------------------------------------------------------------
# LiberTEM-live: bench_libertem_live's run_once, timed from the arm to run_udf's return

def make_libertem_bench(scenario: Any, analyses: str, workers: int) -> Any:
    from benchmarks import bench_libertem_live

    bench_libertem_live.SimulatorProcess = TimedSimulatorProcess  # this child process only

    class TimedLiberTEMLiveBench(bench_libertem_live.LiberTEMLiveBench):
        def __init__(self) -> None:
            super().__init__(scenario, analyses, workers=workers)
            self._arm_at = self._returned_at = 0.0
            arm, run_udf = self.control.arm, self.ctx.run_udf

            def timed_arm() -> int:
                self._arm_at = time.perf_counter()
                return arm()

            def timed_run_udf(*args: Any, **kwargs: Any) -> Any:
                try:
                    return run_udf(*args, **kwargs)
                finally:
                    self._returned_at = time.perf_counter()

            self.control.arm, self.ctx.run_udf = timed_arm, timed_run_udf

        def run_once(self) -> dict[str, Any]:
            figures = super().run_once()  # arm ... run_udf; its finished_at is our _returned_at (+ ~1 us)
            started, finished = self._arm_at, self._returned_at
            trigger_start, trigger_end, arm_start = self.sim.stamps
            return record("libertem-live", self.scenario, analyses, started, finished, figures.problems,
                          result_s=finished - started, ready_s=finished - started,
                          to_arm_s=arm_start - started, to_trigger_s=trigger_start - started,
                          streaming_s=finished - trigger_start, latency_ms=(finished - trigger_end) * 1e3,
                          sim_send_s=trigger_end - trigger_start, client_trigger_to_result_s=figures.elapsed_s,
                          settings=self.settings)

    return TimedLiberTEMLiveBench()


def record(system: str, scenario: Any, analyses: str, started: float, finished: float, problems: list[str],
           **figures: Any) -> dict[str, Any]:
    elapsed = finished - started
    return {"system": system, "scenario": scenario.name, "analyses": analyses, "frames": scenario.frames,
            "command_to_result_s": elapsed, "frames_per_s": scenario.frames / elapsed,
            "correct": not problems, "problems": problems, **figures}


def run_child(args: argparse.Namespace) -> None:
    """One system, one scenario: a warm-up series, then ``--runs`` measured ones, written to --json."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))  # clean up as on Ctrl-C
    scenario = scenario_by_name(args.scenario)
    make = make_device_bench if args.child == "ours" else make_libertem_bench
    with make(scenario, args.analyses, args.workers) as bench:
        for _ in range(args.warmup):
            bench.run_once()
        runs = [bench.run_once() for _ in range(args.runs)]
    for run in runs:
        print(f"{run['system']} {run['scenario']}: {run['command_to_result_s'] * 1e3:.1f} ms "
              f"{'ok' if run['correct'] else run['problems']}")
    args.json.write_text(json.dumps(runs))


# ---------------------------------------------------------------------------------------------
# The orchestrating process

def measure_scenario(name: str, args: argparse.Namespace) -> dict[str, Any]:
    from benchmarks import run_all

    for system in SYSTEMS:
        run_all.SCRIPTS[system] = Path(__file__).resolve()  # run_all.run_script runs this file as the child
    collected: dict[str, list[dict[str, Any]]] = {system: [] for system in args.systems}
    failures: dict[str, list[str]] = {system: [] for system in args.systems}
    for round_index in range(args.rounds):
        turn = round_index % len(args.systems)
        for system in args.systems[turn:] + args.systems[:turn]:
            print(f"... {name} {args.analyses} {system} (round {round_index + 1} of {args.rounds})", flush=True)
            runs, log = run_all.run_script(system, [
                "--child", system, "--scenario", name, "--analyses", args.analyses, "--runs", str(args.runs),
                "--warmup", str(args.warmup), "--workers", str(args.workers)])
            if runs:
                collected[system] += runs
            else:
                failures[system].append(log.strip().splitlines()[-1] if log.strip() else "no output")
                print(f"    FAILED: {failures[system][-1]}", flush=True)
    return {"scenario": name, "runs": collected, "failures": failures}


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    times = [r["command_to_result_s"] * 1e3 for r in runs]
    med = median(times)
    return {"runs": len(runs), "median_ms": med, "min_ms": min(times), "max_ms": max(times),
            "frames_per_s": runs[0]["frames"] / med * 1e3,
            "result_ms": median([r["result_s"] * 1e3 for r in runs]),
            "ready_ms": median([r["ready_s"] * 1e3 for r in runs]),
            "to_arm_ms": median([r["to_arm_s"] * 1e3 for r in runs]),
            "to_trigger_ms": median([r["to_trigger_s"] * 1e3 for r in runs]),
            "streaming_ms": median([r["streaming_s"] * 1e3 for r in runs]),
            "latency_ms": median([r["latency_ms"] for r in runs]),
            "sim_send_ms": median([r["sim_send_s"] * 1e3 for r in runs]),
            "correct": all(r["correct"] for r in runs),
            "problems": sorted({p for r in runs for p in r["problems"]})}


def print_scenario(measured: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    scenario = scenario_by_name(measured["scenario"])
    print(f"\n{scenario.name}: {scenario.description}, {scenario.frames:,} frames, {args.analyses}, "
          f"{args.workers} workers, pacing max; {args.rounds} rounds x {args.runs} runs")
    header = (f"{'system':26s} {'cmd->result+ready ms':>20s} {'min-max ms':>15s} {'frames/s':>9s} "
              f"{'result/ON ms':>13s} {'->arm/->trig ms':>15s} {'streaming ms':>12s} correct")
    print(header)
    print("-" * len(header))
    rows = {}
    for system in args.systems:
        runs, failures = measured["runs"][system], measured["failures"][system]
        if not runs:
            print(f"{LABELS[system]:26s} FAILED: {'; '.join(failures)[:150]}")
            continue
        row = rows[system] = summarise(runs)
        row["failed_rounds"] = failures
        verdict = "yes" if row["correct"] and not failures else \
            "NO: " + "; ".join(row["problems"] + [f"{len(failures)} round(s) failed"] * bool(failures))[:150]
        print(f"{LABELS[system]:26s} {row['median_ms']:20.1f} "
              f"{row['min_ms']:7.1f}-{row['max_ms']:<7.1f} {row['frames_per_s']:9,.0f} "
              f"{row['result_ms']:6.1f}/{row['ready_ms']:<6.1f} {row['to_arm_ms']:6.1f}/{row['to_trigger_ms']:<8.1f} "
              f"{row['streaming_ms']:12.1f} {verdict} (n={row['runs']})")
    summary: dict[str, Any] = {"scenario": scenario.name, "frames": scenario.frames, "rows": rows}
    if "ours" in rows and "libertem-live" in rows:
        time_ratio = rows["ours"]["median_ms"] / rows["libertem-live"]["median_ms"]
        stream_ratio = rows["ours"]["streaming_ms"] / rows["libertem-live"]["streaming_ms"]
        summary.update(time_ratio=time_ratio, frames_per_s_ratio=1 / time_ratio, streaming_time_ratio=stream_ratio)
        print(f"ratio ours/LiberTEM-live: command->result time {time_ratio:.2f}, frames/s {1 / time_ratio:.2f} "
              f"(streaming only: time {stream_ratio:.2f}, frames/s {1 / stream_ratio:.2f})")
    return summary


INTERVALS = (
    "cmd->result+ready: ours = client, just before proxy.Start() -> the later of (data-ready event of every "
    "result attribute, State ON change event after RUNNING) received by the client; includes the device's "
    "DCU reads, stream connect (per_series), arm, trigger, receive, process, publish. LiberTEM-live = just "
    "before the REST arm -> run_udf returns with the results (wait_for_acquisition, make_acquisition, "
    "trigger in a thread, receive, process, merge). frames/s = frames / median. result/ON: medians of "
    "Start -> data-ready / -> State ON (LiberTEM-live: both = run_udf return). ->arm/->trig: command -> the "
    "simulator starts handling arm / trigger. streaming = simulator starts the trigger -> final result at "
    "the client (ours: last final change event; LiberTEM-live: run_udf return).")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--scenarios", nargs="+", default=["arina96", "quadro512"],
                        help="scenario names of benchmarks/scenarios.py (suffix -quick: 1/8 of the frames)")
    parser.add_argument("--analyses", default="sum+sumsig", help="sum+sumsig or bf+adf+com")
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    parser.add_argument("--rounds", type=int, default=3, help="the systems take turns this many times")
    parser.add_argument("--runs", type=int, default=3, help="measured series per system and round")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured series before them")
    parser.add_argument("--workers", type=int, default=2, help="worker processes in both systems")
    parser.add_argument("--json", type=Path, default=None, help="write the record (every run) here")
    parser.add_argument("--child", choices=SYSTEMS, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--scenario", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.runs < 1 or args.rounds < 1 or args.warmup < 0:
        parser.error("--runs and --rounds must be at least 1, --warmup at least 0")
    analyses_by_name(args.analyses)
    if args.child is not None:
        run_child(args)
        return
    for name in args.scenarios:
        scenario_by_name(name)  # fail early on a typo
    load_before = os.getloadavg()
    started = time.time()
    measured = [measure_scenario(name, args) for name in args.scenarios]
    summaries = [print_scenario(m, args) for m in measured]
    print("\n" + INTERVALS)
    load_after = os.getloadavg()
    print(f"load average before {' '.join(f'{x:.2f}' for x in load_before)}, "
          f"after {' '.join(f'{x:.2f}' for x in load_after)}; {time.time() - started:.0f} s")
    if args.json is not None:
        args.json.write_text(json.dumps({
            **record_header(load_before, load_after),
            "intervals": INTERVALS, "summaries": summaries, "measured": measured}, indent=1) + "\n")
        print(f"written {args.json}")
    if not all(s["rows"].get(system, {}).get("correct") and not s["rows"][system]["failed_rounds"]
               for s in summaries for system in args.systems):
        sys.exit(1)


if __name__ == "__main__":
    main()
