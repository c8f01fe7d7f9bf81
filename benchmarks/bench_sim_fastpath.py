"""Throughput of the simulator's compiled send path (``sim._fastsend``).

For 96x96, 192x192 and 512x512 uint16 frames (bslz4 unless ``--compression``), in stream v1 and
v2, the sink sends a series
as fast as it can (pacing "max") into a PULL consumer in another process that only counts
(``sim._fastsend.count_messages``, GIL released). Prints frames/s and payload MB/s as seen by the
consumer. No assertions on speed.

The pool of encoded frames is built when the series is armed (``start_series``, timed apart as
"arm"), so the figures measure sending only.

Each case is followed by the machine's limit for the same messages: a bare libzmq sender
(``sim._fastsend.send_repeated``, a C loop with no per-message work) sending the sim's image 1,
part for part, into the same counting consumer. On the 2-core development machine the 512x512
bslz4 frames (~49 KB) are bounded by that limit (libzmq's I/O threads and the kernel's loopback
TCP, which the consumer's receive calls pay for), not by the sim's loop; uncompressed 512x512
frames (``--compression none --sizes 512``) go faster in bytes.

    .venv/bin/python benchmarks/bench_sim_fastpath.py --frames 200000 --large-frames 20000
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import threading
import time

import zmq

from sim import _fastsend
from sim.series import SeriesInfo
from sim.streams import DetectorStreamSink


def consume(endpoint: str, expected_messages: int, ready, result) -> None:
    context = zmq.Context()
    sock = context.socket(zmq.PULL)
    sock.setsockopt(zmq.RCVHWM, 10_000)
    sock.setsockopt(zmq.RCVTIMEO, 10_000)
    sock.connect(endpoint)
    ready.set()
    # The header/start and image 0 start the clock.
    first = _fastsend.count_messages(sock.underlying, 2)
    t0 = time.perf_counter()
    messages, parts, nbytes = _fastsend.count_messages(sock.underlying, expected_messages - 2)
    elapsed = time.perf_counter() - t0
    result.put((first[0] + messages, parts, nbytes, elapsed))
    sock.close(linger=0)
    context.term()


def bare_libzmq_limit(parts: list[bytes], messages: int) -> tuple[float, float]:
    """(messages/s, bytes/s) of a bare libzmq PUSH sending ``parts`` ``messages`` times into the
    counting consumer: the machine's limit for that message."""
    context = zmq.Context()
    push = context.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    push.bind("tcp://127.0.0.1:*")
    ctx = mp.get_context("spawn")
    ready, result = ctx.Event(), ctx.Queue()
    consumer = ctx.Process(target=consume, args=(push.getsockopt_string(zmq.LAST_ENDPOINT), messages,
                                                 ready, result))
    consumer.start()
    try:
        ready.wait(30)
        _fastsend.send_repeated(push.underlying, parts, messages)
        received, _, nbytes, elapsed = result.get(timeout=120)
    finally:
        consumer.join(timeout=30)
        if consumer.is_alive():
            consumer.kill()
        push.close(linger=0)
        context.term()  # after term() libzmq holds no part any more
    return (received - 2) / elapsed, nbytes / elapsed


def run_case(stream_format: str, size: int, frames: int, compression: str = "bslz4") -> None:
    series = SeriesInfo(series_id=1, series_unique_id="01HBV3JPF9T4ZDPADX6EMK6XMZ",
                        arm_date="2026-11-23T19:14:02.123+00:00", trigger_mode="ints", nimages=frames,
                        ntrigger=1, count_time=1e-5, frame_time=1e-5, width=size, height=size, bit_depth=16,
                        compression=compression, detector_config={},
                        stream_config={"mode": "enabled", "format": stream_format, "header_detail": "none"})
    sink = DetectorStreamSink()
    v1_port, v2_port = sink.bind()
    sink.update_sim_config({"pacing": "max", "pool_size": 64, "send_timeout_ms": 30_000})
    endpoint = f"tcp://127.0.0.1:{v1_port if stream_format == 'legacy' else v2_port}"
    ctx = mp.get_context("spawn")
    ready, result = ctx.Event(), ctx.Queue()
    consumer = ctx.Process(target=consume, args=(endpoint, frames + 2, ready, result))
    consumer.start()
    try:
        ready.wait(30)
        t0 = time.perf_counter()
        sink.start_series(series)  # arm: the header and the encoded pool
        arm_s = time.perf_counter() - t0
        image_parts = sink.image_parts(1)
        t0 = time.perf_counter()
        sink.send_frames(series, 0, frames, 0.0, threading.Event())
        send_s = time.perf_counter() - t0
        sink.end_series(series)
        messages, parts, nbytes, elapsed = result.get(timeout=120)
    finally:
        consumer.join(timeout=30)
        if consumer.is_alive():
            consumer.kill()
        sink.close()
    payload = nbytes  # every byte the consumer received (JSON parts included)
    print(f"{stream_format:6s} {size:4d}x{size:<4d} {messages - 2:8d} frames  "
          f"{(messages - 3) / elapsed:11,.0f} frames/s  {payload / elapsed / 1e6:9,.1f} MB/s  "
          f"(sender {frames / send_s:11,.0f} frames/s, {parts} parts, arm {arm_s:.2f} s)", flush=True)
    limit_messages, limit_bytes = bare_libzmq_limit(image_parts, frames)
    print(f"{'  bare libzmq, same message':28s} {limit_messages:11,.0f} msgs/s    "
          f"{limit_bytes / 1e6:9,.1f} MB/s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=200_000, help="frames per case for 96x96 and 192x192")
    parser.add_argument("--large-frames", type=int, default=20_000, help="frames per case for 512x512")
    parser.add_argument("--compression", default="bslz4", choices=("bslz4", "lz4", "none"))
    parser.add_argument("--sizes", default="96,192,512", help="frame sizes (square), comma-separated")
    args = parser.parse_args()
    print(f"uint16 frames, compression {args.compression}", flush=True)
    for stream_format in ("legacy", "cbor"):
        for size in (int(v) for v in args.sizes.split(",")):
            run_case(stream_format, size, args.large_frames if size >= 512 else args.frames, args.compression)


if __name__ == "__main__":
    main()
