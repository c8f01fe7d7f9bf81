"""Receiver throughput: receive only, and receive + decode in 1 or 2 worker processes.

A producer process PUSHes a pool of pre-encoded frames as fast as it can; the receiver takes them
into shared-memory stacks; workers (spawned processes) decode each stack by segment name.

    .venv/bin/python benchmarks/bench_receiver.py [--frames N] [--version 1|2] [--sizes 96 192 512]
"""
from __future__ import annotations

import argparse
import multiprocessing
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


def decode_worker(tasks, done) -> None:
    buffers: dict[tuple, np.ndarray] = {}
    while True:
        handle = tasks.get()
        if handle is None:
            return
        key = (handle.frames, *handle.shape)
        out = buffers.get(key)
        if out is None:
            out = buffers[key] = np.empty(key, np.uint16)
        decode_frames_into(handle, 0, handle.frames, out)
        done.put(handle.slot)


def run(version: int, size: int, frames: int, workers: int) -> tuple[float, float, int]:
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
    with StreamReceiver(endpoint, stream_version=version, frame_shape=(size, size), num_slots=32,
                        receive_hwm=10000, timeout=30) as receiver:
        receiver.arm(series)
        go.set()
        handles = {}
        started = None
        summary = None
        outstanding = 0
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
                    slot = done.get_nowait()
                except queue.Empty:
                    break
                receiver.release(handles.pop(slot))
                outstanding -= 1
        end = time.perf_counter()
        stats = receiver.stats()
    for _ in pool:
        tasks.put(None)
    for worker in pool + [producer]:
        worker.join(30)
    elapsed = end - (started or end)
    return frames / elapsed, stats.bytes_received / elapsed / 1e6, summary.missing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=100_000)
    parser.add_argument("--version", type=int, default=2, choices=(1, 2))
    parser.add_argument("--sizes", type=int, nargs="+", default=[96, 192, 512])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    print(f"stream v{args.version}, uint16 bslz4, {args.frames} frames per run")
    for size in args.sizes:
        frames = args.frames if size < 512 else max(1000, args.frames // 10)
        for workers in args.workers:
            rate, mbps, missing = run(args.version, size, frames, workers)
            what = "receive only" if workers == 0 else f"receive + decode, {workers} worker(s)"
            print(f"{size:4d}x{size:<4d} {what:34s} {rate:10.0f} frames/s {mbps:8.1f} MB/s  missing {missing}")


if __name__ == "__main__":
    main()
