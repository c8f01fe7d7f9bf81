"""Stream v1 of the simulator's sink, held against the real EIGER 4M capture."""
from __future__ import annotations

import hashlib
import json
import threading
from contextlib import contextmanager
from typing import Any, Iterator

import dectris.compression
import lz4.block
import numpy as np
import pytest
import zmq

from sim import encode
from sim.series import SeriesInfo
from sim.streams import DetectorStreamSink

V1_CAPTURE = "stream_v1_eiger4m"
END_MARKERS = (b'"htype":"dseries_end-1.0"', b"\xd9\xd9\xf7\xa3dtypecend")


def make_series(stream_format: str = "legacy", *, series_id: int = 7, nimages: int = 9, width: int = 40,
                height: int = 24, bit_depth: int = 16, compression: str = "bslz4",
                header_detail: str = "basic", detector_config: dict[str, Any] | None = None,
                **stream: Any) -> SeriesInfo:
    config = {"count_time": 0.001, "frame_time": 0.0011, "nimages": nimages, "ntrigger": 1,
              "description": "Dectris QUADRO Si 250K", "x_pixels_in_detector": width,
              "y_pixels_in_detector": height, "flatfield": [[1.0]], "pixel_mask": [[0]],
              "countrate_correction_table": [0.0, 0.0, 1125.0, 1124.7]}
    config.update(detector_config or {})
    return SeriesInfo(series_id=series_id, series_unique_id="01HBV3JPF9T4ZDPADX6EMK6XMZ",
                      arm_date="2026-11-23T19:14:02.123+00:00", trigger_mode="ints", nimages=nimages,
                      ntrigger=1, count_time=0.001, frame_time=0.0011, width=width, height=height,
                      bit_depth=bit_depth, compression=compression, detector_config=config,
                      stream_config={"mode": "enabled", "format": stream_format,
                                     "header_detail": header_detail, **stream})


class StreamUnderTest:
    """A sink with a PULL socket connected to the port of one stream format."""

    def __init__(self, sink: DetectorStreamSink, pull: zmq.Socket) -> None:
        self.sink = sink
        self.pull = pull

    def run_series(self, series: SeriesInfo, *, first: int = 0, count: int | None = None,
                   period_s: float = 0.0) -> list[list[bytes]]:
        """Arm, send all frames, end; return every message up to the end message."""
        self.sink.start_series(series)
        self.sink.send_frames(series, first, series.total_frames if count is None else count, period_s,
                              threading.Event())
        self.sink.end_series(series)
        return self.collect()

    def collect(self, timeout_s: float = 5.0) -> list[list[bytes]]:
        """Messages until one whose first part is an end message of *any* series (stale ones
        included), or until nothing arrives for ``timeout_s``."""
        messages = []
        while self.pull.poll(int(timeout_s * 1000)):
            message = self.pull.recv_multipart()
            messages.append(message)
            if any(m in message[0][:40] for m in END_MARKERS) and _is_final_end(message, messages):
                break
        return messages

    def drain(self, timeout_s: float = 0.5) -> list[list[bytes]]:
        messages = []
        while self.pull.poll(int(timeout_s * 1000)):
            messages.append(self.pull.recv_multipart())
        return messages


def _is_final_end(message: list[bytes], messages: list[list[bytes]]) -> bool:
    # A stale end (sent before the header) is not the end of the collection.
    return len(messages) > 1


@contextmanager
def stream_under_test(stream_format: str = "legacy", **sim_config: Any) -> Iterator[StreamUnderTest]:
    sink = DetectorStreamSink()
    context = zmq.Context()
    pull = context.socket(zmq.PULL)
    pull.setsockopt(zmq.LINGER, 0)
    try:
        v1_port, v2_port = sink.bind()
        if sim_config:
            sink.update_sim_config(sim_config)
        pull.connect(f"tcp://127.0.0.1:{v1_port if stream_format == 'legacy' else v2_port}")
        yield StreamUnderTest(sink, pull)
    finally:
        pull.close(linger=0)
        context.term()
        sink.close()


def image_messages(messages: list[list[bytes]]) -> list[list[bytes]]:
    return [m for m in messages if b'"htype":"dimage-1.0"' in m[0]]


def decode_v1_blob(dimage_d: dict[str, Any], blob: bytes) -> np.ndarray:
    dtype = np.dtype(dimage_d["type"]).newbyteorder("<")
    width, height = dimage_d["shape"]
    n = width * height * dtype.itemsize
    encoding = dimage_d["encoding"]
    if encoding.startswith("bs"):
        raw = dectris.compression.decompress(blob, "bslz4", elem_size=dtype.itemsize)
    elif encoding == "lz4<":
        raw = lz4.block.decompress(blob, uncompressed_size=n)
    else:
        assert encoding == "<"
        raw = blob
    return np.frombuffer(raw, dtype=dtype).reshape(height, width)


