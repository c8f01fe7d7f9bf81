"""Depth 3: the same scenario processed by LiberTEM-live, for the side-by-side ratio.

LiberTEM-live keeps its own DECTRIS connection to the simulator (REST for the detector
configuration, stream v1 with ``header_detail: basic``, its Rust receiver into shared memory) and
runs the UDFs with a PipelinedExecutor of ``--workers`` processes. It is used in passive mode:
this script arms and triggers over REST exactly as for our pipeline, LiberTEM-live picks the series
up with ``wait_for_acquisition``. The UDFs are LiberTEM's: SumUDF and SumSigUDF (float32, as a
LiberTEM-live user runs them), and for bf/adf/com LiberTEM's own ApplyMasksUDF/CoMUDF with the
masks and parameters our analyses registry sets up (not our compiled subclasses of them); the
results are checked against the same ground truth as ours.

    .venv/bin/python benchmarks/bench_libertem_live.py --scenario quadro512-quick --analyses sum+sumsig
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.scenarios import (  # noqa: E402
    ClosingBench, add_run_arguments, measure_series,
    FLOAT32_SUM_RTOL, RunFigures, Scenario, SimulatorControl, SimulatorProcess, TriggerThread, analyses_by_name, check_results,
    cpu_seconds, figures_from_timing, ground_truth, peak_rss_mb, reset_peak_rss, scenario_by_name, worker_pids)
from benchmarks.bench_pipeline import print_figures, json_default  # noqa: E402

DEPTH = "libertem-live"
ARM_TIMEOUT_S = 30.0


def default_tuning(scenario: Scenario) -> dict[str, int]:
    """LiberTEM-live's tunables for a scenario, following its DECTRIS tuning advice: bigger stacks
    for small frames, bytes_per_frame near the compressed size, partitions big enough to amortise
    the per-partition cost but at least ~8 of them so both workers get work."""
    small = scenario.frame_bytes <= 96 * 96 * 2 * 4
    return {
        "frame_stack_size": 128 if small else 24,
        "bytes_per_frame": max(512, scenario.frame_bytes // 4),
        "frames_per_partition": int(min(8192 if small else 256, max(16, scenario.frames // 8))),
        "buffer_size_mib": 2048,
    }


# What a LiberTEM-live user runs for these analyses: LiberTEM's own sum UDFs (float32); for bf,
# adf and com LiberTEM's ApplyMasksUDF/CoMUDF, built with the arguments our registry gives our
# compiled subclasses of them (same masks, same beam centre).
LIBERTEM_SUM_UDFS = {"sum": ("SumUDF", "sum_image"), "sumsig": ("SumSigUDF", "sumsig_image")}


def libertem_udfs(analyses: tuple[str, ...], frame_shape: tuple[int, int]) -> list[tuple[Any, Any]]:
    """(UDF, results extractor) per analysis, as a LiberTEM-live user would set them up."""
    from libertem.udf.sum import SumUDF
    from libertem.udf.sumsigudf import SumSigUDF

    from tango_dectris_live.processing.analyses import AnalysisParameters, AnalysisRegistry

    classes = {"SumUDF": SumUDF, "SumSigUDF": SumSigUDF}
    registry = AnalysisRegistry.discover()
    udfs = []
    for name in analyses:
        if name in LIBERTEM_SUM_UDFS:
            class_name, public = LIBERTEM_SUM_UDFS[name]
            udfs.append((classes[class_name](), lambda buffers, public=public: {public: buffers["intensity"]}))
        else:
            (selected,) = registry.build([name], AnalysisParameters(), frame_shape)
            udfs.append((libertem_base(selected.udf), selected.extract_results))
    return udfs


def libertem_base(udf: Any) -> Any:
    """The UDF as LiberTEM's own class (the first one of LiberTEM in its MRO) with its arguments."""
    for cls in type(udf).__mro__:
        if cls.__module__.startswith("libertem."):
            return cls(**udf._kwargs)
    raise TypeError(f"{type(udf).__name__} is not derived from a LiberTEM UDF")


