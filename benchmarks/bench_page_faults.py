"""Page faults and CPU seconds per series of the receiving process and of each worker, at
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
from benchmarks.scenarios import cpu_seconds, minor_faults, scenario_by_name, worker_pids  # noqa: E402


def counters(pid: int) -> dict[str, tuple[int, float]]:
    """{thread id: (minor page faults, CPU seconds)} of the threads process ``pid`` has now."""
    return {tid: (minor_faults(pid, tid), cpu_seconds(pid, tid)) for tid in os.listdir(f"/proc/{pid}/task")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", default="arina96")
    parser.add_argument("--analyses", default="sum+sumsig")
    parser.add_argument("--runs", type=int, default=4)
    args = parser.parse_args()
    with PipelineBench(scenario_by_name(args.scenario), args.analyses) as bench:
        bench.run_once()  # warm-up
        workers = worker_pids(exclude={bench.sim.pid})
        before = {pid: counters(pid) for pid in (os.getpid(), *workers)}
        rates = [bench.run_once().frames_per_s for _ in range(args.runs)]
        after = {pid: counters(pid) for pid in before}
    setting = os.environ.get("TANGO_DECTRIS_LIVE_MALLOC", "tuned")
    print(f"{args.scenario} {args.analyses}, allocator {setting}, per series (mean of {args.runs}):")
    for name, pid in [("receiving process", os.getpid())] + [(f"worker {i}", p) for i, p in enumerate(workers)]:
        faults = sum(n - before[pid].get(tid, (0, 0.0))[0] for tid, (n, _) in after[pid].items())
        cpu = sum(c - before[pid].get(tid, (0, 0.0))[1] for tid, (_, c) in after[pid].items())
        print(f"  {name}: {faults // args.runs:,} page faults, {cpu / args.runs:.3f} CPU s")
    print("  frames/s: " + ", ".join(f"{r:,.0f}" for r in rates))


if __name__ == "__main__":
    main()
