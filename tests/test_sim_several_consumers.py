"""Several receivers on one detector stream, as on a DCU: the PUSH socket deals every message to
exactly one connected PULL client, round-robin, a slow client included (ZeroMQ skips a client only
once its pipe is full). The basis of running several receiver nodes on one stream (issue 22)."""
from __future__ import annotations

import json
import threading
import time

import pytest
import zmq
from zmq.utils.monitor import recv_monitor_message

from sim.streams import DetectorStreamSink

from .test_sim_stream_v1 import make_series

FRAMES = 600


def _consume(socket: zmq.Socket, got: list[tuple[str, int]], done: threading.Event, slow: bool) -> None:
    """Take messages until ``done``: ("header", -1), ("image", frame) or ("end", -1)."""
    while not done.is_set():
        if not socket.poll(50):
            continue
        parts = socket.recv_multipart()
        head = json.loads(parts[0])
        kind = head["htype"]
        if kind.startswith("dimage-"):
            got.append(("image", int(head["frame"])))
            if slow:
                time.sleep(0.002)  # a consumer that cannot keep up with the stream
        elif kind.startswith("dheader-"):
            got.append(("header", -1))
        elif kind.startswith("dseries_end"):
            got.append(("end", -1))


@pytest.mark.parametrize("slow", [False, True], ids=["even", "one slow consumer"])
def test_every_message_reaches_exactly_one_of_three_consumers(slow):
    sink = DetectorStreamSink()
    port, _ = sink.bind()
    sink.update_sim_config({"pacing": "max", "fast_path": False})
    context = zmq.Context()
    sockets = []
    try:
        for _ in range(3):
            pull = context.socket(zmq.PULL)
            pull.setsockopt(zmq.RCVHWM, 8)  # small pipes: a slow consumer's fills quickly
            monitor = pull.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
            pull.connect(f"tcp://127.0.0.1:{port}")
            # connected for real (the ZeroMQ handshake done) before the series starts
            assert monitor.poll(10_000), "no ZeroMQ handshake with the simulator's stream"
            assert recv_monitor_message(monitor)["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED
            pull.disable_monitor()
            monitor.close(linger=0)
            sockets.append(pull)
        got: list[list[tuple[str, int]]] = [[], [], []]
        done = threading.Event()
        threads = [threading.Thread(target=_consume, args=(s, g, done, slow and i == 2))
                   for i, (s, g) in enumerate(zip(sockets, got))]
        for thread in threads:
            thread.start()
        series = make_series("legacy", nimages=FRAMES, width=32, height=32)
        sink.start_series(series)
        sink.send_frames(series, 0, FRAMES, 0.0, threading.Event())
        sink.end_series(series)
        deadline = time.monotonic() + 60
        while sum(len(g) for g in got) < FRAMES + 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        done.set()
        for thread in threads:
            thread.join(10)
    finally:
        for socket in sockets:
            socket.close(linger=0)
        context.term()
        sink.close()
    frames = sorted(frame for g in got for kind, frame in g if kind == "image")
    assert frames == list(range(FRAMES))  # every frame once, none twice
    assert sum(kind == "header" for g in got for kind, _ in g) == 1
    assert sum(kind == "end" for g in got for kind, _ in g) == 1
    shares = [sum(kind == "image" for kind, _ in g) for g in got]
    assert all(share > 0 for share in shares), shares