class LiberTEMLiveBench(ClosingBench):
    """One simulator + one LiberTEM-live context and connection, measured over several series."""

    def __init__(self, scenario: Scenario, analyses: str, *, workers: int = 2, pin_workers: bool = False,
                 tuning: dict[str, int] | None = None) -> None:
        from libertem.executor.pipelined import PipelinedExecutor
        from libertem_live.api import LiveContext

        self.scenario = scenario
        self.analyses_name = analyses
        self.tuning = {**default_tuning(scenario), **(tuning or {})}
        self.settings = {"workers": workers, "pin_workers": pin_workers, **self.tuning}
        self._analyses = analyses_by_name(analyses)
        self.sim = SimulatorProcess(scenario.model)
        try:
            self.control = SimulatorControl(self.sim.rest_url)
            # LiberTEM-live's receiver supports stream v1 with header_detail basic only
            self.control.prepare(scenario, stream_format="legacy", header_detail="basic")
            self.truth = ground_truth(scenario, self._analyses, self.control.sim_config())
            executor = PipelinedExecutor(spec=PipelinedExecutor.make_spec(cpus=range(workers), cudas=[]),
                                         pin_workers=pin_workers)
            self.ctx = LiveContext(executor=executor)
            self.conn = self.ctx.make_connection("dectris").open(
                api_host="127.0.0.1", api_port=self.sim.rest_port, data_host="127.0.0.1",
                data_port=self.sim.stream_port, buffer_size=self.tuning["buffer_size_mib"],
                bytes_per_frame=self.tuning["bytes_per_frame"], frame_stack_size=self.tuning["frame_stack_size"],
                huge_pages=False)
        except BaseException:
            self.sim.close()
            raise
        # the first call switches the connection to passive mode; nothing is armed yet
        if self.conn.wait_for_acquisition(timeout=0.01) is not None:
            raise RuntimeError("LiberTEM-live saw an acquisition before anything was armed")

    def close(self) -> None:
        try:
            self.conn.close()
            self.ctx.close()
            self.control.close()
        finally:
            self.sim.close()

    def _cpu(self, workers: list[int]) -> dict[str, float]:
        # LiberTEM-live's receiver is a Rust thread of this process: counted with "main"
        return {"simulator": cpu_seconds(self.sim.pid), "workers": sum(cpu_seconds(pid) for pid in workers),
                "main+receiver": cpu_seconds(os.getpid())}

    def run_once(self) -> RunFigures:
        udfs = libertem_udfs(self._analyses, self.scenario.frame_shape)
        self.control.arm()
        pending = self.conn.wait_for_acquisition(timeout=ARM_TIMEOUT_S)
        if pending is None:
            raise RuntimeError(f"LiberTEM-live did not see the series start within {ARM_TIMEOUT_S} s")
        aq = self.ctx.make_acquisition(conn=self.conn, nav_shape=self.scenario.nav_shape, pending_aq=pending,
                                       frames_per_partition=self.tuning["frames_per_partition"])
        workers = worker_pids(exclude={self.sim.pid})
        processes = [os.getpid(), self.sim.pid, *workers]
        for pid in processes:
            reset_peak_rss(pid)
        cpu_before = self._cpu(workers)
        trigger = TriggerThread(self.control).start()
        raw = self.ctx.run_udf(dataset=aq, udf=[udf for udf, _ in udfs])
        finished_at = time.perf_counter()
        trigger.join()
        cpu_after = self._cpu(workers)
        results: dict[str, np.ndarray] = {}
        for (_, extract), buffers in zip(udfs, raw):
            results.update(extract({name: np.asarray(buf.data) for name, buf in buffers.items()}))
        problems = check_results(results, self.truth, sum_rtol=FLOAT32_SUM_RTOL)
        return figures_from_timing(
            self.scenario, DEPTH, self.analyses_name, trigger, finished_at,
            {k: cpu_after[k] - cpu_before[k] for k in cpu_after},
            sum(peak_rss_mb(pid) for pid in processes), problems, {"settings": self.settings})


def measure(scenario: Scenario, analyses: str, runs: int = 3, warmup: int = 1, **settings: Any) -> list[RunFigures]:
    """``warmup`` unreported series, then ``runs`` measured ones."""
    return measure_series(lambda: LiberTEMLiveBench(scenario, analyses, **settings), runs, warmup)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_arguments(parser)
    parser.add_argument("--pin-workers", action="store_true", help="let the PipelinedExecutor pin its workers")
    parser.add_argument("--frame-stack-size", type=int, default=None)
    parser.add_argument("--bytes-per-frame", type=int, default=None)
    parser.add_argument("--frames-per-partition", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None, help="write the runs' figures here")
    args = parser.parse_args()
    tuning = {k: v for k, v in (("frame_stack_size", args.frame_stack_size),
                                ("bytes_per_frame", args.bytes_per_frame),
                                ("frames_per_partition", args.frames_per_partition)) if v is not None}
    figures = measure(scenario_by_name(args.scenario), args.analyses, args.runs, args.warmup,
                      workers=args.workers, pin_workers=args.pin_workers, tuning=tuning)
    print_figures(figures)
    if args.json is not None:
        args.json.write_text(json.dumps([f.as_dict() for f in figures], default=json_default))


if __name__ == "__main__":
    main()
