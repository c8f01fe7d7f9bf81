"""The simulator's encoded frame pool (built at arm, released once ZeroMQ is done with it) and the
EIGER2 1M model streamed end to end through SIMPLON REST."""
from __future__ import annotations

import json
import threading
import time
from typing import Any

import numpy as np
import pytest
import requests
import zmq

from sim import encode, streams
from sim.server import SimulatorServer
from sim.streams import DetectorStreamSink
from tests.test_sim_stream_v1 import (StreamUnderTest, decode_v1_blob, image_messages, make_series,
                                      stream_under_test)
from tests.test_sim_stream_v2 import decode_multidim, raw_tags

pytestmark = pytest.mark.skipif(streams._fastsend is None, reason="sim._fastsend is not built")


@pytest.mark.parametrize("stream_format", ["legacy", "cbor"])
def test_frames_are_encoded_at_arm_not_at_the_first_trigger(stream_format, monkeypatch):
    series = make_series(stream_format, nimages=6, width=32, height=24)
    with stream_under_test(stream_format, pacing="max", pool_size=4) as stream:
        stream.sink.start_series(series)
        encodings = []
        original = encode.encode_frame

        def counting_encode_frame(*args: Any, **kwargs: Any) -> encode.EncodedFrame:
            encodings.append(args)
            return original(*args, **kwargs)

        monkeypatch.setattr(encode, "encode_frame", counting_encode_frame)
        stream.sink.send_frames(series, 0, series.total_frames, 0.0, threading.Event())
        stream.sink.end_series(series)
        messages = stream.collect()
    assert encodings == []  # every frame the series shows was encoded by start_series
    assert len(messages) == series.total_frames + 2


def test_pools_of_finished_series_are_released_once_zeromq_is_done():
    first = make_series(nimages=5, width=32, height=24)
    with stream_under_test(pacing="max", pool_size=4) as stream:
        for series_id in (7, 8, 9):
            messages = stream.run_series(make_series(series_id=series_id, nimages=5, width=32, height=24))
            assert len(image_messages(messages)) == 5
        # every message was received, so ZeroMQ released every part; arming the next series
        # keeps only the pools still referenced
        deadline = time.monotonic() + 5
        stream.sink.start_series(first)
        while stream.sink.fast_pools_held() > 0 and time.monotonic() < deadline:
            stream.sink.start_series(first)
        assert stream.sink.fast_pools_held() == 0
        stream.sink.end_series(first)


def test_a_pool_whose_parts_zeromq_still_holds_is_kept():
    # 100 uncompressed 128 KB frames: more than the kernel's socket buffers take, so parts stay
    # queued in ZeroMQ while the consumer reads nothing
    series = make_series(nimages=100, width=256, height=256, compression="none")
    sink = DetectorStreamSink()
    context = zmq.Context()
    pull = context.socket(zmq.PULL)
    pull.setsockopt(zmq.LINGER, 0)
    pull.setsockopt(zmq.RCVHWM, 1)
    pull.setsockopt(zmq.RCVBUF, 65536)
    try:
        sink.bind()
        pull.connect(f"tcp://127.0.0.1:{sink.ports[0]}")
        sink.update_sim_config({"pacing": "max", "pool_size": 4, "send_timeout_ms": 300})
        sink.start_series(series)
        sink.send_frames(series, 0, series.total_frames, 0.0, threading.Event())
        sink.end_series(series)
        sink.start_series(make_series(series_id=8, nimages=2, width=32, height=24))
        assert sink.fast_pools_held() == 1
    finally:
        pull.close(linger=0)
        context.term()
        sink.close()
    assert sink.fast_pools_held() == 0  # close() terminates the context, which releases every part


def _rest_put(session: requests.Session, base: str, module: str, task: str, key: str,
              value: Any = None) -> requests.Response:
    body = None if value is None else {"value": value}
    response = session.put(f"{base}/{module}/api/1.8.0/{task}/{key}", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response


@pytest.mark.parametrize("stream_format", ["legacy", "cbor"])
def test_eiger2_1m_streams_32_bit_frames_that_decode_to_the_ground_truth(stream_format):
    sink = DetectorStreamSink()
    server = SimulatorServer(host="127.0.0.1", port=0, stream_port=0, stream2_port=0, model="EIGER2_1M",
                             sink=sink)
    server.start()
    context = zmq.Context()
    pull = context.socket(zmq.PULL)
    pull.setsockopt(zmq.LINGER, 0)
    session = requests.Session()
    base = server.rest_url
    try:
        pull.connect(f"tcp://127.0.0.1:{server.stream_port if stream_format == 'legacy' else server.stream2_port}")
        _rest_put(session, base, "detector", "command", "initialize")
        _rest_put(session, base, "stream", "config", "mode", "enabled")
        _rest_put(session, base, "stream", "config", "format", stream_format)
        for key, value in (("auto_summation", True), ("frame_time", 1 / 500), ("nimages", 3),
                           ("trigger_mode", "ints")):
            _rest_put(session, base, "detector", "config", key, value)
        response = session.put(f"{base}/sim/api/config", json={"pacing": "max", "pool_size": 2}, timeout=30)
        assert response.status_code == 200, response.text
        _rest_put(session, base, "detector", "command", "arm")
        _rest_put(session, base, "detector", "command", "trigger")
        messages = StreamUnderTest(sink, pull).collect(timeout_s=20)
        config = {key: session.get(f"{base}/detector/api/1.8.0/config/{key}", timeout=30).json()["value"]
                  for key in ("x_pixels_in_detector", "y_pixels_in_detector", "bit_depth_image")}
        # the generator depends only on geometry, bit depth, frame count and the sim settings
        truth = sink.generator_for(make_series(stream_format, nimages=3, width=1028, height=1062, bit_depth=32))
        _rest_put(session, base, "detector", "command", "disarm")
    finally:
        session.close()
        pull.close(linger=0)
        context.term()
        server.stop()
    assert config == {"x_pixels_in_detector": 1028, "y_pixels_in_detector": 1062, "bit_depth_image": 32}
    if stream_format == "legacy":
        images = image_messages(messages)
        frames = [decode_v1_blob(json.loads(m[1]), m[2]) for m in images]
        assert [json.loads(m[1])["encoding"] for m in images] == ["bs32-lz4<"] * 3
    else:
        frames = [decode_multidim(raw_tags(m[0])["data"]["threshold_1"]) for m in messages[1:-1]]
    assert len(frames) == 3
    for number, frame in enumerate(frames):
        assert frame.shape == (1062, 1028) and frame.dtype == np.uint32
        np.testing.assert_array_equal(frame, truth.frame(number))
