"""The simulator as a partial DCU (``--profile partial``, LiberTEM-live's simulator), its stream v1
framings on the wire, the ``writes`` setting, and its refusal of absurd scan sizes."""
from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from collections.abc import Iterator

import pytest
import requests
import zmq

from sim.data import MAX_SCAN_POSITIONS
from sim.models import MAX_IMAGES
from sim.server import SimulatorServer

V18 = "/detector/api/1.8.0"
STREAM18 = "/stream/api/1.8.0"
TIMEOUT_S = 10


@pytest.fixture
def partial() -> Iterator[SimulatorServer]:
    with SimulatorServer(host="127.0.0.1", model="ARINA", profile="partial") as simulator:
        yield simulator


@pytest.fixture
def full() -> Iterator[SimulatorServer]:
    with SimulatorServer(host="127.0.0.1", model="ARINA") as simulator:
        requests.put(simulator.rest_url + V18 + "/command/initialize", timeout=TIMEOUT_S).raise_for_status()
        yield simulator


def _get(simulator: SimulatorServer, path: str) -> requests.Response:
    return requests.get(simulator.rest_url + path, timeout=TIMEOUT_S)


def _put(simulator: SimulatorServer, path: str, value: object = None) -> requests.Response:
    body = None if value is None else {"value": value}
    return requests.put(simulator.rest_url + path, json=body, timeout=TIMEOUT_S)


def _sim_config(simulator: SimulatorServer, **settings: object) -> requests.Response:
    return requests.put(simulator.rest_url + "/sim/api/config", json=settings, timeout=TIMEOUT_S)


# ------------------------------------------------------------------------------------------------
# REST answers of the partial profile


def test_partial_profile_has_no_detector_state(partial):
    assert _get(partial, V18 + "/status/state").status_code == 404
    assert _get(partial, V18 + "/status/temperature").status_code == 404
    assert _get(partial, STREAM18 + "/status/dropped").status_code == 404


@pytest.mark.parametrize("path, key", [
    (V18 + "/config/keys", "keys"),
    (V18 + "/command/keys", "keys"),
    (V18 + "/config/photon_energy", "photon_energy"),
    (V18 + "/config/description", "description"),
    (V18 + "/config/beam_center_x", "beam_center_x"),
    (V18 + "/config/beam_center_y", "beam_center_y"),
    (V18 + "/config/threshold_energy", "threshold_energy"),
    (STREAM18 + "/config/format", "format"),
    (STREAM18 + "/config/keys", "keys"),
])
def test_partial_profile_answers_500_not_implemented_as_json(partial, path, key):
    method = requests.put if "/command/" in path else requests.get
    response = method(partial.rest_url + path, timeout=TIMEOUT_S)
    assert response.status_code == 500
    assert response.headers["Content-Type"].startswith("application/json")
    assert response.json() == {"error": f"Parameter {key} not implemented."}


def test_partial_profile_refuses_other_commands_and_stream_writes_like_libertem(partial):
    for command in ("hv_reset", "status_update", "check_connections"):
        response = _put(partial, V18 + f"/command/{command}")
        assert response.status_code == 500 and response.json() == {"error": f"Parameter {command} not implemented."}
    # LiberTEM-live's sim answers a stream config write it does not know in plain text
    response = _put(partial, STREAM18 + "/config/format", "cbor")
    assert response.status_code == 500 and response.text == "Parameter format not implemented."
    response = _put(partial, V18 + "/config/photon_energy", 9000.0)
    assert response.status_code == 500 and response.json() == {"error": "Parameter photon_energy not implemented."}


def test_partial_profile_has_no_other_modules_or_api_versions(partial):
    for path in ("/filewriter/api/1.8.0/config/mode", "/monitor/api/1.8.0/config/mode",
                 "/system/api/1.8.0/status/uptime", "/detector/api/1.6.0/config/nimages",
                 V18 + "/config/threshold/1/energy"):
        assert _get(partial, path).status_code == 404, path
    assert _get(partial, "/detector/api/version/").json() == {"value": "1.8.0", "value_type": "string"}


def test_partial_profile_serves_what_an_acquisition_needs(partial):
    # no state machine to initialize: the configuration answers at once
    for key in ("x_pixels_in_detector", "y_pixels_in_detector", "bit_depth_image", "compression"):
        assert _get(partial, V18 + f"/config/{key}").status_code == 200, key
    for key, value in (("trigger_mode", "ints"), ("nimages", 3), ("ntrigger", 1), ("count_time", 0.0005),
                       ("frame_time", 0.001)):
        response = _put(partial, V18 + f"/config/{key}", value)
        assert response.status_code == 200, response.text
        assert _get(partial, V18 + f"/config/{key}").json()["value"] == value
    for key, value in (("mode", "enabled"), ("header_detail", "all")):
        assert _put(partial, STREAM18 + f"/config/{key}", value).status_code == 200
    assert _put(partial, V18 + "/command/arm").json() == {"sequence id": 1}
    assert _put(partial, V18 + "/command/trigger").json() == {}
    assert _put(partial, V18 + "/command/disarm").json() == {"sequence id": 1}
    for command in ("cancel", "abort", "initialize"):
        assert _put(partial, V18 + f"/command/{command}").status_code == 200, command


