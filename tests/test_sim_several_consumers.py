"""Several receivers on one detector stream, as on a DCU: the PUSH socket deals every message to
exactly one connected PULL client, round-robin, a slow client included (ZeroMQ skips a client only
once its pipe is full). The basis of running several receiver nodes on one stream (issue 22)."""
from __future__ import annotations

import json
import threading
import time

import pytest
import requests
import zmq
from zmq.utils.monitor import recv_monitor_message

from sim.server import SimulatorServer
from sim.streams import DetectorStreamSink, _fastsend
from tango_dectris_live.testing import wait_for
from tango_dectris_live.testing.slow_consumer import (
    SlowConsumer,
    StreamConsumer,
    queue_bound,
)

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


# -- a slow consumer with the DCU's queue bounded (send_hwm, send_buffer_bytes) --------------------

SLOW_FRAMES = 600
SEND_HWM = 4
SEND_BUFFER = 65536
SLOW_RCVHWM = 2
SLOW_RCVBUF = 65536
# 256x256 uint16 uncompressed: 128 KiB images, larger than every buffer on the way, so buffers
# hold few of them and the slow consumer's queue fills after a handful of frames.
SIDE = 256


def _slow_bound(stream_format: str) -> int:
    """The most images the slow consumer can hold while it takes nothing (its gate closed):
    :func:`queue_bound` of the buffers between it and the sender, plus 4 of slack (a kernel buffer
    may overrun its size by one segment, and each ZeroMQ engine may hold one decoded message that
    its full queue refused besides the one it is reading). Measured: 6 (v1) and 8 (v2)."""
    image_bytes = SIDE * SIDE * 2
    return queue_bound(image_bytes, send_hwm=SEND_HWM, send_buffer_bytes=SEND_BUFFER, rcvhwm=SLOW_RCVHWM,
                       rcvbuf=SLOW_RCVBUF) + 4


@pytest.mark.parametrize("fast_path", [True, False], ids=["compiled sender", "python sender"])
@pytest.mark.parametrize("stream_format", ["legacy", "cbor"], ids=["v1", "v2"])
def test_a_slow_consumer_keeps_only_what_its_queue_holds(stream_format, fast_path):
    """Three consumers, one slow (it takes nothing until the whole series was handed to ZeroMQ):
    the DCU skips it once its bounded queue is full, the two fast ones take the rest, and every
    message still reaches exactly one consumer. No timing enters: the slow share is bounded by
    the buffers alone, and the fast consumers' queues (RCVHWM 1000) never fill with 600 images."""
    if fast_path and _fastsend is None:
        pytest.skip("sim._fastsend is not built (python setup.py build_ext --inplace)")
    bound = _slow_bound(stream_format)
    # the margin: the slow consumer holds at most `bound`, far from a third
    assert bound < SLOW_FRAMES // 3 // 4
    sink = DetectorStreamSink()
    ports = sink.bind()
    # set after bind: the sockets are bound again with the bounded queue, on the same ports
    settings = sink.update_sim_config({"pacing": "max", "fast_path": fast_path, "send_hwm": SEND_HWM,
                                       "send_buffer_bytes": SEND_BUFFER, "send_timeout_ms": 600_000})
    assert settings["send_hwm"] == SEND_HWM and settings["send_buffer_bytes"] == SEND_BUFFER
    assert sink.ports == ports
    endpoint = f"tcp://127.0.0.1:{ports[0] if stream_format == 'legacy' else ports[1]}"
    context = zmq.Context()
    gate = threading.Event()
    consumers: list[StreamConsumer] = []
    try:
        consumers.append(StreamConsumer(endpoint, context=context).start())
        consumers.append(StreamConsumer(endpoint, context=context).start())
        consumers.append(SlowConsumer(endpoint, gate=gate, delay_s=0.001, rcvhwm=SLOW_RCVHWM,
                                      rcvbuf=SLOW_RCVBUF, context=context).start())
        series = make_series(stream_format, nimages=SLOW_FRAMES, width=SIDE, height=SIDE, compression="none")
        sink.start_series(series)
        assert sink.send_frames(series, 0, SLOW_FRAMES, 0.0, threading.Event()) == SLOW_FRAMES
        sink.end_series(series)
        # every message is in one consumer's queue now; only then may the slow one take its own
        assert sink.dropped_frames() == 0
        gate.set()
        wait_for(lambda: sum(len(c.received.messages) for c in consumers) >= SLOW_FRAMES + 2, timeout=60,
                 what=lambda: f"all messages taken: {[len(c.received.messages) for c in consumers]}")
    finally:
        for consumer in consumers:
            consumer.stop()
        context.term()
        sink.close()
    assert all(c.error is None for c in consumers), [c.error for c in consumers]
    received = [c.received for c in consumers]
    assert sorted(f for r in received for f in r.frames) == list(range(SLOW_FRAMES))  # each frame once
    assert sum(r.count("header") for r in received) == 1
    assert sum(r.count("end") for r in received) == 1
    assert sum(r.count("other") for r in received) == 0
    fast_a, fast_b, slow = (len(r.frames) for r in received)
    assert 0 < slow <= bound < SLOW_FRAMES // 3, (fast_a, fast_b, slow)
    assert slow < fast_a and slow < fast_b, (fast_a, fast_b, slow)
    # the fast ones took all the rest between them
    assert fast_a + fast_b == SLOW_FRAMES - slow