def _part(testdata, name: str) -> bytes:
    return (testdata / V1_CAPTURE / name).read_bytes()


def _assert_v1_json_part(ours: bytes, real: bytes) -> None:
    """Same htype, same key set, same (sorted) key order, compact, trailing newline."""
    ours_obj, real_obj = json.loads(ours), json.loads(real)
    assert ours.endswith(b"\n") and real.endswith(b"\n")
    assert b", " not in ours and b": " not in ours
    assert list(ours_obj) == list(real_obj) == sorted(real_obj)
    assert ours_obj.get("htype") == real_obj.get("htype")
    assert ours == encode.v1_json(ours_obj)


@pytest.mark.parametrize("fast_path", [False, True])
def test_v1_parts_match_the_real_capture(testdata, fast_path):
    series = make_series(header_detail="all", bit_depth=16, header_appendix='{"acqID": "test_1"}')
    with stream_under_test(fast_path=fast_path) as stream:
        messages = stream.run_series(series)
    header, *images, end = messages
    assert [len(m) for m in images] == [4] * series.total_frames
    # global header: dheader, config, flatfield, pixel mask, count-rate table, appendix
    assert len(header) == 9
    _assert_v1_json_part(header[0], _part(testdata, "part_01"))
    assert json.loads(header[0]) == {"header_detail": "all", "htype": "dheader-1.0", "series": 7}
    config = json.loads(header[1])
    assert header[1].endswith(b"\n") and list(config) == sorted(config)
    assert "flatfield" not in config and "pixel_mask" not in config
    assert "countrate_correction_table" not in config and config["nimages"] == series.nimages
    for ours, real in ((header[2], "part_03"), (header[4], "part_05"), (header[6], "part_07")):
        _assert_v1_json_part(ours, _part(testdata, real))
    assert json.loads(header[2])["shape"] == [40, 24] and len(header[3]) == 40 * 24 * 4
    assert len(header[5]) == 40 * 24 * 4
    table_shape = json.loads(header[6])["shape"]
    assert table_shape == [2, 2] and len(header[7]) == 2 * 2 * 4
    assert header[8] == b'{"acqID": "test_1"}'
    # images
    for number, (dimage, dimage_d, blob, dconfig) in enumerate(images):
        _assert_v1_json_part(dimage, _part(testdata, "part_10"))
        _assert_v1_json_part(dimage_d, _part(testdata, "part_11"))
        _assert_v1_json_part(dconfig, _part(testdata, "part_13"))
        head = json.loads(dimage)
        assert head["frame"] == number and head["series"] == 7
        assert head["hash"] == hashlib.md5(dimage_d).hexdigest()
        desc = json.loads(dimage_d)
        assert desc["size"] == len(blob) and desc["shape"] == [40, 24]
        assert desc["encoding"] == "bs16-lz4<" and desc["type"] == "uint16"
        times = json.loads(dconfig)
        assert times["real_time"] == 1_000_000
        assert times["stop_time"] - times["start_time"] == times["real_time"]
    starts = [json.loads(m[3])["start_time"] for m in images]
    assert all(b - a == 1_100_000 for a, b in zip(starts, starts[1:]))
    assert end == [_part(testdata, "part_22").replace(b":6}", b":7}")]


@pytest.mark.parametrize("detail,parts", [("none", 1), ("basic", 2), ("all", 8)])
def test_header_detail_part_counts(detail, parts):
    with stream_under_test() as stream:
        header = stream.run_series(make_series(header_detail=detail, nimages=1))[0]
    assert len(header) == parts
    assert json.loads(header[0])["header_detail"] == detail


@pytest.mark.parametrize("fast_path", [False, True])
@pytest.mark.parametrize("compression", ["bslz4", "lz4", "none"])
@pytest.mark.parametrize("bit_depth", [8, 16, 32])
def test_every_frame_decodes_to_ground_truth(compression, bit_depth, fast_path):
    series = make_series(compression=compression, bit_depth=bit_depth, nimages=6, width=33, height=17,
                         image_appendix="img-extra")
    with stream_under_test(fast_path=fast_path, nav_shape=[2, 3], pool_size=4) as stream:
        messages = stream.run_series(series)
        truth = stream.sink.generator_for(series)
    images = image_messages(messages)
    assert len(images) == 6
    expected_encoding = {"bslz4": f"bs{bit_depth}-lz4<", "lz4": "lz4<", "none": "<"}[compression]
    for number, message in enumerate(images):
        assert len(message) == 5 and message[4] == b"img-extra"
        desc = json.loads(message[1])
        assert desc["encoding"] == expected_encoding and desc["type"] == f"uint{bit_depth}"
        np.testing.assert_array_equal(decode_v1_blob(desc, message[2]), truth.frame(number))