def test_partial_profile_streams_v1_with_the_header_split(partial):
    assert _get(partial, "/sim/api/config").json()["v1_framing"] == "split_header"
    messages = _acquire(partial, nimages=2)
    assert [len(m) for m in messages] == [1, 1, 4, 4, 1]  # dheader, config, 2 images, end
    assert _htype(messages[0][0]) == "dheader-1.0" and _htype(messages[-1][0]) == "dseries_end-1.0"


# ------------------------------------------------------------------------------------------------
# writes: same_value_only (LiberTEM-live's replaying sim takes only the value a key already has)


@pytest.mark.parametrize("simulator_name", ["full", "partial"])
def test_writes_same_value_only_refuses_other_values_with_500(simulator_name, request):
    simulator = request.getfixturevalue(simulator_name)
    assert _sim_config(simulator, writes="same_value_only").json()["writes"] == "same_value_only"
    assert _put(simulator, V18 + "/config/nimages", 1).status_code == 200
    refused = _put(simulator, V18 + "/config/nimages", 5)
    assert refused.status_code == 500
    assert refused.json() == {"error": "Value 5 for parameter nimages does not match the current value 1."}
    assert _put(simulator, STREAM18 + "/config/header_detail", "all").status_code == 500
    assert _get(simulator, V18 + "/config/nimages").json()["value"] == 1
    assert _put(simulator, V18 + "/config/nimages", "five").status_code == 400  # still a bad value
    assert _sim_config(simulator, writes="any").status_code == 200
    assert _put(simulator, V18 + "/config/nimages", 5).status_code == 200


def test_writes_setting_is_validated(full):
    response = _sim_config(full, writes="sometimes")
    assert response.status_code == 400 and "any, same_value_only" in response.text


# ------------------------------------------------------------------------------------------------
# stream v1 framings on the wire


def _htype(part: bytes) -> str | None:
    try:
        document = json.loads(part)
    except ValueError:  # UnicodeDecodeError included: a blob
        return None
    return document.get("htype") if isinstance(document, dict) else None


def _acquire(simulator: SimulatorServer, nimages: int) -> list[list[bytes]]:
    """Arm, trigger (ints), receive on a plain PULL socket until the end message; the messages
    exactly as ZeroMQ delivered them."""
    assert _put(simulator, V18 + "/config/nimages", nimages).status_code == 200
    context = zmq.Context()
    pull = context.socket(zmq.PULL)
    pull.setsockopt(zmq.LINGER, 0)
    pull.connect(f"tcp://127.0.0.1:{simulator.stream_port}")
    try:
        assert _put(simulator, V18 + "/command/arm").status_code == 200
        assert _put(simulator, V18 + "/command/trigger").status_code == 200
        messages: list[list[bytes]] = []
        while pull.poll(TIMEOUT_S * 1000):
            messages.append(pull.recv_multipart())
            if _htype(messages[-1][0]) == "dseries_end-1.0":
                return messages
        raise AssertionError(f"no end message within {TIMEOUT_S} s; received {len(messages)} messages")
    finally:
        pull.close()
        context.term()


def _comparable(part: bytes) -> object:
    """A part without what differs between two series of the same settings (ids, times)."""
    try:
        document = json.loads(part)
    except ValueError:
        return part  # blobs: byte for byte
    if not isinstance(document, dict):
        return part
    for key in ("series", "start_time", "stop_time", "data_collection_date"):
        document.pop(key, None)
    return document


HEADER_PARTS = {"none": 1, "basic": 2, "all": 8}


@pytest.mark.parametrize("header_detail", ["none", "basic", "all"])
@pytest.mark.parametrize("appendices", [False, True])
def test_v1_framings_keep_the_parts_and_change_only_the_message_boundaries(full, header_detail, appendices):
    nimages = 3
    stream = {"header_detail": header_detail, "header_appendix": "hdr-appendix" if appendices else "",
              "image_appendix": "img-appendix" if appendices else ""}
    for key, value in stream.items():
        assert _put(full, STREAM18 + f"/config/{key}", value).status_code == 200
    header_parts = HEADER_PARTS[header_detail] + appendices
    image_parts = 4 + appendices
    received = {}
    for framing in ("multipart", "split_header", "split_all"):
        assert _sim_config(full, v1_framing=framing, pacing="max").status_code == 200
        received[framing] = _acquire(full, nimages)

    assert [len(m) for m in received["multipart"]] == [header_parts] + [image_parts] * nimages + [1]
    assert [len(m) for m in received["split_header"]] == [1] * header_parts + [image_parts] * nimages + [1]
    assert [len(m) for m in received["split_all"]] == [1] * (header_parts + image_parts * nimages + 1)

    flat = {framing: [part for message in messages for part in message] for framing, messages in received.items()}
    expected = [_comparable(part) for part in flat["multipart"]]
    for framing in ("split_header", "split_all"):
        assert [_comparable(part) for part in flat[framing]] == expected, framing
    images = flat["split_all"][header_parts:-1]
    assert [_htype(p) for p in images[::image_parts]] == ["dimage-1.0"] * nimages
    assert [json.loads(p)["frame"] for p in images[::image_parts]] == list(range(nimages))
    if appendices:
        assert flat["split_header"][header_parts - 1] == b"hdr-appendix"
        assert images[image_parts - 1] == b"img-appendix"


