"""zmqdump files: round trip, recording a running sink, replay through the sink."""
from __future__ import annotations

import json
import subprocess
import sys
import threading

import pytest

from sim.zmqdump import ReplayRecording, read_zmqdump, record, write_zmqdump
from tests.test_sim_stream_v1 import decode_v1_blob, image_messages, make_series, stream_under_test


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
    series = make_series(nimages=5)
    path = tmp_path / "recorded.zmqdump"
    with stream_under_test() as stream:
        stream.pull.close(linger=0)  # the recorder is the only consumer
        endpoint = f"tcp://127.0.0.1:{stream.sink.ports[0]}"
        result: list[int] = []
        recorder = threading.Thread(target=lambda: result.append(record(endpoint, path, until_end=True)))
        recorder.start()
        try:
            stream.sink.start_series(series)
            stream.sink.send_frames(series, 0, 5, 0.0, threading.Event())
            stream.sink.end_series(series)
        finally:
            recorder.join(timeout=30)
    assert result == [7]
    messages = list(read_zmqdump(path))
    assert [json.loads(m[0])["frame"] for m in image_messages(messages)] == [0, 1, 2, 3, 4]


def test_record_command_line(tmp_path):
    series = make_series(nimages=2)
    path = tmp_path / "cli.zmqdump"
    # The header waits for the recorder process to connect instead of being dropped.
    with stream_under_test(send_timeout_ms=60_000) as stream:
        stream.pull.close(linger=0)
        cmd = [sys.executable, "-m", "sim.zmqdump", "record", "--connect",
               f"tcp://127.0.0.1:{stream.sink.ports[0]}", "--out", str(path), "--messages", "4"]
        proc = subprocess.Popen(cmd, stderr=subprocess.PIPE)
        try:
            stream.sink.start_series(series)  # blocks (up to the send timeout) until the recorder is up
            stream.sink.send_frames(series, 0, 2, 0.0, threading.Event())
            stream.sink.end_series(series)
            assert proc.wait(timeout=60) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stderr.close()
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


def test_replay_refuses_v2_recordings(tmp_path):
    series = make_series("cbor", nimages=1)
    with stream_under_test("cbor") as stream:
        messages = stream.run_series(series)
    path = tmp_path / "v2.zmqdump"
    write_zmqdump(path, messages)
    assert len(list(read_zmqdump(path))) == 3
    with pytest.raises(ValueError, match="v1"):
        ReplayRecording.load(path)
