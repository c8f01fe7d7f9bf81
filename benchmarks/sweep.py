"""Vary one tuning parameter at a time and measure its effect on the pipeline (depth 1).

For each scenario the default settings are measured first and last (their difference shows how
much the machine drifted meanwhile); every other row changes exactly one parameter from the
defaults. Each row is the median of ``--runs`` series after ``--warmup`` unreported ones, in a
fresh simulator + receiver + worker pool (:func:`benchmarks.bench_pipeline.measure`); every series
is checked against the ground truth, so a row is only "correct" when all of its series were.

Parameters and values (``auto``: the value the device computes from the detector geometry):

* ``workers``: 1, 2 (default), 3
* ``num_slots``: 2, 4, 8, 16, 32 and auto (default: 4 to 16, as many as fit ~64 MiB)
* ``frame_stack_size``: 1/4, 1/2, 1 (default), 2, 4 times auto (``num_slots`` held at its default count)
* ``frames_per_partition``: 1/8, 1/4, 1/2 of the stack, whole stack (default)
* ``stream_format``: legacy (default), cbor
* ``header_detail``: basic (default), all, none

    .venv/bin/python benchmarks/sweep.py --quick --runs 1 --scenarios quadro512   # a first look
    .venv/bin/python benchmarks/sweep.py                          # arina96 + quadro512, median of 3
    .venv/bin/python benchmarks/sweep.py --parameters num_slots --realtime         # + real-time limits

Prints one table per scenario and writes ``benchmarks/results/sweep-<date>[-quick].json``.
Figures from a shared machine are noisy: compare rows of one run, and read the drift line.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
import traceback
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_pipeline import json_default, measure, realtime_limit  # noqa: E402
from benchmarks.scenarios import (  # noqa: E402
    record_header,
    ANALYSIS_SETS, SCENARIOS, RunFigures, Scenario, median, scenario_by_name)
from tango_dectris_live.receiver.framestack import FrameStackLayout  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

# What bench_pipeline measures with when nothing is changed; None: computed from the geometry.
DEFAULTS: dict[str, Any] = {"workers": 2, "num_slots": None, "frame_stack_size": None,
                            "frames_per_partition": None, "stream_format": "legacy", "header_detail": "basic"}
PARAMETERS = tuple(DEFAULTS)
WORKERS = (1, 2, 3)
NUM_SLOTS = (2, 4, 8, 16, 32)
FRAME_STACK_FACTORS = (Fraction(1, 4), Fraction(1, 2), Fraction(1), Fraction(2), Fraction(4))
PARTITION_FRACTIONS = (Fraction(1, 8), Fraction(1, 4), Fraction(1, 2), Fraction(1))
STREAM_FORMATS = ("legacy", "cbor")
HEADER_DETAILS = ("basic", "all", "none")


@dataclass(frozen=True)
class SweepPoint:
    """One setting of one parameter, all others at their defaults."""

    parameter: str
    value: Any  # passed to bench_pipeline (None: automatic)
    label: str  # as printed in the table
    # automatic values held at what they are for the default stack (see sweep_points)
    pinned: tuple[tuple[str, Any], ...] = ()

    @property
    def is_default(self) -> bool:
        return self.value == DEFAULTS[self.parameter]

    def settings(self) -> dict[str, Any]:
        return {**DEFAULTS, **dict(self.pinned), self.parameter: self.value}


def automatic_layout(scenario: Scenario) -> FrameStackLayout:
    """The slots the receiver sets up for this geometry when nothing is configured."""
    return FrameStackLayout.for_frames(scenario.frame_shape, scenario.dtype)


def automatic_frame_stack_size(scenario: Scenario) -> int:
    return automatic_layout(scenario).frame_stack_size


def sweep_points(scenario: Scenario, parameters: tuple[str, ...]) -> list[SweepPoint]:
    """Every point of the sweep of ``parameters``, default values included (in table order)."""
    auto = automatic_layout(scenario)
    auto_stack = auto.frame_stack_size
    points: list[SweepPoint] = []
    for parameter in parameters:
        if parameter == "workers":
            points += [SweepPoint(parameter, n, str(n)) for n in WORKERS]
        elif parameter == "num_slots":
            points += [SweepPoint(parameter, None, f"auto ({n})") if n == auto.num_slots
                       else SweepPoint(parameter, n, str(n)) for n in sorted({*NUM_SLOTS, auto.num_slots})]
        elif parameter == "frame_stack_size":
            for factor in FRAME_STACK_FACTORS:
                size = max(1, round(auto_stack * factor))
                # the automatic slot count follows the stack size (slots fill ~64 MiB): keep the
                # default's count so that only the stack size changes
                points.append(SweepPoint(parameter, None, f"auto ({size})") if factor == 1 else
                              SweepPoint(parameter, size, f"{factor}x auto ({size})",
                                         pinned=(("num_slots", auto.num_slots),)))
        elif parameter == "frames_per_partition":
            for fraction in PARTITION_FRACTIONS:
                size = max(1, round(auto_stack * fraction))
                points.append(SweepPoint(parameter, None if fraction == 1 else size,
                                         f"{fraction} stack ({size})" if fraction != 1 else f"whole stack ({size})"))
        elif parameter == "stream_format":
            points += [SweepPoint(parameter, v, v) for v in STREAM_FORMATS]
        elif parameter == "header_detail":
            points += [SweepPoint(parameter, v, v) for v in HEADER_DETAILS]
        else:
            raise ValueError(f"cannot sweep {parameter!r}; choose from {', '.join(PARAMETERS)}")
    return points


def summarise(figures: list[RunFigures]) -> dict[str, Any]:
    """Medians over the runs of one point; correct only when every run was."""
    cpu_names = list(figures[0].cpu_s)
    return {
        "runs": len(figures),
        "frames_per_s": round(median([f.frames_per_s for f in figures]), 1),
        "frames_per_s_each": [round(f.frames_per_s, 1) for f in figures],
        "mb_per_s": round(median([f.mb_per_s for f in figures]), 1),
        "compressed_mb_per_s": round(median([f.extra.get("compressed_mb_per_s", float("nan")) for f in figures]), 1),
        "latency_ms": round(median([f.latency_ms for f in figures]), 1),
        "sim_send_s": round(median([f.sim_send_s for f in figures]), 4),
        "backpressure_s": round(median([f.extra.get("backpressure_s", float("nan")) for f in figures]), 4),
        "cpu_s": {name: round(median([f.cpu_s[name] for f in figures]), 3) for name in cpu_names},
        "cpu_s_each": [f.cpu_s for f in figures],  # a slow run shows which component took the time
        "peak_mb": round(median([f.peak_mb for f in figures]), 1),
        "correct": all(f.correct for f in figures),
        "problems": sorted({p for f in figures for p in f.problems}),
    }


def measure_point(scenario: Scenario, analyses: str, settings: dict[str, Any], runs: int,
                  warmup: int) -> list[RunFigures] | str:
    """The runs of one setting, or why its bench failed (the sweep goes on with the next one)."""
    try:
        return measure(scenario, analyses, runs, warmup, **settings)
    except Exception as error:  # becomes a FAILED row in the table and the JSON; the exit status says so
        print(f"    FAILED: {traceback.format_exc(limit=8)}", flush=True)
        return "".join(traceback.format_exception_only(error)).strip()


def summary_row(outcome: list[RunFigures] | str) -> dict[str, Any]:
    if isinstance(outcome, str):
        return {"runs": 0, "correct": False, "problems": [outcome]}
    return summarise(outcome)


def measure_realtime(scenario: Scenario, analyses: str, settings: dict[str, Any]) -> dict[str, Any]:
    """The real-time limit at ``settings`` (bisection of paced rates), or the reason it failed."""
    try:
        limit = realtime_limit(scenario, analyses, **settings)
    except Exception as error:  # recorded in the row, the sweep goes on
        return {"realtime_error": "".join(traceback.format_exception_only(error)).strip()}
    row = {"realtime_limit_hz": limit["realtime_limit_hz"], "realtime_searched_up_to_hz": limit["searched_up_to_hz"],
           "realtime_trials": limit["trials"]}
    auto = automatic_layout(scenario)
    stack = settings["frame_stack_size"] or auto.frame_stack_size
    if (settings["num_slots"] or auto.num_slots) * stack >= scenario.frames:
        # the receiver never has to wait for a worker: the limit says nothing about keeping up
        row["realtime_series_fits_in_slots"] = True
    return row


def sweep_scenario(scenario: Scenario, analyses: str, parameters: tuple[str, ...], runs: int, warmup: int,
                   realtime: bool) -> dict[str, Any]:
    """Measure the defaults (before and after), then each non-default point; rows in table order."""
    print(f"... {scenario.name} {analyses}: defaults", flush=True)
    before = measure_point(scenario, analyses, DEFAULTS, runs, warmup)
    rows: list[dict[str, Any]] = []
    for point in sweep_points(scenario, parameters):
        row: dict[str, Any] = {"parameter": point.parameter, "value": point.value, "label": point.label,
                               "default": point.is_default, "settings": point.settings()}
        if not point.is_default:  # the defaults are measured once, before and after, and shown in each group
            print(f"... {scenario.name} {analyses}: {point.parameter} = {point.label}", flush=True)
            row.update(summary_row(measure_point(scenario, analyses, point.settings(), runs, warmup)))
        if realtime and point.parameter == "num_slots":
            print(f"... {scenario.name} {analyses}: real-time limit at num_slots = {point.label}", flush=True)
            row.update(measure_realtime(scenario, analyses, point.settings()))
        rows.append(row)
    print(f"... {scenario.name} {analyses}: defaults again (drift)", flush=True)
    after = measure_point(scenario, analyses, DEFAULTS, runs, warmup)
    # the baseline pools the runs before and after, so that a drifting machine favours neither end
    measured = [o for o in (before, after) if not isinstance(o, str)]
    baseline = summarise([f for o in measured for f in o]) if measured else summary_row(before)
    for row in rows:
        if row["default"]:
            row.update({k: v for k, v in baseline.items() if k not in row})
        if row.get("runs") and baseline.get("runs"):
            row["relative_frames_per_s"] = round(row["frames_per_s"] / baseline["frames_per_s"], 3)
    return {"scenario": scenario.name, "analyses": analyses, "frames": scenario.frames,
            "frame_shape": list(scenario.frame_shape), "dtype": scenario.dtype,
            "automatic_frame_stack_size": automatic_frame_stack_size(scenario),
            "automatic_num_slots": automatic_layout(scenario).num_slots,
            "default_before": summary_row(before), "default_after": summary_row(after), "baseline": baseline,
            "rows": rows}


def print_table(result: dict[str, Any]) -> None:
    before, after = result["default_before"], result["default_after"]
    print(f"\n{result['scenario']} ({result['frames']:,} frames {result['frame_shape'][1]}x{result['frame_shape'][0]} "
          f"{result['dtype']}), {result['analyses']}; automatic frame_stack_size {result['automatic_frame_stack_size']}, "
          f"num_slots {result['automatic_num_slots']}")
    if before.get("runs") and after.get("runs"):
        drift = after["frames_per_s"] / before["frames_per_s"] - 1
        print(f"defaults measured first / last: {before['frames_per_s']:,.0f} / {after['frames_per_s']:,.0f} frames/s "
              f"(drift {drift:+.0%}: differences smaller than that are noise)")
    realtime = any("realtime_limit_hz" in r or "realtime_error" in r for r in result["rows"])
    header = (f"{'parameter':21s} {'value':22s} {'frames/s':>9s} {'rel':>5s} {'MB/s':>6s} {'latency ms':>10s} "
              f"{'peak MB':>8s} {'CPU s sim/recv/workers/main':>28s} {'RT Hz' if realtime else '':>8s} correct")
    print(header)
    print("-" * len(header))
    for r in result["rows"]:
        name = r["parameter"]
        label = r["label"] + (" *" if r["default"] else "")
        rt = (f"{r['realtime_limit_hz']:7,.0f}{'!' if r.get('realtime_series_fits_in_slots') else ' '}"
              if "realtime_limit_hz" in r else f"{'failed':>8s}" if "realtime_error" in r else " " * 8)
        if not r.get("runs"):
            print(f"{name:21s} {label:22s} {'-':>9s} {'-':>5s} {'-':>6s} {'-':>10s} {'-':>8s} {'':28s} {rt} "
                  f"FAILED ({'; '.join(r['problems'])[:100]})")
            continue
        cpu = "/".join(f"{r['cpu_s'].get(k, float('nan')):.2f}" for k in ("simulator", "receiver", "workers", "main"))
        rel = f"{r['relative_frames_per_s']:.2f}" if "relative_frames_per_s" in r else "-"
        verdict = "yes" if r["correct"] else "NO (" + "; ".join(r["problems"])[:100] + ")"
        print(f"{name:21s} {label:22s} {r['frames_per_s']:9,.0f} {rel:>5s} {r['mb_per_s']:6,.0f} "
              f"{r['latency_ms']:10.1f} {r['peak_mb']:8,.0f} {cpu:>28s} {rt} {verdict}")
    print("(* default; rel: frames/s over the defaults' median"
          + ("; RT Hz: real-time limit, ! = the whole series fits in the slots, so it is no real-time test)"
             if realtime else ")"))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenarios", nargs="+", default=["arina96", "quadro512"],
                        choices=[s.name for s in SCENARIOS])
    parser.add_argument("--analyses", nargs="+", default=["sum+sumsig"], choices=list(ANALYSIS_SETS))
    parser.add_argument("--parameters", nargs="+", default=list(PARAMETERS), choices=PARAMETERS,
                        help="the parameters to vary (default: all)")
    parser.add_argument("--quick", action="store_true", help="1/8 of the frames per scenario")
    parser.add_argument("--runs", type=int, default=3, help="measured series per setting (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="unreported series per setting first")
    parser.add_argument("--realtime", action="store_true",
                        help="also bisect the real-time limit (highest paced rate with zero missing frames) "
                             "for each num_slots value: about 8 more series per value")
    parser.add_argument("--output", type=Path, default=None,
                        help="JSON record (default benchmarks/results/sweep-<date>[-quick].json)")
    args = parser.parse_args()
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    if args.warmup < 0:
        parser.error("--warmup must be 0 or more")

    suffix = "-quick" if args.quick else ""
    started = time.time()
    load_before = os.getloadavg()
    results = []
    for name in args.scenarios:
        scenario = scenario_by_name(name + suffix)
        for analyses in args.analyses:
            results.append(sweep_scenario(scenario, analyses, tuple(args.parameters), args.runs, args.warmup,
                                          args.realtime))
    for result in results:
        print_table(result)

    record = {
        **record_header(load_before),
        "depth": "pipeline", "runs": args.runs, "warmup": args.warmup, "defaults": DEFAULTS,
        "duration_s": round(time.time() - started, 1),
        "scenarios": results,
    }
    output = args.output or RESULTS / f"sweep-{datetime.date.today().isoformat()}{suffix}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(record, indent=1, default=json_default) + "\n")
    print(f"\nwritten {output}")
    every_row = [r for result in results for r in result["rows"]]
    if not all(r.get("correct") for r in every_row):
        sys.exit(1)


if __name__ == "__main__":
    main()