def test_v1_framing_is_validated_and_leaves_stream_v2_alone(full):
    response = _sim_config(full, v1_framing="chunked")
    assert response.status_code == 400 and "multipart, split_header, split_all" in response.text
    assert _sim_config(full, v1_framing="split_all", pacing="max").status_code == 200
    assert _put(full, STREAM18 + "/config/format", "cbor").status_code == 200
    assert _put(full, V18 + "/config/nimages", 2).status_code == 200
    context = zmq.Context()
    pull = context.socket(zmq.PULL)
    pull.setsockopt(zmq.LINGER, 0)
    pull.connect(f"tcp://127.0.0.1:{full.stream2_port}")
    try:
        assert _put(full, V18 + "/command/arm").status_code == 200
        assert _put(full, V18 + "/command/trigger").status_code == 200
        messages = []
        while len(messages) < 4 and pull.poll(TIMEOUT_S * 1000):
            messages.append(pull.recv_multipart())
    finally:
        pull.close()
        context.term()
    assert [len(m) for m in messages] == [1, 1, 1, 1]  # start, 2 images, end: CBOR, one part each
    assert all(m[0].startswith(b"\xd9\xd9\xf7") for m in messages)


# ------------------------------------------------------------------------------------------------
# absurd scan sizes: HTTP 400 naming the limit, never a 500 MemoryError


def test_a_nav_shape_beyond_the_ground_truth_limit_is_refused(full):
    response = _sim_config(full, nav_shape=[100000, 100000])
    assert response.status_code == 400
    assert str(MAX_SCAN_POSITIONS) in response.text and "10000000000 scan positions" in response.text
    assert _get(full, "/sim/api/config").json()["nav_shape"] is None
    assert _sim_config(full, nav_shape=[8192, 8192]).status_code == 200  # the limit itself is fine


def test_a_series_whose_default_scan_is_too_large_is_refused_at_arm(full):
    # ARINA binned at 120 kHz: 10^10 images take under the 7-day limit, but the default scan of
    # 10^10 positions is beyond the simulator's ground truth
    for key, value in (("binning_mode", "2x2"), ("frame_time", 1 / 120000), ("nimages", 10 ** 10)):
        assert _put(full, V18 + f"/config/{key}", value).status_code == 200, key
    response = _put(full, V18 + "/command/arm")
    assert response.status_code == 400, response.text
    assert str(MAX_SCAN_POSITIONS) in response.text and "nimages x ntrigger = 10000000000" in response.text
    # with a nav_shape set the frames wrap around it, and the same series arms
    assert _sim_config(full, nav_shape=[64, 64]).status_code == 200
    assert _put(full, V18 + "/command/arm").status_code == 200
    assert _put(full, V18 + "/command/abort").status_code == 200


def test_more_images_than_the_model_allows_are_refused_at_arm(full):
    assert _put(full, V18 + "/config/nimages", MAX_IMAGES).status_code == 200
    assert _put(full, V18 + "/config/ntrigger", 2).status_code == 200
    response = _put(full, V18 + "/command/arm")
    assert response.status_code == 400 and str(MAX_IMAGES) in response.text
    assert _put(full, V18 + "/config/nimages", MAX_IMAGES + 1).status_code == 400
    assert _put(full, V18 + "/config/ntrigger", 1).status_code == 200
    assert _put(full, V18 + "/config/nimages", 10 ** 10).status_code == 200
    response = _put(full, V18 + "/command/arm")  # 10^10 frames of 1 ms: 115 days
    assert response.status_code == 400 and "7-day limit" in response.text
    assert _get(full, V18 + "/status/state").json()["value"] == "idle"


# ------------------------------------------------------------------------------------------------
# the command line


LISTENING = re.compile(r"listening: rest=(http://127\.0\.0\.1:\d+) ")


@pytest.mark.timeout(60)
def test_command_line_starts_the_partial_profile():
    process = subprocess.Popen([sys.executable, "-m", "sim", "--host", "127.0.0.1", "--port", "0",
                                "--stream-port", "0", "--stream2-port", "0", "--profile", "partial"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        match = LISTENING.match(process.stdout.readline())
        assert match
        rest_url = match.group(1)
        assert requests.get(rest_url + V18 + "/status/state", timeout=TIMEOUT_S).status_code == 404
        assert requests.get(rest_url + V18 + "/config/nimages", timeout=TIMEOUT_S).status_code == 200
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=20)
        assert process.returncode == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
