"""Page faults and CPU seconds per series, per thread of the receiving process and per worker, at
depth 1 (bench_pipeline's PipelineBench): what the allocator thresholds (allocator.py) are for.

    .venv/bin/python benchmarks/bench_page_faults.py --scenario arina96
    TANGO_DECTRIS_LIVE_MALLOC=default .venv/bin/python benchmarks/bench_page_faults.py --scenario arina96
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_pipeline import PipelineBench  # noqa: E402
from benchmarks.scenarios import scenario_by_name, worker_pids  # noqa: E402


def per_thread(pid: int) -> dict[str, tuple[int, float]]:
    """{thread id: (minor page faults, CPU seconds)} of process ``pid`` (/proc/<pid>/task/*/stat)."""
    ticks = os.sysconf("SC_CLK_TCK")
    threads = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        threads[tid] = (int(fields[7]), (int(fields[11]) + int(fields[12])) / ticks)
    return threads


def difference(after: dict, before: dict) -> tuple[int, float]:
    faults = sum(a[0] - before.get(t, (0, 0.0))[0] for t, a in after.items())
    cpu = sum(a[1] - before.get(t, (0, 0.0))[1] for t, a in after.items())
    return faults, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", default="arina96")
    parser.add_argument("--analyses", default="sum+sumsig")
    parser.add_argument("--runs", type=int, default=4)
    args = parser.parse_args()
    with PipelineBench(scenario_by_name(args.scenario), args.analyses) as bench:
        bench.run_once()  # warm-up
        workers = worker_pids(exclude={bench.sim.pid})
        before = {pid: per_thread(pid) for pid in (os.getpid(), *workers)}
        rates = [bench.run_once().frames_per_s for _ in range(args.runs)]
        after = {pid: per_thread(pid) for pid in before}
    setting = os.environ.get("TANGO_DECTRIS_LIVE_MALLOC", "tuned")
    faults, cpu = difference(after[os.getpid()], before[os.getpid()])
    print(f"{args.scenario} {args.analyses}, allocator {setting}, per series (mean of {args.runs}):")
    print(f"  receiving process: {faults // args.runs:,} page faults, {cpu / args.runs:.3f} CPU s")
    for i, pid in enumerate(workers):
        faults, cpu = difference(after[pid], before[pid])
        print(f"  worker {i}: {faults // args.runs:,} page faults, {cpu / args.runs:.3f} CPU s")
    print("  frames/s: " + ", ".join(f"{r:,.0f}" for r in rates))


if __name__ == "__main__":
    main()
