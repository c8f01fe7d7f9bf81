"""Receiver throughput: receive only, and receive + decode in 1 or 2 worker processes.

The producer (``--producer``) PUSHes a series of uint16 bslz4 frames as fast as it can:

* ``sim`` (default): the simulator in its own process, sending through its compiled fast path
  (``sim._fastsend``, pacing "max", a pool of 64 frames encoded at arm): ARINA binned 96x96,
  ARINA 192x192, QUADRO 512x512 (the scenarios of :mod:`benchmarks.scenarios`), stream format
  legacy for v1, cbor for v2. Armed and triggered over SIMPLON REST, as the device does.
* ``python``: ``tango_dectris_live.testing.stream_producer`` driven by a Python ``send_multipart``
  loop (any size).
  For v1 (4 ZeroMQ parts per frame) that loop, not the receiver, is the bottleneck.

The receiver takes the frames into shared-memory stacks; workers (spawned processes) decode each
stack by segment name with decode_frames_into, a tile of about 1 MiB at a time into a reused buffer
(as the live workers do: it stays in the CPU cache). The clock runs from the trigger (sim) or the
go signal (python) to the end of series received and every stack decoded; start-up (simulator,
pool encoding at arm, worker spawn) is outside it. Each case runs --repeat times and the median is
reported; "busy" is the share of the wall time the workers spent inside decode_frames_into (near
100 %: decoding is the bottleneck).

    .venv/bin/python benchmarks/bench_receiver.py [--producer sim|python] [--frames N] [--version 1|2]
        [--sizes 96 192 512] [--repeat 3] [--json results.json]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import queue
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import cbor2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.scenarios import (  # noqa: E402
    SCENARIOS, ClosingBench, Scenario, SimulatorControl, SimulatorProcess, TriggerThread)
from sim.data import default_nav_shape  # noqa: E402
from tango_dectris_live.receiver import (  # noqa: E402
    SeriesFinished, SeriesSummary, StackReady, StreamReceiver, decode_frames_into)
from tango_dectris_live.testing.stream_producer import StreamProducer, random_frames, v2_image  # noqa: E402

POOL = 64
NUM_SLOTS = 32
RECEIVE_HWM = 10_000
RECEIVER_TIMEOUT_S = 30.0
PRODUCERS = {"sim": "simulator fast path (sim._fastsend)",
             "python": "tango_dectris_live.testing.stream_producer (Python loop)"}
# The simulator's scenario for each frame size (model, binning/ROI, uint16).
SIM_SCENARIOS = {"arina96": 96, "arina192": 192, "quadro512": 512}


# ---------------------------------------------------------------------------------------------
# Decode workers


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


class DecodeWorkers:
    """``count`` spawned decode processes, started and ready (imports done) before the clock runs."""

    def __init__(self, count: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.count = count
        self.tasks, self.done = ctx.Queue(), ctx.Queue()
        self.processes = [ctx.Process(target=decode_worker, args=(self.tasks, self.done)) for _ in range(count)]
        for process in self.processes:
            process.start()
        for _ in self.processes:
            if self.done.get(timeout=60) is not None:
                raise RuntimeError("a decode worker reported before it was ready")

    def close(self) -> None:
        for _ in self.processes:
            self.tasks.put(None)
        for process in self.processes:
            process.join(30)
            if process.is_alive():
                process.kill()
                process.join()

    def __enter__(self) -> DecodeWorkers:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


@dataclasses.dataclass
class SeriesTiming:
    """What :func:`consume_series` saw of one series."""

    summary: SeriesSummary
    first_stack_at: float
    first_stack_frames: int
    finished_at: float  # end of series received and every stack decoded
    decode_seconds: float


def consume_series(receiver: StreamReceiver, workers: DecodeWorkers | None, trigger: TriggerThread | None = None,
                   on_finished: Callable[[], None] | None = None) -> SeriesTiming:
    """Hand every stack of the armed series to the workers (or release it at once without
    workers) until the series ended and every stack is decoded."""
    handles = {}
    first_stack_at, first_stack_frames = None, 0
    summary = None
    outstanding = 0
    decode_seconds = 0.0
    while summary is None or outstanding:
        event = receiver.next_event(0.01)
        if isinstance(event, StackReady):
            if first_stack_at is None:
                first_stack_at, first_stack_frames = time.perf_counter(), event.handle.frames
            if workers is not None:
                handles[event.handle.slot] = event.handle
                workers.tasks.put(event.handle)
                outstanding += 1
            else:
                receiver.release(event.handle)
        elif isinstance(event, SeriesFinished):
            summary = event.summary
            if on_finished is not None:
                on_finished()
        elif event is None and trigger is not None and trigger.error is not None and summary is None:
            trigger.join()  # raises with the simulator's answer: no frames will come
        while outstanding:
            try:
                slot, seconds = workers.done.get_nowait()
            except queue.Empty:
                break
            decode_seconds += seconds
            receiver.release(handles.pop(slot))
            outstanding -= 1
    finished_at = time.perf_counter()
    return SeriesTiming(summary, first_stack_at or finished_at, first_stack_frames, finished_at, decode_seconds)


def figures(size: int, frames: int, workers: int, started_at: float, timing: SeriesTiming,
            bytes_received: int) -> dict:
    """frames/s, compressed and decoded MB/s, worker busy share, missing frames of one run."""
    elapsed = timing.finished_at - started_at
    after_first = timing.finished_at - timing.first_stack_at
    return {"frames_per_s": frames / elapsed,
            "compressed_mb_per_s": bytes_received / elapsed / 1e6,
            "decoded_mb_per_s": frames * size * size * 2 / elapsed / 1e6,
            "worker_busy": timing.decode_seconds / (elapsed * workers) if workers else None,
            "missing": timing.summary.missing,
            "elapsed_s": elapsed,
            # the rate once the first stack was handed over (no trigger/start-up latency in it)
            "frames_per_s_after_first_stack": ((frames - timing.first_stack_frames) / after_first
                                               if after_first > 0 else None),
            "end_reason": timing.summary.end_reason}


# ---------------------------------------------------------------------------------------------
# Producer "python": tango_dectris_live.testing.stream_producer in a spawned process


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


def run_python_producer(version: int, size: int, frames: int, workers: int) -> dict:
    """One case with a fresh Python producer process and receiver."""
    ctx = multiprocessing.get_context("spawn")
    port_queue, go, received = ctx.Queue(), ctx.Event(), ctx.Event()
    series = 1
    producer = ctx.Process(target=produce, args=(version, size, frames, series, port_queue, go, received))
    producer.start()
    try:
        endpoint = port_queue.get(timeout=60)
        with DecodeWorkers(workers) as pool, \
                StreamReceiver(endpoint, stream_version=version, frame_shape=(size, size), num_slots=NUM_SLOTS,
                               receive_hwm=RECEIVE_HWM, timeout=RECEIVER_TIMEOUT_S) as receiver:
            receiver.arm(series)
            started_at = time.perf_counter()
            go.set()
            timing = consume_series(receiver, pool if workers else None, on_finished=received.set)
            bytes_received = receiver.stats().bytes_received
    finally:
        received.set()
        producer.join(30)
        if producer.is_alive():
            producer.kill()
            producer.join()
    return figures(size, frames, workers, started_at, timing, bytes_received)


# ---------------------------------------------------------------------------------------------
# Producer "sim": the simulator's compiled fast path


def sim_scenario(size: int, frames: int) -> Scenario:
    """The simulator scenario whose frames are ``size`` x ``size`` uint16, with ``frames`` images."""
    for scenario in SCENARIOS:
        if scenario.name in SIM_SCENARIOS and SIM_SCENARIOS[scenario.name] == size:
            return dataclasses.replace(scenario, frames=frames, nav_shape=default_nav_shape(frames))
    raise ValueError(f"the simulator producer has no {size}x{size} uint16 detector; choose sizes from "
                     f"{sorted(SIM_SCENARIOS.values())} or use --producer python")


class SimulatorSeriesBench(ClosingBench):
    """One simulator process and one receiver for a frame size; each run arms and triggers one series."""

    def __init__(self, version: int, size: int, frames: int) -> None:
        self.version, self.size, self.frames = version, size, frames
        self.scenario = sim_scenario(size, frames)
        stream_format = "legacy" if version == 1 else "cbor"
        self.sim = SimulatorProcess(self.scenario.model)
        try:
            self.control = SimulatorControl(self.sim.rest_url)
            self.control.prepare(self.scenario, stream_format=stream_format, pool_size=POOL)
            # Connected before the simulator's arm, so that its header waits in ZeroMQ for receiver.arm.
            self.receiver = StreamReceiver(
                self.sim.stream_endpoint(stream_format), stream_version=version, frame_shape=(size, size),
                num_slots=NUM_SLOTS, receive_hwm=RECEIVE_HWM, timeout=RECEIVER_TIMEOUT_S).start()
        except BaseException:
            self.sim.close()
            raise

    def run(self, workers: int) -> dict:
        with DecodeWorkers(workers) as pool:
            bytes_before = self.receiver.stats().bytes_received
            series = self.control.arm()  # encodes the pool and sends the header: not timed
            self.receiver.arm(series)
            trigger = TriggerThread(self.control).start()
            timing = consume_series(self.receiver, pool if workers else None, trigger)
            trigger.join()
            bytes_received = self.receiver.stats().bytes_received - bytes_before
        result = figures(self.size, self.frames, workers, trigger.started_at, timing, bytes_received)
        result["sim_send_s"] = trigger.sent_at - trigger.started_at
        return result

    def close(self) -> None:
        try:
            self.receiver.stop()
            self.control.close()
        finally:
            self.sim.close()


# ---------------------------------------------------------------------------------------------


def measure_size(producer: str, version: int, size: int, frames: int, worker_counts: list[int],
                 repeat: int) -> dict[int, list[dict]]:
    """Every run of every worker count for one frame size."""
    if producer == "python":
        return {w: [run_python_producer(version, size, frames, w) for _ in range(repeat)] for w in worker_counts}
    with SimulatorSeriesBench(version, size, frames) as bench:
        return {w: [bench.run(w) for _ in range(repeat)] for w in worker_counts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--producer", default="sim", choices=tuple(PRODUCERS),
                        help="sim: the simulator's compiled fast path (default); "
                             "python: tango_dectris_live.testing.stream_producer")
    parser.add_argument("--frames", type=int, default=100_000)
    parser.add_argument("--version", type=int, default=2, choices=(1, 2))
    parser.add_argument("--sizes", type=int, nargs="+", default=[96, 192, 512])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--repeat", type=int, default=3, help="runs per case; the median is reported")
    parser.add_argument("--large-frames", type=int, default=None,
                        help="frames per run for 512x512 (default: --frames / 10, at least 1000)")
    parser.add_argument("--json", type=Path, default=None, help="write every run and the medians here")
    args = parser.parse_args()
    if args.producer == "sim":
        for size in args.sizes:
            try:
                sim_scenario(size, 1)  # an unsupported size fails before anything starts
            except ValueError as error:
                parser.error(str(error))
    print(f"stream v{args.version}, uint16 bslz4, producer {PRODUCERS[args.producer]}, median of {args.repeat} runs")
    print(f"{'size':9s} {'mode':22s} {'frames/s':>10s} {'MB/s compr.':>12s} {'MB/s decoded':>13s} "
          f"{'busy':>6s} {'missing':>8s}")
    results = []
    for size in args.sizes:
        frames = args.frames if size < 512 else (args.large_frames or max(1000, args.frames // 10))
        runs_by_workers = measure_size(args.producer, args.version, size, frames, args.workers, args.repeat)
        for workers, runs in runs_by_workers.items():
            median = {key: statistics.median(r[key] for r in runs)
                      for key in runs[0] if isinstance(runs[0][key], (int, float))}
            median["worker_busy"] = median.get("worker_busy")
            mode = "receive only" if workers == 0 else f"+decode {workers} worker{'s' * (workers > 1)}"
            busy = "" if median["worker_busy"] is None else f"{100 * median['worker_busy']:5.0f}%"
            print(f"{size:4d}x{size:<4d} {mode:22s} {median['frames_per_s']:10.0f} "
                  f"{median['compressed_mb_per_s']:12.1f} {median['decoded_mb_per_s']:13.1f} {busy:>6s} "
                  f"{max(r['missing'] for r in runs):8d}", flush=True)
            results.append({"size": size, "frames": frames, "workers": workers, "median": median, "runs": runs})
    if args.json is not None:
        args.json.write_text(json.dumps({"stream_version": args.version, "encoding": "bslz4", "dtype": "uint16",
                                         "producer": PRODUCERS[args.producer], "results": results}, indent=2))


if __name__ == "__main__":
    main()