def test_the_bounded_queue_is_refused_while_a_series_is_armed_and_validated():
    sink = DetectorStreamSink()
    ports = sink.bind()
    try:
        series = make_series("legacy", nimages=2)
        sink.update_sim_config({"send_timeout_ms": 0})
        sink.start_series(series)  # armed: nobody connected, the header is dropped at once
        with pytest.raises(ValueError, match=r"send_hwm cannot change while series 7 is armed"):
            sink.update_sim_config({"send_hwm": 8})
        sink.update_sim_config({"seed": 3})  # other settings still change while armed
        sink.end_series(series)
        assert sink.update_sim_config({"send_hwm": 8, "send_buffer_bytes": None})["send_hwm"] == 8
        assert sink.ports == ports
        for bad, text in [({"send_hwm": 0}, r"send_hwm .* integer in 1\.\.1000000 or null"),
                          ({"send_hwm": True}, "send_hwm"), ({"send_hwm": 2.5}, "send_hwm"),
                          ({"send_buffer_bytes": 10}, r"send_buffer_bytes .* integer in 1024\.\.1073741824"),
                          ({"send_buffer_bytes": "64k"}, "send_buffer_bytes")]:
            with pytest.raises(ValueError, match=text):
                sink.update_sim_config(bad)
        assert sink.get_sim_config()["send_hwm"] == 8  # a refused change changed nothing
    finally:
        sink.close()


def test_rest_reports_and_validates_the_bounded_queue():
    with SimulatorServer(host="127.0.0.1", model="ARINA") as sim:
        url = f"{sim.rest_url}/sim/api/config"
        settings = requests.get(url, timeout=10).json()
        assert settings["send_hwm"] is None and settings["send_buffer_bytes"] is None  # ZeroMQ's defaults
        answer = requests.put(url, json={"send_hwm": 16, "send_buffer_bytes": 131072}, timeout=10)
        assert answer.status_code == 200, answer.text
        settings = requests.get(url, timeout=10).json()
        assert (settings["send_hwm"], settings["send_buffer_bytes"]) == (16, 131072)
        answer = requests.put(url, json={"send_hwm": -1}, timeout=10)
        assert answer.status_code == 400 and "send_hwm" in answer.text and "ZMQ_SNDHWM" in answer.text
        # still served on the ports it announced
        assert sim.sink.ports == (sim.stream_port, sim.stream2_port)
