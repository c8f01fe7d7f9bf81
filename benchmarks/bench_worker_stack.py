"""A worker's CPU per frame on one frame stack, in this process: where a worker's time goes.

The stack is what the receiver hands a worker in the pipeline: the simulator's own frames (its data
generator, the benchmark scenario's size and type), compressed as a DCU sends them (bslz4), laid out
in a shared-memory frame-stack slot as the receiver lays them out, as many frames as the receiver
puts in one stack by default. Paths, each run over the whole stack, all single-threaded:

* ``worker``: ``runner._process_stack`` with the series' spec as the runner builds it for the
  receiver's frame source: exactly what a worker does with a stack, less the queues. For the
  built-in sums alone that is the fused path (``processing/stack_sums.py``), otherwise LiberTEM.
* ``libertem``: the same with the fused path switched off (sum+sumsig only): LiberTEM's
  UDFPartRunner, the tile source and the UDFs, as before the fused path.
* ``decode``: ``decode_frames_into`` a tile at a time into one reused tile buffer (the tile depth
  the runner chooses for these UDFs): the decoding the ``libertem`` path contains.
* ``kernels``: the UDFs' compiled per-tile steps (``_pixel_sums``) on tiles decoded once
  beforehand (sum and sumsig only): the summing the ``libertem`` path contains.

``libertem`` minus ``decode`` minus ``kernels`` is what the rest costs there (LiberTEM's per-tile
and per-partition steps, result buffers, the tile source). Rates are CPU time of this process
(``time.process_time``), each path run for at least --seconds, --repeat times in turn; the best
run is reported, since the machine is shared and a slower run only measures the neighbours.

    .venv/bin/python benchmarks/bench_worker_stack.py [--scenarios quadro512 arina96]
        [--analyses sum+sumsig] [--seconds 0.5] [--repeat 5] [--json PATH]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_decode import bslz4_stack  # noqa: E402
from benchmarks.scenarios import ANALYSIS_SETS, scenario_by_name  # noqa: E402
from sim.data import ScanDataGenerator  # noqa: E402
from tango_dectris_live.processing import _pixel_sums, runner  # noqa: E402
from tango_dectris_live.processing.analyses import AnalysisParameters, AnalysisRegistry  # noqa: E402
from tango_dectris_live.processing.live_dataset import ReceiverFrameSource  # noqa: E402
from tango_dectris_live.processing.libertem_internals import (single_thread_environment,  # noqa: E402
                                                              udf_constructor_kwargs, udf_input_dtype)
from tango_dectris_live.receiver import FrameStackLayout  # noqa: E402
from tango_dectris_live.receiver.decode import decode_frames_into  # noqa: E402
from tango_dectris_live.testing.stream_producer import compress  # noqa: E402


def series_spec(names: tuple[str, ...], scan_shape: tuple[int, int], frame_shape: tuple[int, int],
                dtype: str) -> runner._SeriesSpec:
    """The spec a worker gets for these analyses, built as ``SeriesRun._set_up`` builds it."""
    raw = np.dtype(dtype)
    udfs = [s.udf for s in AnalysisRegistry.discover().build(list(names), AnalysisParameters(), frame_shape)]
    groups: dict[str, list[int]] = {}
    for i, udf in enumerate(udfs):
        groups.setdefault(udf_input_dtype(udf, raw).str, []).append(i)
    frame_bytes = int(np.prod(frame_shape)) * max(np.dtype(d).itemsize for d in groups)
    return runner._SeriesSpec(
        run_id=1, udf_classes=[type(u) for u in udfs], udf_kwargs=[udf_constructor_kwargs(u) for u in udfs],
        scan_shape=scan_shape, frame_shape=frame_shape, raw_dtype=raw.str, dtype_groups=list(groups.items()),
        tile_depth=max(1, runner.tile_bytes(udfs) // frame_bytes), decode_frames_into=decode_frames_into,
        frames_per_partition=1 << 30, fused_sums=runner._fused_sums(udfs, ReceiverFrameSource))


def cpu_rate(work: Callable[[], None], frames: int, seconds: float) -> float:
    """CPU microseconds per frame of calling ``work`` (``frames`` each) for >= ``seconds``."""
    calls = 0
    started = time.process_time()
    while True:
        work()
        calls += 1
        elapsed = time.process_time() - started
        if elapsed >= seconds:
            return elapsed / (calls * frames) * 1e6


def measure(scenario_name: str, analyses: str, seconds: float, repeat: int) -> dict:
    scenario = scenario_by_name(scenario_name)
    shape, dtype = scenario.frame_shape, scenario.dtype
    stack_size = FrameStackLayout.for_frames(shape, dtype).frame_stack_size
    generator = ScanDataGenerator(shape[1], shape[0], dtype, nav_shape=scenario.nav_shape)
    blobs = [compress(generator.frame(n), "bslz4") for n in range(stack_size)]
    spec = series_spec(ANALYSIS_SETS[analyses], scenario.nav_shape, shape, dtype)
    env = single_thread_environment()
    tile = np.empty((spec.tile_depth, *shape), dtype)
    sums = analyses == "sum+sumsig"
    counts = np.zeros(int(np.prod(shape)), np.uint32)
    totals = np.zeros(stack_size)
    decoded = np.empty((stack_size, *shape), dtype)
    with bslz4_stack(blobs, shape, dtype) as handle, env.enter():
        decode_frames_into(handle, 0, stack_size, decoded)
        expected = decoded.reshape(stack_size, -1)

        without_fused = dataclasses.replace(spec, fused_sums=None)

        def worker() -> None:
            runner._process_stack(spec, handle, env)

        def libertem() -> None:
            runner._process_stack(without_fused, handle, env)

        def decode() -> None:
            for start in range(0, stack_size, spec.tile_depth):
                stop = min(stack_size, start + spec.tile_depth)
                decode_frames_into(handle, start, stop, tile[:stop - start])

        def kernels() -> None:
            for start in range(0, stack_size, spec.tile_depth):
                pixels = expected[start:start + spec.tile_depth]
                _pixel_sums.add_frames(pixels, counts)
                _pixel_sums.add_frame_totals(pixels, totals[start:start + pixels.shape[0]])

        paths = {"worker": worker, **({"libertem": libertem} if sums else {}), "decode": decode,
                 **({"kernels": kernels} if sums else {})}
        if sums:  # both paths' partial results are the exact sums of the stack
            for checked in (spec, without_fused):
                buffers = runner._process_stack(checked, handle, env)[0][0].buffers
                np.testing.assert_array_equal(buffers[0]["counts"].reshape(-1), expected.sum(0, dtype=np.uint64))
                np.testing.assert_array_equal(buffers[1]["intensity"], expected.sum(1, dtype=np.uint64))
        rates: dict[str, list[float]] = {path: [] for path in paths}
        for _ in range(repeat):
            for path, work in paths.items():
                rates[path].append(cpu_rate(work, stack_size, seconds))
    best = {path: min(values) for path, values in rates.items()}
    compressed = sum(map(len, blobs)) / stack_size
    return {"scenario": scenario_name, "analyses": analyses, "stack_frames": stack_size, "tile_depth": spec.tile_depth,
            "compressed_bytes_per_frame": compressed, "us_per_frame": best, "all_us_per_frame": rates}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenarios", nargs="+", default=["quadro512", "arina96"])
    parser.add_argument("--analyses", default="sum+sumsig", choices=sorted(ANALYSIS_SETS))
    parser.add_argument("--seconds", type=float, default=0.5)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    records = []
    for name in args.scenarios:
        record = measure(name, args.analyses, args.seconds, args.repeat)
        records.append(record)
        figures = "  ".join(f"{path} {value:7.2f}" for path, value in record["us_per_frame"].items())
        print(f"{name:12s} {args.analyses:12s} stack {record['stack_frames']:5d} tile {record['tile_depth']:4d} "
              f"{record['compressed_bytes_per_frame'] / 1024:7.1f} KiB/frame  "
              f"us/frame (best of {args.repeat}): {figures}")
    if args.json is not None:
        args.json.write_text(json.dumps(records, indent=1))


if __name__ == "__main__":
    main()
