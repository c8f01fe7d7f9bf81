"""The simulator's SIMPLON REST side: URL grammar, JSON shapes, validation, state machine,
interdependencies, model presets (SIMPLON.md §1, §2, §6, §8 points 1-3)."""
from __future__ import annotations

import ast
import math
import re
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from sim.detector import new_ulid
from sim.models import MODELS, HC_EV_ANGSTROM, K_ALPHA1_EV
from sim.series import NullStreamSink, SeriesInfo
from sim.server import SimulatorServer

API = "1.8.0"
TIMEOUT = 10.0
READOUT = MODELS["QUADRO"].readout_time_s


class Dcu:
    """A tiny SIMPLON client for the tests (the project's real client is tested elsewhere)."""

    def __init__(self, base_url: str) -> None:
        self.base = base_url
        self.session = requests.Session()

    def url(self, module: str, task: str, key: str, version: str = API) -> str:
        return f"{self.base}/{module}/api/{version}/{task}/{key}"

    def get(self, key: str, task: str = "config", module: str = "detector") -> Any:
        response = self.session.get(self.url(module, task, key), timeout=TIMEOUT)
        assert response.status_code == 200, response.text
        return response.json()

    def value(self, key: str, task: str = "config", module: str = "detector") -> Any:
        return self.get(key, task, module)["value"]

    def put(self, key: str, value: Any, module: str = "detector") -> list[str]:
        response = self.session.put(self.url(module, "config", key), json={"value": value}, timeout=TIMEOUT)
        assert response.status_code == 200, response.text
        return response.json()

    def command(self, name: str, body: Any = None, module: str = "detector") -> Any:
        response = self.session.put(self.url(module, "command", name), json=body, timeout=TIMEOUT)
        assert response.status_code == 200, response.text
        return response.json()

    def state(self) -> str:
        return self.value("state", "status")

    def wait_for_state(self, state: str, timeout: float = TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while self.state() != state:
            assert time.monotonic() < deadline, f"detector did not reach {state!r} within {timeout} s"

    def close(self) -> None:
        self.session.close()


class RecordingSink(NullStreamSink):
    """Records what the state machine asks of a stream sender; keeps the Null sink's pacing."""

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self.calls: list[tuple[Any, ...]] = []
        self.sending = threading.Event()
        self.closed = False

    def start_series(self, series: SeriesInfo) -> None:
        with self._lock:
            self.calls.append(("start", series.series_id, series))

    def send_frames(self, series: SeriesInfo, first_frame: int, count: int, period_s: float,
                    stop: threading.Event) -> int:
        with self._lock:
            self.calls.append(("frames", series.series_id, first_frame, count, series.count_time,
                               time.monotonic()))
        self.sending.set()
        return super().send_frames(series, first_frame, count, period_s, stop)

    def end_series(self, series: SeriesInfo) -> None:
        with self._lock:
            self.calls.append(("end", series.series_id))

    def close(self) -> None:
        self.closed = True

    def frame_ranges(self, series_id: int) -> list[tuple[int, int]]:
        with self._lock:
            return [(call[2], call[3]) for call in self.calls if call[0] == "frames" and call[1] == series_id]

    def frame_call_times(self, series_id: int) -> list[float]:
        """Monotonic times at which the trigger source asked for each trigger's frames."""
        with self._lock:
            return [call[5] for call in self.calls if call[0] == "frames" and call[1] == series_id]

    def count(self, kind: str, series_id: int) -> int:
        with self._lock:
            return sum(1 for call in self.calls if call[0] == kind and call[1] == series_id)


@pytest.fixture
def dcu(simulator):
    """An initialized simulator (QUADRO unless parametrised) and a client for it."""
    client = Dcu(simulator.rest_url)
    client.command("initialize")
    yield client
    client.close()


@pytest.fixture
def recorded():
    """An initialized QUADRO simulator whose sink records every call."""
    sink = RecordingSink()
    with SimulatorServer(sink=sink) as server:
        client = Dcu(server.rest_url)
        client.command("initialize")
        yield client, sink
        client.close()
    assert sink.closed


def _fastest_frame_time() -> float:
    return MODELS["QUADRO"].full.rates.min_frame_time  # 1/4500 s: full frame at 16 bit


# ---------------------------------------------------------------------------------------------
# URL grammar, listings and JSON shapes


@pytest.mark.parametrize("path", ["/detector/api/version", "/detector/api/version/"])
def test_version_both_forms(simulator, path):
    response = requests.get(simulator.rest_url + path, timeout=TIMEOUT)
    assert response.status_code == 200
    assert response.json() == {"value": "1.8.0", "value_type": "string"}
    assert response.headers["Content-Type"] == "application/json; charset=utf-8"


def test_config_keys_list_the_detector_parameters_but_not_wavelength(dcu):
    keys = requests.get(dcu.url("detector", "config", "keys"), timeout=TIMEOUT).json()
    assert keys == sorted(keys)
    required = {"auto_summation", "beam_center_x", "beam_center_y", "bit_depth_image", "bit_depth_readout",
                "compression", "count_time", "countrate_correction_applied",
                "countrate_correction_count_cutoff", "data_collection_date", "description",
                "detector_distance", "detector_number", "detector_readout_time", "eiger_fw_version",
                "element", "flatfield_correction_applied", "frame_count_time", "frame_time",
                "incident_energy", "mask_to_zero", "nimages", "ntrigger", "number_of_excluded_pixels",
                "photon_energy", "pixel_mask_applied", "roi_mode", "sensor_material", "sensor_thickness",
                "software_version", "threshold_energy", "threshold/1/energy", "threshold/1/mode",
                "threshold/2/energy", "threshold/2/mode", "threshold/difference/mode", "trigger_mode",
                "trigger_start_delay", "virtual_pixel_correction_applied", "x_pixel_size", "y_pixel_size",
                "x_pixels_in_detector", "y_pixels_in_detector"}
    assert required <= set(keys)
    assert "wavelength" not in keys
    assert dcu.value("wavelength") == pytest.approx(HC_EV_ANGSTROM / dcu.value("photon_energy"))
    for key in keys:  # every listed key can be read
        assert "value" in dcu.get(key)


def test_status_and_command_keys(dcu):
    def listing(module: str, task: str, version: str = API) -> list[str]:
        response = requests.get(dcu.url(module, task, "keys", version), timeout=TIMEOUT)
        assert response.status_code == 200
        return response.json()

    detector_status = listing("detector", "status")
    assert {"state", "time", "temperature", "humidity", "high_voltage/state", "series_unique_id"} <= set(
        detector_status)
    assert "error" not in detector_status and dcu.value("error", "status") == []
    assert "error" not in listing("stream", "status") and dcu.value("error", "status", "stream") == []
    assert listing("stream", "config") == ["format", "header_appendix", "header_detail", "image_appendix", "mode"]
    assert set(listing("filewriter", "config")) == {"mode", "compression_enabled", "name_pattern",
                                                    "nimages_per_file", "image_nr_start", "format"}
    assert set(listing("filewriter", "status")) == {"state", "buffer_free", "files", "error"}
    assert set(listing("monitor", "config")) == {"mode", "buffer_size", "discard_new"}
    assert set(listing("monitor", "status")) == {"state", "buffer_free", "dropped", "error"}
    assert listing("detector", "command") == ["abort", "arm", "cancel", "disarm", "initialize", "trigger"]
    assert "status_update" in listing("detector", "command", "1.6.0")
    assert listing("stream", "command") == ["initialize"]
    assert listing("filewriter", "command") == ["clear", "initialize"]


def test_config_json_shapes(dcu):
    count_time = dcu.get("count_time")
    assert set(count_time) == {"value", "value_type", "access_mode", "unit", "min", "max"}
    assert (count_time["value_type"], count_time["access_mode"], count_time["unit"]) == ("float", "rw", "s")
    assert count_time["max"] == 3600.0
    assert count_time["min"] == pytest.approx(_fastest_frame_time() - READOUT)
    trigger_mode = dcu.get("trigger_mode")
    assert set(trigger_mode) == {"value", "value_type", "access_mode", "allowed_values"}
    assert trigger_mode["allowed_values"] == ["ints", "inte", "exts", "exte"]
    assert trigger_mode["value"] == "ints"
    width = dcu.get("x_pixels_in_detector")
    assert (width["value"], width["value_type"], width["access_mode"]) == (512, "uint", "r")
    assert dcu.get("auto_summation") == {"value": True, "value_type": "bool", "access_mode": "rw"}
    assert dcu.get("compression")["value"] == "bslz4"
    assert dcu.get("threshold/1/energy")["unit"] == "eV"
    assert (dcu.value("nimages"), dcu.value("ntrigger")) == (1, 1)
    assert dcu.get("mode", module="stream")["value"] == "enabled"
    assert dcu.value("format", module="stream") == "legacy"
    assert dcu.value("header_detail", module="stream") == "basic"
    assert dcu.get("header_detail", module="stream")["allowed_values"] == ["all", "basic", "none"]


def test_status_json_shapes(dcu):
    state = dcu.get("state", "status")
    assert state["value"] == "idle" and state["state"] == "normal"
    assert state["critical_values"] == ["na", "error"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", state["time"])
    temperature = dcu.get("temperature", "status")
    assert set(temperature) == {"value", "value_type", "unit", "time", "state", "critical_limits"}
    low, high = temperature["critical_limits"]
    assert low < temperature["value"] < high and temperature["state"] == "normal"
    assert dcu.value("high_voltage/state", "status") == "READY"
    assert dcu.value("state", "status", "stream") == "ready"
    assert dcu.value("dropped", "status", "stream") == 0
    assert dcu.value("files", "status", "filewriter") == []
    assert dcu.value("buffer_free", "status", "monitor") == 100


def test_before_initialize_only_the_state_exists(simulator):
    client = Dcu(simulator.rest_url)
    try:
        assert client.get("state", "status")["value"] == "na"
        for url in (client.url("detector", "config", "count_time"), client.url("detector", "status", "temperature"),
                    client.url("stream", "config", "mode")):
            response = requests.get(url, timeout=TIMEOUT)
            assert response.status_code == 404
            assert response.text.startswith("Parameter ") and response.text.endswith(" does not exist")
        response = requests.get(client.url("detector", "config", "count_time"), timeout=TIMEOUT)
        assert response.text == "Parameter count_time does not exist"
        response = requests.put(client.url("detector", "config", "count_time"), json={"value": 0.1}, timeout=TIMEOUT)
        assert (response.status_code, response.text) == (400, "detector is not initialized")
        response = requests.put(client.url("detector", "command", "arm"), timeout=TIMEOUT)
        assert response.status_code == 400 and "not initialized" in response.text
    finally:
        client.close()


def test_keys_with_slashes_read_and_write(dcu):
    assert dcu.put("threshold/2/mode", "enabled") == ["threshold/2/mode", "threshold/difference/mode"]
    assert dcu.put("threshold/difference/mode", "enabled") == ["threshold/difference/mode"]
    assert dcu.value("threshold/difference/mode") == "enabled"
    # disabling a threshold takes the difference mode with it
    dcu.put("threshold/2/mode", "disabled")
    assert dcu.value("threshold/difference/mode") == "disabled"


# ---------------------------------------------------------------------------------------------
# Bad requests: every one is refused with 400/404/405 and a plain-text reason, never a 500

BAD_REQUESTS = [
    # (method, path, json body, status, text the answer must contain)
    ("GET", "/detector/api/1.8.0/config/no_such_key", None, 404, "Parameter no_such_key does not exist"),
    ("PUT", "/detector/api/1.8.0/config/no_such_key", {"value": 1}, 404, "no_such_key"),
    ("GET", "/detector/api/1.8.0/status/no_such_key", None, 404, "no_such_key"),
    ("PUT", "/detector/api/1.8.0/config/count_time", {"value": True}, 400, "count_time: true is not"),
    ("PUT", "/detector/api/1.8.0/config/count_time", {"value": "fast"}, 400, 'count_time: "fast" is not'),
    ("PUT", "/detector/api/1.8.0/config/nimages", {"value": "10"}, 400, 'nimages: "10" is not a whole number'),
    ("PUT", "/detector/api/1.8.0/config/nimages", {"value": 2.5}, 400, "nimages: 2.5 is not a whole number"),
    ("PUT", "/detector/api/1.8.0/config/nimages", {"value": -3}, 400, "nimages: -3"),
    ("PUT", "/detector/api/1.8.0/config/nimages", {"value": 0}, 400, "nimages: 0 is below the minimum 1"),
    ("PUT", "/detector/api/1.8.0/config/auto_summation", {"value": 1}, 400, "auto_summation: 1 is not a bool"),
    ("PUT", "/detector/api/1.8.0/config/count_time", {"value": 5000.0}, 400,
     "count_time: 5000.0 is above the maximum 3600.0 s"),
    ("PUT", "/detector/api/1.8.0/config/frame_time", {"value": 1e-6}, 400,
     "frame_time: 1e-06 is below the minimum 0.000222"),
    ("PUT", "/detector/api/1.8.0/config/photon_energy", {"value": 1.0}, 400,
     "photon_energy: 1.0 is below the minimum 30000.0 eV"),
    ("PUT", "/detector/api/1.8.0/config/trigger_mode", {"value": "extg"}, 400,
     'trigger_mode: "extg" is not one of the allowed values "ints", "inte", "exts", "exte"'),
    ("PUT", "/detector/api/1.8.0/config/compression", {"value": "gzip"}, 400, '"gzip" is not one of'),
    ("PUT", "/detector/api/1.8.0/config/roi_mode", {"value": "4M"}, 400, "roi_mode"),
    ("PUT", "/detector/api/1.8.0/config/x_pixels_in_detector", {"value": 100}, 400,
     "x_pixels_in_detector: read-only parameter, cannot be set to 100"),
    ("PUT", "/detector/api/1.8.0/config/description", {"value": "mine"}, 400, "description: read-only"),
    ("PUT", "/detector/api/1.8.0/config/roi_y_size", {"value": 7}, 400, "roi_y_size: 7 is odd"),
    ("PUT", "/detector/api/1.8.0/config/threshold/difference/mode", {"value": "enabled"}, 400,
     "threshold/2/mode"),
    ("PUT", "/detector/api/1.8.0/config/count_time", {"wrong": 1}, 400, 'the body must be a JSON object {"value"'),
    ("PUT", "/detector/api/1.8.0/config/count_time", [0.1], 400, "the body must be a JSON object"),
    ("PUT", "/detector/api/1.8.0/status/state", {"value": "idle"}, 405, "use GET"),
    ("GET", "/detector/api/1.8.0/command/arm", None, 405, "use PUT"),
    ("DELETE", "/detector/api/1.8.0/config/count_time", None, 405, "DELETE is not supported"),
    ("GET", "/detector/api/1.7.0/config/count_time", None, 400, "unsupported API version 1.7.0"),
    ("PUT", "/detector/api/2.0.0/command/arm", None, 400, "unsupported API version 2.0.0"),
    ("PUT", "/detector/api/1.8.0/command/fly", None, 404, "no command 'fly'"),
    ("PUT", "/detector/api/1.8.0/command/status_update", None, 404, "status_update"),
    ("PUT", "/stream/api/1.8.0/command/arm", None, 404, "stream has no command 'arm'"),
    ("PUT", "/detector/api/1.8.0/command/trigger", None, 400, "trigger: the detector is idle, not armed"),
    ("PUT", "/detector/api/1.8.0/command/trigger", [1], 400, "a command body must be empty or a JSON object"),
    ("GET", "/nosuchmodule/api/1.8.0/config/mode", None, 404, 'unknown module "nosuchmodule"'),
    ("GET", "/detector/api/1.8.0/files/x", None, 404, 'task "files" does not exist'),
    ("GET", "/detector/api/1.8.0/config", None, 404, "no parameter named"),
    ("GET", "/index.html", None, 404, "unknown path"),
    ("PUT", "/sim/api/config", {"ext_trigger_delay_s": -1}, 400, "ext_trigger_delay_s: -1 is not a number"),
    ("PUT", "/sim/api/config", {"frame_source": "x"}, 400, "unknown simulator setting(s) frame_source"),
    ("PUT", "/sim/api/config", [1, 2], 400, "must be a JSON object"),
]


@pytest.mark.parametrize("method, path, body, status, text", BAD_REQUESTS,
                         ids=[f"{m} {p} {b}" for m, p, b, _, _ in BAD_REQUESTS])
def test_bad_requests_are_refused_with_a_readable_reason(dcu, method, path, body, status, text):
    response = requests.request(method, dcu.base + path, json=body, timeout=TIMEOUT)
    assert response.status_code == status, response.text
    assert text in response.text
    assert response.headers["Content-Type"].startswith("text/plain")
    assert "Traceback" not in response.text


@pytest.mark.parametrize("raw", [b"{not json", b'{"value": NaN}', b'{"value": Infinity}', b"\xff\xfe"])
def test_malformed_bodies_are_400(dcu, raw):
    response = requests.put(dcu.url("detector", "config", "count_time"), data=raw,
                            headers={"Content-Type": "application/json"}, timeout=TIMEOUT)
    assert response.status_code == 400
    assert "body" in response.text


def test_a_refused_write_changes_nothing(dcu):
    before = dcu.value("count_time")
    requests.put(dcu.url("detector", "config", "count_time"), json={"value": 5000.0}, timeout=TIMEOUT)
    assert dcu.value("count_time") == before


# ---------------------------------------------------------------------------------------------
# State machine


def test_arm_increments_the_series_id_and_initialize_resets_it(recorded):
    dcu, sink = recorded
    assert dcu.command("arm") == {"sequence id": 1}
    assert dcu.state() == "ready"
    assert dcu.value("state", "status", "stream") == "acquire"
    unique_id = dcu.value("series_unique_id", "status")
    assert re.fullmatch(r"[0-9A-HJKMNP-TV-Z]{26}", unique_id)
    assert dcu.value("data_collection_date")
    response = requests.put(dcu.url("detector", "command", "arm"), timeout=TIMEOUT)
    assert response.status_code == 400 and "arm: the detector is ready, not idle" in response.text
    assert dcu.command("disarm") == {"sequence id": 1}
    assert dcu.state() == "idle" and dcu.value("state", "status", "stream") == "ready"
    assert dcu.command("arm") == {"sequence id": 2}
    assert dcu.value("series_unique_id", "status") != unique_id
    assert dcu.command("abort") == {"sequence id": 2}
    assert dcu.command("initialize") == {}
    assert dcu.command("arm") == {"sequence id": 1}
    assert dcu.command("cancel") == {"sequence id": 1}
    assert [sink.count("end", n) for n in (1, 2)] == [2, 1]  # series id 1 was used twice
    started = [call[2] for call in sink.calls if call[0] == "start"]
    assert [info.series_id for info in started] == [1, 2, 1]
    info = started[0]
    assert (info.width, info.height, info.compression, info.trigger_mode) == (512, 512, "bslz4", "ints")
    assert info.series_unique_id == unique_id and info.stream_enabled
    assert info.detector_config["count_time"] == info.count_time


def test_disarm_when_idle_answers_the_last_series_id(dcu):
    assert dcu.command("disarm") == {"sequence id": 0}
    assert dcu.state() == "idle"


def test_ints_each_trigger_sends_nimages_frames_continuously(recorded):
    dcu, sink = recorded
    dcu.put("frame_time", _fastest_frame_time())
    dcu.put("nimages", 3)
    dcu.put("ntrigger", 2)
    series_id = dcu.command("arm")["sequence id"]
    assert dcu.command("trigger") == {}  # blocks until the 3 frames are sent
    assert sink.frame_ranges(series_id) == [(0, 3)]
    assert dcu.state() == "ready" and sink.count("end", series_id) == 0
    dcu.command("trigger")
    assert sink.frame_ranges(series_id) == [(0, 3), (3, 3)]
    assert dcu.state() == "idle"  # auto-disarm after the last trigger
    assert sink.count("end", series_id) == 1
    assert dcu.command("disarm") == {"sequence id": series_id}
    assert sink.count("end", series_id) == 1  # still exactly once
    assert dcu.value("state", "status", "stream") == "ready"


def test_inte_each_trigger_is_one_frame_with_its_own_count_time(recorded):
    dcu, sink = recorded
    assert dcu.put("trigger_mode", "inte") == ["nimages", "trigger_mode"]
    dcu.put("ntrigger", 3)
    series_id = dcu.command("arm")["sequence id"]
    dcu.command("trigger", {"value": 0.002})
    dcu.command("trigger")
    response = requests.put(dcu.url("detector", "command", "trigger"), json={"value": 9999.0}, timeout=TIMEOUT)
    assert response.status_code == 400 and "count_time: 9999.0 is above the maximum" in response.text
    dcu.command("trigger", {})
    assert sink.frame_ranges(series_id) == [(0, 1), (1, 1), (2, 1)]
    exposures = [call[4] for call in sink.calls if call[0] == "frames"]
    assert exposures[0] == 0.002 and exposures[1] == dcu.value("count_time")
    assert dcu.state() == "idle" and sink.count("end", series_id) == 1


def test_nimages_must_be_one_in_inte(dcu):
    dcu.put("nimages", 5)
    assert dcu.put("trigger_mode", "exte") == ["nimages", "trigger_mode"]
    assert dcu.value("nimages") == 1
    response = requests.put(dcu.url("detector", "config", "nimages"), json={"value": 4}, timeout=TIMEOUT)
    assert response.status_code == 400 and "nimages: 4 is not allowed in trigger mode exte" in response.text


@pytest.mark.parametrize("mode, nimages, expected", [
    ("exts", 2, [(0, 2), (2, 2), (4, 2)]),
    ("exte", 1, [(0, 1), (1, 1), (2, 1)]),
])
def test_external_trigger_modes_run_by_themselves(recorded, mode, nimages, expected):
    dcu, sink = recorded
    dcu.put("frame_time", _fastest_frame_time())
    dcu.put("trigger_mode", mode)
    dcu.put("nimages", nimages)
    dcu.put("ntrigger", 3)
    series_id = dcu.command("arm")["sequence id"]
    dcu.wait_for_state("idle")
    assert sink.frame_ranges(series_id) == expected
    assert sink.count("end", series_id) == 1
    assert dcu.command("disarm") == {"sequence id": series_id}
    assert sink.count("end", series_id) == 1


def test_external_trigger_period_spaces_the_triggers(recorded):
    """ext_trigger_period_s: trigger k comes no earlier than k periods after the arm."""
    dcu, sink = recorded
    dcu.put("frame_time", _fastest_frame_time())
    dcu.put("trigger_mode", "exte")
    dcu.put("ntrigger", 3)
    response = requests.put(dcu.base + "/sim/api/config", json={"ext_trigger_period_s": 0.1}, timeout=TIMEOUT)
    assert response.status_code == 200, response.text
    before_arm = time.monotonic()
    series_id = dcu.command("arm")["sequence id"]
    dcu.wait_for_state("idle")
    assert sink.frame_ranges(series_id) == [(0, 1), (1, 1), (2, 1)]
    times = sink.frame_call_times(series_id)
    assert all(t - before_arm >= k * 0.1 for k, t in enumerate(times))


@pytest.mark.timeout(60)
def test_external_trigger_delay_and_no_software_trigger(recorded):
    dcu, sink = recorded
    dcu.put("trigger_mode", "exts")
    response = requests.put(dcu.base + "/sim/api/config", json={"ext_trigger_delay_s": 600}, timeout=TIMEOUT)
    assert response.status_code == 200 and response.json() == {"ext_trigger_delay_s": 600}
    assert requests.get(dcu.base + "/sim/api/config", timeout=TIMEOUT).json() == {
        "ext_trigger_delay_s": 600.0, "ext_trigger_period_s": None, "writes": "any"}
    series_id = dcu.command("arm")["sequence id"]
    response = requests.put(dcu.url("detector", "command", "trigger"), timeout=TIMEOUT)
    assert response.status_code == 400 and "not allowed in trigger mode exts" in response.text
    assert dcu.state() == "ready"
    assert dcu.command("disarm") == {"sequence id": series_id}  # ends the waiting trigger source
    assert sink.frame_ranges(series_id) == [] and sink.count("end", series_id) == 1
    assert dcu.state() == "idle"


def _trigger_in_background(dcu: Dcu) -> tuple[threading.Thread, list[requests.Response]]:
    answers: list[requests.Response] = []
    thread = threading.Thread(
        target=lambda: answers.append(requests.put(dcu.url("detector", "command", "trigger"), timeout=60)))
    thread.start()
    return thread, answers


@pytest.mark.timeout(60)
@pytest.mark.parametrize("stop_command", ["disarm", "cancel", "abort"])
def test_stop_commands_end_a_running_ints_series(recorded, stop_command):
    dcu, sink = recorded
    dcu.put("count_time", 0.01)
    dcu.put("nimages", 100_000)  # 1000 s unless stopped
    series_id = dcu.command("arm")["sequence id"]
    thread, answers = _trigger_in_background(dcu)
    try:
        assert sink.sending.wait(TIMEOUT)
        assert dcu.state() == "acquire"
        busy = requests.put(dcu.url("detector", "command", "trigger"), timeout=TIMEOUT)
        assert busy.status_code == 400 and "still being taken" in busy.text
        assert dcu.command(stop_command) == {"sequence id": series_id}
    finally:
        thread.join(TIMEOUT)
    assert not thread.is_alive() and answers[0].status_code == 200
    assert dcu.state() == "idle"
    assert sink.count("end", series_id) == 1
    assert dcu.command("arm") == {"sequence id": series_id + 1}  # ready for the next series


@pytest.mark.timeout(60)
def test_abort_ends_a_running_external_series(recorded):
    dcu, sink = recorded
    dcu.put("count_time", 0.01)
    dcu.put("trigger_mode", "exts")
    dcu.put("nimages", 100_000)
    series_id = dcu.command("arm")["sequence id"]
    assert sink.sending.wait(TIMEOUT)
    assert dcu.command("abort") == {"sequence id": series_id}
    assert dcu.state() == "idle" and sink.count("end", series_id) == 1


@pytest.mark.timeout(60)
def test_stopping_the_server_ends_a_running_series():
    sink = RecordingSink()
    server = SimulatorServer(sink=sink).start()
    dcu = Dcu(server.rest_url)
    try:
        dcu.command("initialize")
        dcu.put("count_time", 0.01)
        dcu.put("nimages", 100_000)
        dcu.command("arm")
        thread, answers = _trigger_in_background(dcu)
        assert sink.sending.wait(TIMEOUT)
    finally:
        server.stop()
        server.stop()  # idempotent
        dcu.close()
    thread.join(TIMEOUT)
    assert not thread.is_alive()
    assert sink.count("end", 1) == 1 and sink.closed
    with pytest.raises(requests.ConnectionError):
        requests.get(server.rest_url + "/detector/api/version", timeout=TIMEOUT)


def test_detector_config_is_locked_while_armed(dcu):
    dcu.command("arm")
    response = requests.put(dcu.url("detector", "config", "count_time"), json={"value": 0.1}, timeout=TIMEOUT)
    assert response.status_code == 400 and "count_time: cannot be changed while the detector is ready" in response.text
    dcu.command("disarm")
    dcu.put("count_time", 0.1)


def test_arm_refuses_a_series_longer_than_a_week(dcu):
    dcu.put("count_time", 10.0)
    dcu.put("nimages", 100_000)
    response = requests.put(dcu.url("detector", "command", "arm"), timeout=TIMEOUT)
    assert response.status_code == 400 and "7-day limit" in response.text
    assert dcu.state() == "idle"


def test_module_commands(dcu):
    dcu.put("mode", "enabled", module="monitor")
    assert dcu.command("initialize", module="stream") == {}
    assert dcu.value("mode", module="stream") == "disabled"
    assert dcu.value("state", "status", "stream") == "disabled"
    assert dcu.put("mode", "enabled", module="stream") == ["mode"]
    assert dcu.value("state", "status", "stream") == "ready"
    assert dcu.put("mode", "enabled", module="filewriter") == ["mode"]
    assert dcu.value("state", "status", "filewriter") == "ready"
    assert dcu.command("clear", module="filewriter") == {}
    assert dcu.put("buffer_size", 20, module="monitor") == ["buffer_size"]
    assert dcu.command("clear", module="monitor") == {}
    assert dcu.value("buffer_free", "status", "monitor") == 20


def test_api_1_6_paths_and_status_update(dcu):
    response = requests.get(dcu.url("detector", "config", "count_time", "1.6.0"), timeout=TIMEOUT)
    assert response.status_code == 200 and response.json()["unit"] == "s"
    response = requests.put(dcu.url("detector", "command", "status_update", "1.6.0"), timeout=TIMEOUT)
    assert response.status_code == 200


# ---------------------------------------------------------------------------------------------
# Interdependencies and change lists

TIMING_CHANGES = ["bit_depth_image", "bit_depth_readout", "count_time", "countrate_correction_count_cutoff",
                  "frame_count_time", "frame_time"]
ENERGY_CHANGES = ["element", "incident_energy", "photon_energy", "threshold/1/energy", "threshold/2/energy",
                  "threshold_energy", "wavelength"]


def test_count_time_above_frame_time_moves_frame_time(dcu):
    assert dcu.put("count_time", 0.5) == TIMING_CHANGES
    assert dcu.value("frame_time") == pytest.approx(0.5 + READOUT)
    assert dcu.value("bit_depth_image") == 32
    # long exposures are auto-summed from sub-frames no longer than the 32-bit frame period
    sub_frame = 1.0 / 1000
    assert dcu.value("frame_count_time") <= sub_frame
    assert dcu.value("frame_count_time") * math.ceil(0.5 / sub_frame) == pytest.approx(0.5)


def test_frame_time_below_count_time_moves_count_time(dcu):
    dcu.put("count_time", 0.5)
    assert dcu.put("frame_time", _fastest_frame_time()) == TIMING_CHANGES
    assert dcu.value("count_time") == pytest.approx(_fastest_frame_time() - READOUT)
    assert dcu.value("frame_count_time") == dcu.value("count_time")
    assert dcu.value("bit_depth_image") == 16
    assert dcu.value("countrate_correction_count_cutoff") <= 2 ** 16


def test_bit_depth_needs_auto_summation_for_32_bit(dcu):
    dcu.put("count_time", 0.5)
    assert dcu.value("bit_depth_image") == 32
    assert dcu.put("auto_summation", False) == ["auto_summation", "bit_depth_image", "frame_count_time"]
    assert dcu.value("bit_depth_image") == 16
    assert dcu.value("frame_count_time") == 0.5


def test_photon_energy_sets_wavelength_and_thresholds(dcu):
    assert dcu.put("photon_energy", 100_000.0) == ENERGY_CHANGES
    assert dcu.value("wavelength") == pytest.approx(HC_EV_ANGSTROM / 100_000.0)
    assert dcu.value("threshold/1/energy") == dcu.value("threshold_energy") == 50_000.0
    assert dcu.value("threshold/2/energy") == pytest.approx(140_000.0)
    assert dcu.value("incident_energy") == 100_000.0
    assert dcu.value("element") == ""


def test_wavelength_sets_the_photon_energy(dcu):
    assert dcu.put("wavelength", 0.1) == ENERGY_CHANGES
    assert dcu.value("photon_energy") == pytest.approx(HC_EV_ANGSTROM / 0.1)
    assert dcu.value("threshold/1/energy") == pytest.approx(0.5 * HC_EV_ANGSTROM / 0.1)


def test_threshold_energy_is_threshold_1(dcu):
    assert dcu.put("threshold_energy", 60_000.0) == ["threshold/1/energy", "threshold_energy"]
    assert dcu.value("threshold/1/energy") == 60_000.0
    dcu.put("threshold/1/energy", 70_000.0)
    assert dcu.value("threshold_energy") == 70_000.0


@pytest.mark.parametrize("simulator", ["EIGER2_500K"], indirect=True)
def test_element_sets_the_k_alpha_energy(dcu):
    assert "Cu" in dcu.get("element")["allowed_values"]
    assert dcu.put("element", "Mo") == ENERGY_CHANGES
    assert dcu.value("photon_energy") == K_ALPHA1_EV["Mo"]
    assert dcu.value("element") == "Mo"
    dcu.put("photon_energy", 9000.0)
    assert dcu.value("element") == ""


def test_roi_mode_resets_timing_and_geometry(dcu):
    dcu.put("count_time", 0.5)
    dcu.put("roi_y_size", 128)
    changed = dcu.put("roi_mode", "lines")
    assert {"roi_mode", "count_time", "frame_time", "x_pixels_in_detector", "y_pixels_in_detector"} <= set(changed)
    assert changed == sorted(changed)
    assert (dcu.value("x_pixels_in_detector"), dcu.value("y_pixels_in_detector")) == (512, 128)
    assert dcu.value("count_time") < 0.5
    assert dcu.get("frame_time")["min"] == pytest.approx(1 / 18000)
    dcu.put("frame_time", 1 / 18000)
    assert dcu.value("bit_depth_image") == 8
    dcu.put("roi_mode", "disabled")
    assert dcu.value("y_pixels_in_detector") == 512
    assert dcu.value("frame_time") >= dcu.get("frame_time")["min"] == pytest.approx(1 / 4500)


# ---------------------------------------------------------------------------------------------
# Model presets

@pytest.mark.parametrize("simulator, description, size, min_frame_time", [
    ("QUADRO", "Dectris QUADRO Si 250K", (512, 512), 1 / 4500),
    ("ARINA", "Dectris ARINA Si 36K", (192, 192), 1 / 30000),
    ("EIGER2_500K", "Dectris EIGER2 Si 500K", (1028, 512), 1 / 2250),
    ("EIGER2_1M", "Dectris EIGER2 Si 1M", (1028, 1062), 1 / 2250),
    ("EIGER2_16M", "Dectris EIGER2 Si 16M", (4148, 4362), 1 / 133),
], indirect=["simulator"])
def test_model_presets(dcu, simulator, description, size, min_frame_time):
    assert dcu.value("description") == description
    assert (dcu.value("x_pixels_in_detector"), dcu.value("y_pixels_in_detector")) == size
    assert dcu.get("frame_time")["min"] == pytest.approx(min_frame_time)
    assert dcu.value("x_pixel_size") == 75e-6 and dcu.value("sensor_material") == "Si"
    assert dcu.value("detector_readout_time") == simulator.model.readout_time_s
    dcu.put("frame_time", min_frame_time)
    assert dcu.value("bit_depth_image") in (8, 16)
    dcu.put("frame_time", 1.0)
    assert dcu.value("bit_depth_image") == 32


@pytest.mark.parametrize("simulator", ["ARINA"], indirect=True)
@pytest.mark.parametrize("key, value", [("binning_mode", "2x2"), ("roi_mode", "merge2x2")])
def test_arina_binning_halves_the_frame(dcu, key, value):
    assert {"binning_mode", "pixel_format"} <= set(
        requests.get(dcu.url("detector", "config", "keys"), timeout=TIMEOUT).json())
    assert "x_pixels_in_detector" in dcu.put(key, value)
    assert (dcu.value("x_pixels_in_detector"), dcu.value("y_pixels_in_detector")) == (96, 96)
    assert dcu.get("frame_time")["min"] == pytest.approx(1 / 120000)
    dcu.put("frame_time", 1 / 120000)
    assert dcu.value("bit_depth_image") == 8
    dcu.put(key, "disabled")
    assert (dcu.value("x_pixels_in_detector"), dcu.value("y_pixels_in_detector")) == (192, 192)


@pytest.mark.parametrize("simulator", ["ARINA"], indirect=True)
def test_arina_pixel_format_forces_the_bit_depth(dcu):
    assert dcu.put("pixel_format", "uint16") == ["bit_depth_image", "pixel_format"]
    assert dcu.value("bit_depth_image") == 16


def test_frame_rate_limits_come_from_the_model_table():
    for model in MODELS.values():
        for geometry in (model.full, *model.roi_geometries.values()):
            rates = geometry.rates.max_rate_hz
            assert geometry.rates.min_frame_time == pytest.approx(1 / max(rates.values()))
            for depth, rate in rates.items():
                assert geometry.rates.bit_depth(1 / rate, auto_summation=True) >= depth


def test_unknown_model_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown detector model 'PILATUS'; choose one of QUADRO"):
        SimulatorServer(model="PILATUS")


# ---------------------------------------------------------------------------------------------
# Independence and identifiers


def test_ulid_is_26_crockford_characters_and_time_ordered():
    first, second = new_ulid(), new_ulid()
    assert re.fullmatch(r"[0-9A-HJKMNP-TV-Z]{26}", first)
    assert first != second
    assert first[:10] <= second[:10]


def test_sim_imports_nothing_from_the_product():
    sim_dir = Path(__file__).resolve().parents[1] / "sim"
    for source in sim_dir.glob("*.py"):
        for node in ast.walk(ast.parse(source.read_text(), str(source))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            assert not any(name.split(".")[0] == "tango_dectris_live" for name in names), source.name


class FailingSink(NullStreamSink):
    """A sink whose sender breaks, to check the handler edge."""

    def send_frames(self, series: SeriesInfo, first_frame: int, count: int, period_s: float,
                    stop: threading.Event) -> int:
        raise RuntimeError("frame generator broke\nsecond line")


def test_an_unexpected_error_is_a_logged_one_line_500(caplog):
    with SimulatorServer(sink=FailingSink()) as server:
        dcu = Dcu(server.rest_url)
        try:
            dcu.command("initialize")
            dcu.command("arm")
            response = requests.put(dcu.url("detector", "command", "trigger"), timeout=TIMEOUT)
            assert response.status_code == 500
            assert response.text == "internal simulator error: RuntimeError: frame generator broke second line"
            assert dcu.state() == "idle"  # it was the only trigger: the series still ended
        finally:
            dcu.close()
    assert "unexpected error on PUT /detector/api/1.8.0/command/trigger" in caplog.text


def test_head_on_an_unknown_file_is_404(dcu):
    response = requests.head(dcu.base + "/data/series_1_master.h5", timeout=TIMEOUT)
    assert response.status_code == 404 and response.text == ""
