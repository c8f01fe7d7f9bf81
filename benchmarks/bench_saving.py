"""Saving throughput: this machine's sequential disk write speed, then the writer process's on
QUADRO-like (512x512) and ARINA-like (96x96) uint16 bslz4 frames, as a fraction of it.

1. Disk: ``--disk-mib`` MiB written in 8 MiB blocks to a file in the target directory, then
   fsync'ed; MB/s of the whole (what the page cache cannot hide).
2. Writer: frames of the simulator's generator (``sim/data.py``: a bright-field disk, a halo and
   Poisson noise, so they compress as real 4D-STEM frames do), bslz4-encoded as a DCU does, laid in
   frame stacks in shared memory of the receiver's default sizes (``FrameStackLayout.for_frames``),
   handed to a :class:`SeriesWriterProcess` as fast as it gives the slots back, until about
   ``--mib`` MiB of compressed frames are written. The time runs from ``open_series`` to the
   file closed, then fsync'ed (as the disk figure is), so it includes creating and closing the
   file. Slots are refilled by rewriting their frame numbers only: the producer costs next to nothing.
   Printed: frames/s, MB/s of compressed frames, the fraction of the disk speed, and how many
   stacks were waiting for the writer at most (all slots waiting = the writer is the bottleneck).
3. ``--writers 1 2``: each case with 1, then 2 writer processes (part files joined by a virtual
   dataset, docs/saving.md); the CPU time each writer process used, per frame it wrote, is printed
   too (from psutil).

    .venv/bin/python benchmarks/bench_saving.py [--target DIR] [--disk-mib 1024] [--mib 1024] [--writers 1 2]
                                                [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sim.data import ScanDataGenerator  # noqa: E402
from tango_dectris_live.receiver.framestack import FRAME_RECORD_DTYPE, FrameStackLayout  # noqa: E402
from tango_dectris_live.saving import SeriesFileSpec, SeriesWriterProcess  # noqa: E402
from tango_dectris_live.saving.testing import BlobStacks  # noqa: E402
from tango_dectris_live.testing.stream_producer import compress  # noqa: E402

CASES = {"QUADRO 512x512": (512, 512), "ARINA 96x96": (96, 96)}


def disk_speed(target: Path, mib: int) -> float:
    """MB/s of writing ``mib`` MiB sequentially, fsync included."""
    block = np.random.default_rng(0).integers(0, 255, 8 << 20, dtype=np.uint8).tobytes()
    path = target / "bench_saving_disk.tmp"
    started = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for _ in range(max(1, mib // 8)):
            os.write(fd, block)
        os.fsync(fd)
    finally:
        os.close(fd)
    seconds = time.perf_counter() - started
    size = path.stat().st_size
    path.unlink()
    return size / seconds / 1e6


def writer_speed(target: Path, shape: tuple[int, int], mib: int, writers: int = 1) -> dict:
    """``writers`` writer processes on ``shape`` frames: frames/s, MB/s, the largest backlog, CPU
    microseconds per frame of each writer process."""
    generator = ScanDataGenerator(shape[1], shape[0], "uint16", nav_shape=(64, 64), pool_size=64)
    blobs = [compress(generator.pool_frame(p), "bslz4") for p in range(generator.pool_size)]
    layout = FrameStackLayout.for_frames(shape, "uint16")
    per_stack = layout.frame_stack_size
    mean_blob = float(np.mean([len(b) for b in blobs]))
    stacks_needed = max(layout.num_slots, round(mib * (1 << 20) / (mean_blob * per_stack)))
    total_frames = stacks_needed * per_stack
    free = threading.Condition()
    free_slots: list = []

    with BlobStacks(layout.num_slots, per_stack, layout.bytes_per_frame) as stacks:
        handles = [stacks.stack([blobs[(s * per_stack + i) % len(blobs)] for i in range(per_stack)],
                                list(range(s * per_stack, (s + 1) * per_stack)), shape=shape, dtype="uint16",
                                encoding="bslz4") for s in range(layout.num_slots)]

        def stack_done(handle) -> None:
            with free:
                free_slots.append(handle)
                free.notify()

        path = target / f"bench_saving_{shape[0]}x{shape[1]}.h5"
        with SeriesWriterProcess(on_stack_done=stack_done, writers=writers) as writer:
            spec = SeriesFileSpec(series_id=1, frame_shape=shape, dtype="uint16", encoding="bslz4",
                                  n_frames=total_frames)
            # a first, short series: the writer processes have imported h5py and opened files once
            warm_up = target / "bench_saving_warm_up.h5"
            writer.open_series(warm_up, replace(spec, n_frames=layout.num_slots * per_stack))
            for handle in handles:
                writer.write_stack(handle)
            writer.close_series("warm-up")
            writer.wait_series_saved(600)
            writer.wait_stacks_done(600)
            with free:
                free_slots.clear()  # the same slots again, below
            for written in target.glob(f"{warm_up.stem}*.h5"):
                written.unlink()
            processes = [psutil.Process(pid) for pid in writer.pids]
            cpu_before = [sum(p.cpu_times()[:2]) for p in processes]
            started = time.perf_counter()
            writer.open_series(path, spec)
            for handle in handles:
                writer.write_stack(handle)
            for s in range(layout.num_slots, stacks_needed):
                with free:
                    free.wait_for(lambda: free_slots)
                    handle = free_slots.pop()
                records = np.frombuffer(stacks.stacks.buffer, FRAME_RECORD_DTYPE, count=per_stack,
                                        offset=handle.slot * layout.slot_bytes)
                records["frame"] = np.arange(s * per_stack, (s + 1) * per_stack)
                del records
                writer.write_stack(replace(handle, first_frame=s * per_stack, last_frame=(s + 1) * per_stack - 1))
            writer.close_series("complete")
            saved = writer.wait_series_saved(3600)
            for written in target.glob(f"{path.stem}*.h5"):  # the series file and its part files
                fd = os.open(written, os.O_RDONLY)
                os.fsync(fd)
                os.close(fd)
            seconds = time.perf_counter() - started
            cpu = [sum(p.cpu_times()[:2]) - before for p, before in zip(processes, cpu_before)]
            status = writer.status()
        for written in target.glob(f"{path.stem}*.h5"):  # the series file and its part files
            written.unlink()
    if saved.frames_saved != total_frames:
        raise RuntimeError(f"{saved.frames_saved} of {total_frames} frames saved: {saved}")
    return {"frames": total_frames, "frame_stack_size": per_stack, "num_slots": layout.num_slots,
            "mean_blob_bytes": round(mean_blob), "compression_ratio": round(shape[0] * shape[1] * 2 / mean_blob, 2),
            "seconds": round(seconds, 3), "frames_per_s": round(total_frames / seconds),
            "megabytes_per_s": round(saved.bytes_written / seconds / 1e6, 1),
            "max_backlog": status.max_backlog, "backlogged_stacks": status.backlogged_stacks,
            "stacks": stacks_needed, "writers": writers, "writer_cpu_s": [round(c, 3) for c in cpu],
            "writer_cpu_us_per_frame": round(sum(cpu) / total_frames * 1e6, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", type=Path, default=None, help="directory to write to (default: a temporary one)")
    parser.add_argument("--disk-mib", type=int, default=1024, help="MiB written to measure the disk")
    parser.add_argument("--mib", type=int, default=1024, help="MiB of compressed frames per case")
    parser.add_argument("--writers", type=int, nargs="+", default=[1],
                        help="writer processes per series; several values: each case with each")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES), help="default: all")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.target) as folder:
        target = Path(folder)
        disk = disk_speed(target, args.disk_mib)
        print(f"disk: {disk:,.0f} MB/s sequential write with fsync ({args.disk_mib} MiB to {target})")
        figures = {"target": str(target), "disk_megabytes_per_s": round(disk, 1), "cases": {}}
        for name in args.cases:
            for writers in args.writers:
                result = writer_speed(target, CASES[name], args.mib, writers)
                result["fraction_of_disk"] = round(result["megabytes_per_s"] / disk, 2)
                figures["cases"][f"{name}, {writers} writer(s)"] = result
                print(f"{name}, {writers} writer(s): {result['frames_per_s']:,} frames/s, "
                      f"{result['megabytes_per_s']:,.0f} MB/s ({result['fraction_of_disk']:.0%} of the disk), "
                      f"{result['frames']:,} frames of {result['mean_blob_bytes']:,} B (ratio "
                      f"{result['compression_ratio']}), stacks of {result['frame_stack_size']} in "
                      f"{result['num_slots']} slots, at most {result['max_backlog']} waiting, {result['seconds']} s; "
                      f"writer CPU {result['writer_cpu_us_per_frame']} us/frame "
                      f"({', '.join(f'{c:.2f}' for c in result['writer_cpu_s'])} s)")
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