def test_python_and_fast_path_send_identical_bytes():
    series = make_series(nimages=12, header_detail="none")
    results = []
    for fast_path in (False, True):
        with stream_under_test(fast_path=fast_path, nav_shape=[3, 4], pool_size=5) as stream:
            stream.sink.start_series(series)
            t0 = stream.sink._current.t0_ns
            stream.sink.send_frames(series, 0, 12, 0.0, threading.Event())
            stream.sink.end_series(series)
            messages = stream.collect()
        # The dconfig times are relative to the arm; compare them relative to it.
        normalised = []
        for m in messages:
            if b'"dconfig-1.0"' in m[-1]:
                times = json.loads(m[-1])
                m = m[:-1] + [(times["start_time"] - t0, times["stop_time"] - t0, times["real_time"])]
            normalised.append(m)
        results.append(normalised)
    assert results[0] == results[1]


@pytest.mark.parametrize("fast_path", [False, True])
def test_frames_are_numbered_across_calls(fast_path):
    """Two triggers: frame numbers run on from the first call."""
    series = make_series(nimages=4)
    with stream_under_test(fast_path=fast_path) as stream:
        stream.sink.start_series(series)
        assert stream.sink.send_frames(series, 0, 2, 0.0, threading.Event()) == 2
        assert stream.sink.send_frames(series, 2, 2, 0.0, threading.Event()) == 2
        stream.sink.end_series(series)
        messages = stream.collect()
    assert [json.loads(m[0])["frame"] for m in image_messages(messages)] == [0, 1, 2, 3]


def test_reencoding_the_captured_v1_frame_is_byte_identical(testdata):
    desc = json.loads(_part(testdata, "part_11"))
    blob = _part(testdata, "part_12")
    frame = decode_v1_blob(desc, blob)
    encoded = encode.encode_frame(frame, "bslz4")
    assert encoded.blob == blob
    assert encode.v1_dimage_d(encoded) == _part(testdata, "part_11")
    assert hashlib.md5(_part(testdata, "part_11")).hexdigest() == json.loads(_part(testdata, "part_10"))["hash"]


def test_stream_disabled_sends_nothing_but_takes_the_time():
    series = make_series(nimages=3)
    disabled = SeriesInfo(**{**series.__dict__, "stream_config": {**series.stream_config, "mode": "disabled"}})
    with stream_under_test() as stream:
        stream.sink.start_series(disabled)
        assert stream.sink.send_frames(disabled, 0, 3, 0.001, threading.Event()) == 3
        stream.sink.end_series(disabled)
        assert stream.drain(0.2) == []


def test_stop_event_ends_sending_early():
    series = make_series(nimages=1000)
    stop = threading.Event()
    stop.set()
    with stream_under_test() as stream:
        stream.sink.start_series(series)
        assert stream.sink.send_frames(series, 0, 1000, 0.01, stop) == 0
        stream.sink.end_series(series)


def test_invalid_sim_settings_are_refused_with_a_message(tmp_path):
    sink = DetectorStreamSink()
    try:
        with pytest.raises(ValueError, match="pacing"):
            sink.update_sim_config({"pacing": "fast"})
        with pytest.raises(ValueError, match="nav_shape"):
            sink.update_sim_config({"nav_shape": [0, 3]})
        with pytest.raises(ValueError, match="does not exist"):
            sink.update_sim_config({"replay_file": str(tmp_path / "missing.zmqdump")})
        with pytest.raises(ValueError, match="unknown simulator setting"):
            sink.update_sim_config({"speed": 3})
        with pytest.raises(ValueError, match="unknown fault kind"):
            sink.update_sim_config({"faults": [{"kind": "explode"}]})
        assert sink.update_sim_config({"pacing": "max", "seed": 3})["seed"] == 3
    finally:
        sink.close()


@pytest.mark.parametrize("fast_path", [True, False])
def test_missing_consumer_drops_instead_of_blocking(fast_path):
    """The series' wait budget is spent by the header; every image is then dropped and counted."""
    series = make_series(nimages=5)
    sink = DetectorStreamSink()
    try:
        sink.bind()
        sink.update_sim_config({"send_timeout_ms": 50, "fast_path": fast_path})
        sink.start_series(series)  # the header has no consumer: the 50 ms budget runs out
        assert sink.send_frames(series, 0, 5, 0.0, threading.Event()) == 5
        sink.end_series(series)
        assert sink.dropped == 5
        assert sink.dropped_frames() == 5
        assert sink.frames_sent == 0
    finally:
        sink.close()


