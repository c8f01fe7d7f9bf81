"""Run the benchmark scenarios at every available depth, print one table, write the JSON record.

Depths: ``pipeline`` (receiver + workers, no Tango: ``bench_pipeline.py``), ``device`` (the
DectrisLive device server driven through a DeviceProxy that receives the result events:
``bench_device.py``) and ``libertem-live`` (``bench_libertem_live.py``). Each (scenario, analyses,
depth) runs in its own Python process (one warm-up series, then ``--runs`` measured ones) so that
processes, memory peaks and shared memory of one system never affect the other. The table shows
medians; ``ratio`` is our frames/s (pipeline or device) over LiberTEM-live's for the same scenario
and analyses. A run whose results differ from the ground truth makes its row FAILED. ``--rounds N``
runs the depths of a row in turn N times, each round starting one depth further on (pipeline,
device, LiberTEM-live; device, LiberTEM-live, pipeline; ...), and takes the medians over all
rounds: on a shared machine a slow spell then falls on every depth, not on one.

    .venv/bin/python benchmarks/run_all.py --quick                   # 1/8 of the frames
    .venv/bin/python benchmarks/run_all.py                           # issue 6's scenarios
    .venv/bin/python benchmarks/run_all.py --quick --scenarios arina96 quadro512 --analyses sum+sumsig
    .venv/bin/python benchmarks/run_all.py --scenarios arina96 quadro512 --analyses sum+sumsig --rounds 3
    .venv/bin/python benchmarks/run_all.py --quick --scenarios arina96 --depths device
    .venv/bin/python benchmarks/run_all.py --realtime arina96 --realtime-max 120000

Figures are from a shared 2-core machine, simulator included: compare within one run of this script.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.scenarios import ANALYSIS_SETS, SCENARIOS, median, record_header, scenario_by_name  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
SCRIPTS = {"pipeline": HERE / "bench_pipeline.py", "device": HERE / "bench_device.py",
           "libertem-live": HERE / "bench_libertem_live.py"}
OURS = ("pipeline", "device")
RUN_TIMEOUT_S = 1800
STOP_GRACE_S = 60  # a script told to stop (SIGTERM) stops its simulator, servers and workers first


def libertem_live_available() -> bool:
    try:
        import libertem_live  # noqa: F401
    except ImportError:
        return False
    return True


def run_script(depth: str, args: list[str]) -> tuple[Any, str]:
    """Run one benchmark script with ``--json``; (its JSON or None, the tail of its output)."""
    with tempfile.TemporaryDirectory(prefix="tdl-bench-") as tmp:
        out = Path(tmp) / "figures.json"
        command = [sys.executable, str(SCRIPTS[depth]), *args, "--json", str(out)]
        with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              cwd=HERE.parent) as script:
            try:
                output, _ = script.communicate(timeout=RUN_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                # SIGTERM, not SIGKILL: the script then stops the processes it started itself
                script.terminate()
                try:
                    output, _ = script.communicate(timeout=STOP_GRACE_S)
                except subprocess.TimeoutExpired:
                    script.kill()
                    output, _ = script.communicate()
                return None, f"timed out after {RUN_TIMEOUT_S} s: {output}"[-2000:]
        if script.returncode != 0 or not out.exists():
            return None, f"exit status {script.returncode}: {output[-2000:]}"
        return json.loads(out.read_text()), output[-2000:]


def summarise(depth: str, scenario: str, analyses: str, runs: list[dict[str, Any]] | None, log: str) -> dict[str, Any]:
    """The medians of one (scenario, analyses, depth) and whether every run was correct."""
    if not runs:
        return {"scenario": scenario, "depth": depth, "analyses": analyses, "correct": False,
                "problems": [log.strip().splitlines()[-1] if log.strip() else "no output"], "runs": 0}
    cpu_names = list(runs[0]["cpu_s"])
    return {
        "scenario": scenario, "depth": depth, "analyses": analyses, "runs": len(runs),
        "frames": runs[0]["frames"],
        "frames_per_s": round(median([r["frames_per_s"] for r in runs]), 1),
        "frames_per_s_each": [round(r["frames_per_s"], 1) for r in runs],
        "mb_per_s": round(median([r["mb_per_s"] for r in runs]), 1),
        "latency_ms": round(median([r["latency_ms"] for r in runs]), 1),
        "sim_send_s": round(median([r["sim_send_s"] for r in runs]), 4),
        "cpu_s": {name: round(median([r["cpu_s"][name] for r in runs]), 3) for name in cpu_names},
        "peak_mb": round(median([r["peak_mb"] for r in runs]), 1),
        "correct": all(r["correct"] for r in runs),
        "problems": sorted({p for r in runs for p in r["problems"]}),
        "settings": runs[0].get("extra", {}).get("settings", {}),
    }


def measure_rounds(scenario: str, analyses: str, depths: list[str], rounds: int, runs: int,
                   workers: int) -> list[dict[str, Any]]:
    """One row per depth: ``rounds`` rounds that each run every depth once (``runs`` measured
    series per script), so that the depths take turns and a slow spell of a shared machine falls
    on all of them; each round starts one depth further on (pipeline, device, LiberTEM-live, then
    device, LiberTEM-live, pipeline, ...), because the first script after a pause runs slowest.
    Each row's medians are over every round's runs. A round that fails makes its row FAILED, with
    what went wrong."""
    collected: dict[str, list[dict[str, Any]]] = {depth: [] for depth in depths}
    failures: dict[str, list[str]] = {depth: [] for depth in depths}
    for round_index in range(rounds):
        turn = round_index % len(depths)
        for depth in depths[turn:] + depths[:turn]:
            label = f" (round {round_index + 1} of {rounds})" if rounds > 1 else ""
            print(f"... {scenario} {analyses} {depth}{label}", flush=True)
            measured, log = run_script(depth, ["--scenario", scenario, "--analyses", analyses,
                                               "--runs", str(runs), "--workers", str(workers)])
            if measured:
                collected[depth] += measured
            else:
                failures[depth].append(log.strip().splitlines()[-1] if log.strip() else "no output")
    rows = []
    for depth in depths:
        row = summarise(depth, scenario, analyses, collected[depth] or None,
                        failures[depth][-1] if failures[depth] else "")
        if collected[depth] and failures[depth]:
            row["correct"] = False
            row["problems"] += [f"{len(failures[depth])} of {rounds} rounds failed: {failures[depth][-1]}"]
        row["rounds"] = rounds
        rows.append(row)
    return rows


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """ratio = ours / LiberTEM-live frames/s, on our rows, for the same scenario and analyses."""
    theirs = {(r["scenario"], r["analyses"]): r for r in rows if r["depth"] == "libertem-live" and r["runs"]}
    for row in rows:
        other = theirs.get((row["scenario"], row["analyses"]))
        if row["depth"] in OURS and row["runs"] and other is not None:
            row["ratio_vs_libertem_live"] = round(row["frames_per_s"] / other["frames_per_s"], 2)


def print_table(rows: list[dict[str, Any]]) -> None:
    header = (f"{'scenario':22s} {'depth':13s} {'analyses':11s} {'frames/s':>10s} {'MB/s':>7s} {'latency ms':>10s} "
              f"{'CPU s per component':66s} {'peak MB':>8s} {'ratio':>6s} correct")
    print(header)
    print("-" * len(header))
    for r in rows:
        if not r["runs"]:
            print(f"{r['scenario']:22s} {r['depth']:13s} {r['analyses']:11s} {'-':>10s} {'-':>7s} {'-':>10s} "
                  f"{'':66s} {'-':>8s} {'-':>6s} FAILED ({'; '.join(r['problems'])[:120]})")
            continue
        cpu = " ".join(f"{k} {v:.2f}" for k, v in r["cpu_s"].items())
        ratio = f"{r['ratio_vs_libertem_live']:.2f}" if "ratio_vs_libertem_live" in r else "-"
        verdict = "yes" if r["correct"] else "FAILED (" + "; ".join(r["problems"])[:120] + ")"
        print(f"{r['scenario']:22s} {r['depth']:13s} {r['analyses']:11s} {r['frames_per_s']:10,.0f} "
              f"{r['mb_per_s']:7,.0f} {r['latency_ms']:10.1f} {cpu:66s} {r['peak_mb']:8,.0f} {ratio:>6s} {verdict}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1/8 of the frames per scenario")
    parser.add_argument("--scenarios", nargs="+", default=[s.name for s in SCENARIOS],
                        choices=[s.name for s in SCENARIOS])
    parser.add_argument("--analyses", nargs="+", default=list(ANALYSIS_SETS), choices=list(ANALYSIS_SETS))
    parser.add_argument("--depths", nargs="+", default=list(SCRIPTS), choices=list(SCRIPTS))
    parser.add_argument("--runs", type=int, default=3, help="measured runs per script (median reported)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run the depths of a row this many times in turn (medians over all rounds' runs)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--no-warmup", dest="warmup", action="store_false",
                        help="skip the unrecorded warm-up run before the first row")
    parser.add_argument("--realtime", nargs="*", default=None, metavar="SCENARIO",
                        help="also search the real-time limit of these scenarios (depth 1, sum+sumsig); "
                             "no name: arina96")
    parser.add_argument("--realtime-max", type=float, default=None, help="upper end of the search (Hz)")
    parser.add_argument("--output", type=Path, default=None,
                        help="JSON record (default benchmarks/results/<date>[-quick].json)")
    args = parser.parse_args()
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")

    depths = list(args.depths)
    notes = []
    if "libertem-live" in depths and not libertem_live_available():
        depths.remove("libertem-live")
        notes.append("libertem-live is not installed (pip install -e '.[bench]'): depth 3 skipped")
    for note in notes:
        print(f"note: {note}")

    suffix = "-quick" if args.quick else ""
    rows: list[dict[str, Any]] = []
    started = time.time()
    load_before = os.getloadavg()
    if args.warmup and args.scenarios and depths:
        # whichever script runs first in a fresh run_all was measured 5-25 % slower than the same
        # script run second (arina96, pipeline and device in both orders): warm the machine up
        # with an unrecorded quick run so that the first row is not penalised
        first = scenario_by_name(args.scenarios[0] + "-quick")
        print(f"... warm-up (not recorded): {first.name} sum+sumsig {depths[0]}", flush=True)
        run_script(depths[0], ["--scenario", first.name, "--analyses", "sum+sumsig", "--runs", "1",
                               "--workers", str(args.workers)])
    for name in args.scenarios:
        scenario = scenario_by_name(name + suffix)
        for analyses in args.analyses:
            rows += measure_rounds(scenario.name, analyses, depths, args.rounds, args.runs, args.workers)
    add_ratios(rows)
    print()
    print_table(rows)

    realtime = []
    for name in ([] if args.realtime is None else (args.realtime or ["arina96"])):
        scenario = scenario_by_name(name)
        extra = ["--realtime-high", str(args.realtime_max)] if args.realtime_max else []
        print(f"... real-time limit of {scenario.name} (depth 1, sum+sumsig)", flush=True)
        limit, log = run_script("pipeline", ["--scenario", scenario.name, "--analyses", "sum+sumsig", "--realtime",
                                             "--workers", str(args.workers), *extra])
        if limit is None:
            realtime.append({"scenario": scenario.name, "error": log.strip().splitlines()[-1] if log else "?"})
            print(f"{scenario.name}: real-time search FAILED: {realtime[-1]['error']}")
        else:
            realtime.append(limit)
            print(f"{scenario.name}: highest paced rate processed in real time: {limit['realtime_limit_hz']:,.0f} Hz "
                  f"(searched up to {limit['searched_up_to_hz']:,.0f} Hz)")

    record = {
        **record_header(load_before),
        "duration_s": round(time.time() - started, 1),
        "notes": notes + ["numbers from a shared machine (other jobs running): noisy"],
        "rows": rows, "realtime": realtime,
    }
    output = args.output or RESULTS / f"{datetime.date.today().isoformat()}{suffix}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(record, indent=1) + "\n")
    print(f"\nwritten {output}")
    if not all(r["correct"] for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
