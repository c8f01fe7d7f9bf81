"""Each stream fault does exactly what it says (collected with a PULL socket)."""
from __future__ import annotations

import json
import threading

import cbor2
import dectris.compression
import numpy as np
import pytest

from sim.faults import parse_faults
from tests.test_sim_stream_v1 import decode_v1_blob, image_messages, make_series, stream_under_test


def frames_of(messages):
    return [json.loads(m[0])["frame"] for m in image_messages(messages)]


def run_with_faults(faults, nimages=6, stream_format="legacy", **series_kw):
    series = make_series(stream_format, nimages=nimages, **series_kw)
    with stream_under_test(stream_format, faults=faults) as stream:
        messages = stream.run_series(series)
        truth = stream.sink.generator_for(series)
        stream.sink.start_series(series)  # the next series has no faults left
        stream.sink.send_frames(series, 0, nimages, 0.0, threading.Event())
        stream.sink.end_series(series)
        following = stream.collect()
    return messages, following, truth


def test_drop_duplicate_reorder():
    messages, following, _ = run_with_faults([{"kind": "drop", "frames": [1, 3]},
                                              {"kind": "duplicate", "frame": 2},
                                              {"kind": "reorder", "frames": [4]}])
    assert frames_of(messages) == [0, 2, 2, 5, 4]
    assert frames_of(following) == [0, 1, 2, 3, 4, 5]  # faults were cleared after one series


def test_reorder_of_the_last_frame_of_a_trigger_is_sent_after_the_next():
    series = make_series(nimages=4)
    with stream_under_test(faults=[{"kind": "reorder", "frame": 1}]) as stream:
        stream.sink.start_series(series)
        stream.sink.send_frames(series, 0, 2, 0.0, threading.Event())
        stream.sink.send_frames(series, 2, 2, 0.0, threading.Event())
        stream.sink.end_series(series)
        assert frames_of(stream.collect()) == [0, 2, 1, 3]


def test_persistent_faults_stay():
    series = make_series(nimages=3)
    with stream_under_test(faults=[{"kind": "drop", "frame": 0, "persistent": True}]) as stream:
        assert frames_of(stream.run_series(series)) == [1, 2]
        assert frames_of(stream.run_series(series)) == [1, 2]
        assert stream.sink.get_sim_config()["faults"] == [{"kind": "drop", "frames": [0], "persistent": True}]


def test_corrupt_and_truncate_blob():
    messages, _, truth = run_with_faults([{"kind": "corrupt", "frame": 1}, {"kind": "truncate", "frame": 2}])
    images = image_messages(messages)
    good = decode_v1_blob(json.loads(images[0][1]), images[0][2])
    np.testing.assert_array_equal(good, truth.frame(0))
    desc = json.loads(images[1][1])
    try:
        corrupted = decode_v1_blob(desc, images[1][2])
    except RuntimeError:
        corrupted = None
    assert corrupted is None or not np.array_equal(corrupted, truth.frame(1))
    desc2 = json.loads(images[2][1])
    assert len(images[2][2]) == desc2["size"] // 2
    with pytest.raises(RuntimeError):
        dectris.compression.decompress(images[2][2], "bslz4", elem_size=2)


def test_truncate_parts_sends_only_the_first_parts():
    messages, _, _ = run_with_faults([{"kind": "truncate", "frame": 2, "mode": "parts"}])
    assert [len(m) for m in image_messages(messages)] == [4, 4, 2, 4, 4, 4]


def test_wrong_series_and_stale_end():
    messages, _, _ = run_with_faults([{"kind": "wrong_series", "frame": 3}, {"kind": "stale_end"}])
    assert json.loads(messages[0][0]) == {"htype": "dseries_end-1.0", "series": 6}
    assert json.loads(messages[1][0])["htype"] == "dheader-1.0"
    assert [json.loads(m[0])["series"] for m in image_messages(messages)] == [7, 7, 7, 8, 7, 7]


def test_no_header_sends_images_and_end_without_the_header():
    messages, following, _ = run_with_faults([{"kind": "no_header"}])
    htypes = [json.loads(m[0])["htype"] for m in messages]
    assert "dheader-1.0" not in htypes
    assert htypes == ["dimage-1.0"] * 6 + ["dseries_end-1.0"]
    assert json.loads(following[0][0])["htype"] == "dheader-1.0"  # the next series has its header


def test_stop_sends_nothing_after_the_frame_and_no_end():
    series = make_series(nimages=6)
    with stream_under_test(faults=[{"kind": "stop", "frame": 2}]) as stream:
        stream.sink.start_series(series)
        assert stream.sink.send_frames(series, 0, 6, 0.0, threading.Event()) == 6
        stream.sink.end_series(series)
        messages = stream.drain(0.3)
    assert frames_of(messages) == [0, 1, 2]
    assert not any(b"dseries_end" in m[0] for m in messages)


def test_stall_pauses_before_the_frame():
    series = make_series(nimages=3)
    with stream_under_test(faults=[{"kind": "stall", "frame": 1, "ms": 300}]) as stream:
        stream.sink.start_series(series)
        sender = threading.Thread(target=stream.sink.send_frames, args=(series, 0, 3, 0.0, threading.Event()))
        sender.start()
        try:
            header = stream.pull.recv_multipart()
            first = stream.pull.recv_multipart()
            assert json.loads(header[0])["htype"] == "dheader-1.0" and json.loads(first[0])["frame"] == 0
            # frame 1 is held back while the sender stalls (it arrives, but not at once)
            assert stream.pull.poll(100) == 0
            assert json.loads(stream.pull.recv_multipart()[0])["frame"] == 1
        finally:
            sender.join()
        stream.sink.end_series(series)


def test_rebind_closes_and_binds_the_same_port_again():
    series = make_series(nimages=4)
    with stream_under_test(faults=[{"kind": "rebind", "frame": 1}]) as stream:
        port_before = stream.sink.ports[0]
        messages = stream.run_series(series)
        assert stream.sink.ports[0] == port_before
    # the PULL socket reconnects by itself; frames sent after the rebind still arrive
    assert frames_of(messages)[:2] == [0, 1]
    assert frames_of(messages)[-1] == 3


def test_v2_faults():
    messages, _, _ = run_with_faults([{"kind": "drop", "frame": 0}, {"kind": "wrong_series", "frame": 1},
                                      {"kind": "truncate", "frame": 2, "mode": "parts"}], nimages=4,
                                     stream_format="cbor")
    start, one, truncated, three, end = (m[0] for m in messages)
    assert cbor2.loads(one)["image_id"] == 1 and cbor2.loads(one)["series_id"] == 8
    with pytest.raises(cbor2.CBORDecodeError):
        cbor2.loads(truncated)
    assert cbor2.loads(three)["image_id"] == 3 and cbor2.loads(end)["type"] == "end"


@pytest.mark.parametrize("spec,message", [
    ({"kind": "drop"}, "frame"),
    ({"kind": "drop", "frames": [-1]}, "integers >= 0"),
    ({"kind": "stall", "frame": 1}, "ms"),
    ({"kind": "truncate", "frame": 1, "mode": "half"}, "mode"),
    ({"kind": "stale_end", "frame": 1}, "does not take"),
    ("drop", "a fault is a dict"),
])
def test_bad_fault_specs_are_refused(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_faults([spec])