def test_stop_ends_the_wait_for_a_consumer():
    """A disarm while frames wait for a consumer is honoured before the budget is spent."""
    series = make_series(nimages=3)
    sink = DetectorStreamSink()
    stop = threading.Event()
    try:
        sink.bind()
        sink.update_sim_config({"send_timeout_ms": 0})
        sink.start_series(series)
        sink.update_sim_config({"send_timeout_ms": 600_000})
        stop.set()
        assert sink.send_frames(series, 0, 3, 0.0, stop) == 0
        sink.end_series(series)
    finally:
        sink.close()


def test_end_to_end_through_rest():
    """Arm and trigger through the SIMPLON REST API; the frames arrive on stream v1."""
    import requests

    from sim.server import SimulatorServer

    sink = DetectorStreamSink()
    server = SimulatorServer(host="127.0.0.1", port=0, stream_port=0, stream2_port=0, model="QUADRO", sink=sink)
    server.start()
    context = zmq.Context()
    pull = context.socket(zmq.PULL)
    pull.setsockopt(zmq.LINGER, 0)
    session = requests.Session()
    try:
        pull.connect(f"tcp://127.0.0.1:{server.stream_port}")
        base = server.rest_url

        def put(module: str, task: str, key: str, value: Any = None) -> requests.Response:
            body = None if value is None else {"value": value}
            response = session.put(f"{base}/{module}/api/1.8.0/{task}/{key}", json=body, timeout=30)
            assert response.status_code == 200, response.text
            return response

        put("detector", "command", "initialize")
        put("stream", "config", "mode", "enabled")
        put("detector", "config", "nimages", 4)
        put("detector", "config", "trigger_mode", "ints")
        response = session.put(f"{base}/sim/api/config", json={"pacing": "max"}, timeout=30)
        assert response.status_code == 200, response.text
        series_id = put("detector", "command", "arm").json()["sequence id"]
        put("detector", "command", "trigger")
        stream = StreamUnderTest(sink, pull)
        messages = stream.collect(timeout_s=10)
        put("detector", "command", "disarm")
    finally:
        session.close()
        pull.close(linger=0)
        context.term()
        server.stop()
    assert json.loads(messages[0][0])["series"] == series_id
    images = image_messages(messages)
    assert [json.loads(m[0])["frame"] for m in images] == [0, 1, 2, 3]
    assert json.loads(images[0][1])["shape"] == [512, 512]
    assert json.loads(messages[-1][0]) == {"htype": "dseries_end-1.0", "series": series_id}


def test_series_without_consumer_completes_and_counts_dropped_over_rest():
    """Nobody connected: arm and trigger return, every image is counted in stream/status/dropped
    and the detector goes back to idle; a consumer that connects afterwards gets a whole series."""
    import requests

    from sim.server import SimulatorServer

    server = SimulatorServer(model="QUADRO").start()
    context = zmq.Context()
    pull = context.socket(zmq.PULL)
    pull.setsockopt(zmq.LINGER, 0)
    session = requests.Session()
    base = server.rest_url

    def put(module: str, task: str, key: str, value: Any = None) -> dict:
        body = None if value is None else {"value": value}
        response = session.put(f"{base}/{module}/api/1.8.0/{task}/{key}", json=body, timeout=30)
        assert response.status_code == 200, response.text
        return response.json() if response.content else {}

    def get(module: str, task: str, key: str) -> Any:
        response = session.get(f"{base}/{module}/api/1.8.0/{task}/{key}", timeout=30)
        assert response.status_code == 200, response.text
        return response.json()["value"]

    try:
        put("detector", "command", "initialize")
        put("stream", "config", "mode", "enabled")
        put("detector", "config", "nimages", 6)
        put("detector", "config", "trigger_mode", "ints")
        response = session.put(f"{base}/sim/api/config", json={"pacing": "max", "send_timeout_ms": 100},
                               timeout=30)
        assert response.status_code == 200, response.text
        put("detector", "command", "arm")
        put("detector", "command", "trigger")  # ints, ntrigger 1: the series completes
        assert get("detector", "status", "state") == "idle"
        assert get("stream", "status", "dropped") == 6

        pull.connect(f"tcp://127.0.0.1:{server.stream_port}")
        response = session.put(f"{base}/sim/api/config", json={"send_timeout_ms": 30_000}, timeout=30)
        assert response.status_code == 200, response.text
        series_id = put("detector", "command", "arm")["sequence id"]
        put("detector", "command", "trigger")
        messages = StreamUnderTest(server.sink, pull).collect(timeout_s=10)
        assert get("stream", "status", "dropped") == 0
    finally:
        session.close()
        pull.close(linger=0)
        context.term()
        server.stop()
    assert json.loads(messages[0][0])["series"] == series_id
    assert [json.loads(m[0])["frame"] for m in image_messages(messages)] == list(range(6))
    assert json.loads(messages[-1][0]) == {"htype": "dseries_end-1.0", "series": series_id}
