"""zmqdump files: round trip, recording a running sink, replay through the sink."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import threading

import cbor2
import pytest

from sim.streams import DetectorStreamSink
from sim.zmqdump import ReplayRecording, read_zmqdump, record, write_zmqdump
from tests.test_sim_stream_v1 import decode_v1_blob, image_messages, make_series, stream_under_test
from tests.test_sim_stream_v2 import decode_multidim


def test_write_read_round_trip_regroups_v1_messages(tmp_path):
    series = make_series(nimages=3, header_detail="all", header_appendix="hdr", image_appendix="img")
    with stream_under_test() as stream:
        messages = stream.run_series(series)
    path = tmp_path / "series.zmqdump"
    assert write_zmqdump(path, messages) == len(messages)
    assert list(read_zmqdump(path)) == messages


def test_truncated_file_is_refused(tmp_path):
    path = tmp_path / "bad.zmqdump"
    path.write_bytes((100).to_bytes(8, "little") + b"short")
    with pytest.raises(ValueError, match="cut short"):
        list(read_zmqdump(path))


def test_record_from_a_running_sink(tmp_path):
    path = tmp_path / "recorded.zmqdump"
    _record_series("legacy", make_series(nimages=5), path)
    messages = list(read_zmqdump(path))
    assert [json.loads(m[0])["frame"] for m in image_messages(messages)] == [0, 1, 2, 3, 4]


def test_record_command_line(tmp_path):
    series = make_series(nimages=2)
    path = tmp_path / "cli.zmqdump"
    sink = DetectorStreamSink()
    try:
        v1_port, _ = sink.bind()
        # The header waits for the recorder process to connect instead of being dropped.
        sink.update_sim_config({"send_timeout_ms": 60_000})
        cmd = [sys.executable, "-m", "sim.zmqdump", "record", "--connect", f"tcp://127.0.0.1:{v1_port}",
               "--out", str(path), "--messages", "4"]
        proc = subprocess.Popen(cmd, stderr=subprocess.PIPE)
        try:
            sink.start_series(series)  # blocks (within the wait budget) until the recorder is up
            sink.send_frames(series, 0, 2, 0.0, threading.Event())
            sink.end_series(series)
            assert proc.wait(timeout=60) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stderr.close()
    finally:
        sink.close()
    assert len(list(read_zmqdump(path))) == 4


def test_replay_through_the_sink_reproduces_the_frames(tmp_path):
    original = make_series(series_id=3, nimages=4, image_appendix="img")
    path = tmp_path / "replay.zmqdump"
    with stream_under_test(nav_shape=[2, 2]) as stream:
        recorded = stream.run_series(original)
        truth = stream.sink.generator_for(original)
    write_zmqdump(path, recorded)
    armed = make_series(series_id=11, nimages=6)
    with stream_under_test(replay_file=str(path)) as stream:
        replayed = stream.run_series(armed)
    assert json.loads(replayed[0][0])["series"] == 11
    assert replayed[0][1:] == recorded[0][1:]
    images = image_messages(replayed)
    assert [json.loads(m[0])["frame"] for m in images] == [0, 1, 2, 3, 4, 5]
    assert all(json.loads(m[0])["series"] == 11 for m in images)
    for number, message in enumerate(images):
        assert message[1:] == recorded[1 + number % 4][1:]
        frame = decode_v1_blob(json.loads(message[1]), message[2])
        assert (frame == truth.frame(number % 4)).all()
    assert json.loads(replayed[-1][0]) == {"htype": "dseries_end-1.0", "series": 11}


def _record_series(stream_format: str, series, path) -> None:
    """Run ``series`` through a sink while ``record`` (the only consumer ever connected: a
    consumer closed just before could still take the header) writes ``path``."""
    sink = DetectorStreamSink()
    try:
        ports = sink.bind()
        sink.update_sim_config({"send_timeout_ms": 60_000})
        endpoint = f"tcp://127.0.0.1:{ports[0 if stream_format == 'legacy' else 1]}"
        result: list[int] = []
        recorder = threading.Thread(target=lambda: result.append(record(endpoint, path, until_end=True)))
        recorder.start()
        try:
            sink.start_series(series)  # waits (within the budget) for the recorder
            sink.send_frames(series, 0, series.total_frames, 0.0, threading.Event())
            sink.end_series(series)
        finally:
            recorder.join(timeout=30)
    finally:
        sink.close()
    assert result == [series.total_frames + 2]


@pytest.mark.parametrize("stream_format", ["legacy", "cbor"])
def test_replay_of_a_recording_sends_the_recorded_bytes(tmp_path, stream_format):
    """Record what the sim sends, replay it under the same series: byte for byte the recording."""
    series = make_series(stream_format, series_id=5, nimages=4, header_detail="all", image_appendix="img")
    path = tmp_path / "recorded.zmqdump"
    _record_series(stream_format, series, path)
    recorded = list(read_zmqdump(path))
    assert ReplayRecording.load(path).stream_format == stream_format
    with stream_under_test(stream_format, replay_file=str(path)) as stream:
        replayed = stream.run_series(series)
    assert replayed == recorded


def test_v2_replay_under_another_series_rewrites_only_the_ids(tmp_path):
    original = make_series("cbor", series_id=3, nimages=3)
    path = tmp_path / "v2.zmqdump"
    with stream_under_test("cbor", nav_shape=[1, 3]) as stream:
        recorded = stream.run_series(original)
        truth = stream.sink.generator_for(original)
    write_zmqdump(path, recorded)
    armed = dataclasses.replace(make_series("cbor", series_id=12, nimages=5),
                                series_unique_id="01JCQ3ZZZZZZZZZZZZZZZZZZZZ")
    with stream_under_test("cbor", replay_file=str(path)) as stream:
        replayed = stream.run_series(armed)
    decoded = [cbor2.loads(m[0]) for m in replayed]
    assert [m["type"] for m in decoded] == ["start"] + ["image"] * 5 + ["end"]
    assert {m["series_id"] for m in decoded} == {12}
    assert {m["series_unique_id"] for m in decoded} == {"01JCQ3ZZZZZZZZZZZZZZZZZZZZ"}
    assert [m["image_id"] for m in decoded[1:-1]] == [0, 1, 2, 3, 4]
    originals = [cbor2.loads(m[0]) for m in recorded]
    for number, message in enumerate(decoded[1:-1]):
        source = originals[1 + number % 3]
        assert {k: v for k, v in message.items() if k != "image_id"} == \
            {**{k: v for k, v in source.items() if k != "image_id"}, "series_id": 12,
             "series_unique_id": "01JCQ3ZZZZZZZZZZZZZZZZZZZZ"}
        (array,) = message["data"].values()
        assert (decode_multidim(array) == truth.frame(number % 3)).all()


def test_replay_refuses_a_recording_of_the_other_stream_format(tmp_path):
    series = make_series("cbor", nimages=1)
    with stream_under_test("cbor") as stream:
        messages = stream.run_series(series)
    path = tmp_path / "v2.zmqdump"
    write_zmqdump(path, messages)
    with stream_under_test("legacy", replay_file=str(path)) as stream:
        with pytest.raises(ValueError, match="set the format to cbor"):
            stream.sink.start_series(make_series("legacy", nimages=1))


def test_a_file_of_both_formats_is_refused(tmp_path):
    with stream_under_test("cbor") as stream:
        v2 = stream.run_series(make_series("cbor", nimages=1))
    with stream_under_test() as stream:
        v1 = stream.run_series(make_series(nimages=1))
    path = tmp_path / "mixed.zmqdump"
    write_zmqdump(path, v1 + v2)
    with pytest.raises(ValueError, match="mixes stream v1 and stream v2"):
        ReplayRecording.load(path)


def test_arm_with_a_replay_of_the_other_format_is_refused_over_rest(tmp_path):
    import requests

    from sim.server import SimulatorServer

    with stream_under_test("cbor") as stream:
        messages = stream.run_series(make_series("cbor", nimages=1))
    path = tmp_path / "v2.zmqdump"
    write_zmqdump(path, messages)
    with SimulatorServer(model="QUADRO") as server, requests.Session() as session:
        base = f"{server.rest_url}/detector/api/1.8.0"
        assert session.put(f"{base}/command/initialize", timeout=30).status_code == 200
        assert session.put(f"{server.rest_url}/stream/api/1.8.0/config/mode", json={"value": "enabled"},
                           timeout=30).status_code == 200
        assert session.put(f"{server.rest_url}/sim/api/config", json={"replay_file": str(path)},
                           timeout=30).status_code == 200
        response = session.put(f"{base}/command/arm", timeout=30)
        assert response.status_code == 400
        assert "set the format to cbor" in response.text
        assert session.get(f"{base}/status/state", timeout=30).json()["value"] == "idle"
