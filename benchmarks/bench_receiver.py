"""Receiver throughput: receive only, and receive + decode in 1 or 2 worker processes.

A producer process PUSHes a pool of pre-encoded frames as fast as it can (tests.stream_producer,
not the simulator: see "producer" below); the receiver takes them into shared-memory stacks;
workers (spawned processes) decode each stack by segment name with decode_frames_into, a tile of
about 1 MiB at a time into a reused buffer (as the live workers do: it stays in the CPU cache). Each case
runs --repeat times and the median is reported; "busy" is the share of the wall time the workers
spent inside decode_frames_into (near 100 %: decoding is the bottleneck).

    .venv/bin/python benchmarks/bench_receiver.py [--frames N] [--version 1|2] [--sizes 96 192 512]
        [--repeat 3] [--json results.json]
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import queue
import sys
import time
from pathlib import Path

import cbor2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tango_dectris_live.receiver import SeriesFinished, StackReady, StreamReceiver, decode_frames_into  # noqa: E402
from tests.stream_producer import StreamProducer, random_frames, v2_image  # noqa: E402

POOL = 64


def produce(version: int, size: int, frames: int, series: int, port_queue, go, received) -> None:
    pool = random_frames(POOL, (size, size), "uint16", seed=size)
    with StreamProducer(version, send_hwm=10000) as producer:
        if version == 1:
            images = [producer.image(series, 0, frame) for frame in pool]  # encode once
            firsts = [b'{"frame":%d,"hash":"","htype":"dimage-1.0","series":%d}\n' % (i, series)
                      for i in range(frames)]
            build = lambda i: [firsts[i]] + images[i % POOL][1:]  # noqa: E731
        else:
            templates = [_v2_template(series, frame) for frame in pool]
            build = lambda i: templates[i % POOL](i)  # noqa: E731
        port_queue.put(producer.endpoint)
        go.wait()
        producer.send(producer.header(series, nimages=frames, shape=(size, size)))
        socket = producer.socket
        for i in range(frames):
            socket.send_multipart(build(i), copy=False)
        producer.send(producer.end(series), timeout=60)
        received.wait(120)  # closing (linger 0) would discard what is still queued


def _v2_template(series: int, frame: np.ndarray):
    """image_id -> message: the id is spliced into a message encoded once (fixed 4-byte id)."""
    marker = 0x7FFFFFF0
    message = v2_image(series, marker, frame)[0]
    head = cbor2.dumps(marker)
    at = message.index(head)
    before, after = message[:at], message[at + len(head):]
    return lambda image_id: [before + b"\x1a" + image_id.to_bytes(4, "big") + after]


TILE_BYTES = 1 << 20  # decode a tile of about 1 MiB at a time, as the live workers do


def decode_worker(tasks, done) -> None:
    buffers: dict[tuple, np.ndarray] = {}
    done.put(None)  # imports done: the clock may start
    while True:
        handle = tasks.get()
        if handle is None:
            return
        depth = max(1, TILE_BYTES // (2 * handle.shape[0] * handle.shape[1]))
        key = (depth, *handle.shape)
        out = buffers.get(key)
        if out is None:
            out = buffers[key] = np.empty(key, np.uint16)
        started = time.perf_counter()
        for start in range(0, handle.frames, depth):
            stop = min(handle.frames, start + depth)
            decode_frames_into(handle, start, stop, out[:stop - start])
        done.put((handle.slot, time.perf_counter() - started))


def run(version: int, size: int, frames: int, workers: int) -> dict:
    """One case: frames/s, compressed and decoded MB/s, worker busy share, missing frames."""
    ctx = multiprocessing.get_context("spawn")
    port_queue, go, received = ctx.Queue(), ctx.Event(), ctx.Event()
    series = 1
    producer = ctx.Process(target=produce, args=(version, size, frames, series, port_queue, go, received))
    producer.start()
    endpoint = port_queue.get(timeout=60)
    tasks, done = ctx.Queue(), ctx.Queue()
    pool = [ctx.Process(target=decode_worker, args=(tasks, done)) for _ in range(workers)]
    for worker in pool:
        worker.start()
    for _ in pool:
        if done.get(timeout=60) is not None:
            raise RuntimeError("a decode worker reported before it was ready")
    with StreamReceiver(endpoint, stream_version=version, frame_shape=(size, size), num_slots=32,
                        receive_hwm=10000, timeout=30) as receiver:
        receiver.arm(series)
        go.set()
        handles = {}
        started = None
        summary = None
        outstanding = 0
        decode_seconds = 0.0
        while summary is None or outstanding:
            event = receiver.next_event(0.01)
            if isinstance(event, StackReady):
                started = started or time.perf_counter()
                if workers:
                    handles[event.handle.slot] = event.handle
                    tasks.put(event.handle)
                    outstanding += 1
                else:
                    receiver.release(event.handle)
            elif isinstance(event, SeriesFinished):
                summary = event.summary
                received.set()
            while outstanding:
                try:
                    slot, seconds = done.get_nowait()
                except queue.Empty:
                    break
                decode_seconds += seconds
                receiver.release(handles.pop(slot))
                outstanding -= 1
        end = time.perf_counter()
        stats = receiver.stats()
    for _ in pool:
        tasks.put(None)
    for worker in pool + [producer]:
        worker.join(30)
    elapsed = end - (started or end)
    return {"frames_per_s": frames / elapsed,
            "compressed_mb_per_s": stats.bytes_received / elapsed / 1e6,
            "decoded_mb_per_s": frames * size * size * 2 / elapsed / 1e6,
            "worker_busy": decode_seconds / (elapsed * workers) if workers else None,
            "missing": summary.missing}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=100_000)
    parser.add_argument("--version", type=int, default=2, choices=(1, 2))
    parser.add_argument("--sizes", type=int, nargs="+", default=[96, 192, 512])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--repeat", type=int, default=3, help="runs per case; the median is reported")
    parser.add_argument("--large-frames", type=int, default=None,
                        help="frames per run for 512x512 (default: --frames / 10, at least 1000)")
    parser.add_argument("--json", type=Path, default=None, help="write every run and the medians here")
    args = parser.parse_args()
    print(f"stream v{args.version}, uint16 bslz4, producer tests.stream_producer, median of {args.repeat} runs")
    print(f"{'size':9s} {'mode':22s} {'frames/s':>10s} {'MB/s compr.':>12s} {'MB/s decoded':>13s} "
          f"{'busy':>6s} {'missing':>8s}")
    results = []
    for size in args.sizes:
        frames = args.frames if size < 512 else (args.large_frames or max(1000, args.frames // 10))
        for workers in args.workers:
            runs = [run(args.version, size, frames, workers) for _ in range(args.repeat)]
            median = {key: statistics.median(r[key] for r in runs) if runs[0][key] is not None else None
                      for key in runs[0]}
            mode = "receive only" if workers == 0 else f"+decode {workers} worker{'s' * (workers > 1)}"
            busy = "" if median["worker_busy"] is None else f"{100 * median['worker_busy']:5.0f}%"
            print(f"{size:4d}x{size:<4d} {mode:22s} {median['frames_per_s']:10.0f} "
                  f"{median['compressed_mb_per_s']:12.1f} {median['decoded_mb_per_s']:13.1f} {busy:>6s} "
                  f"{max(r['missing'] for r in runs):8d}", flush=True)
            results.append({"size": size, "frames": frames, "workers": workers, "median": median, "runs": runs})
    if args.json is not None:
        args.json.write_text(json.dumps({"stream_version": args.version, "encoding": "bslz4", "dtype": "uint16",
                                         "producer": "tests.stream_producer", "results": results}, indent=2))


if __name__ == "__main__":
    main()
