"""DetectorClient and ParameterInfo: unit tests on plain dicts, protocol tests against the simulator,
and transport failures against tiny local HTTP servers written here."""
from __future__ import annotations

import http.server
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator

import numpy as np
import pytest

from tango_dectris_live.simplon import (
    DcuConnectionError,
    DcuRequestError,
    DcuTimeoutError,
    DetectorClient,
    DetectorNotInitializedError,
    InvalidValueError,
    NotAllowedValueError,
    OutOfRangeError,
    ParameterInfo,
    ReadOnlyParameterError,
    SimplonError,
    Timeouts,
    UnknownParameterError,
    WrongTypeError,
    is_image_parameter,
)

# SIMPLON.md §1.3 / §1.4 examples, as a DCU sends them.
COUNT_TIME = {"min": 0.01818171818181818, "max": 3600, "value": 0.5, "value_type": "float",
              "access_mode": "rw", "unit": "s"}
TRIGGER_MODE = {"access_mode": "rw", "value_type": "string", "value": "exts",
                "allowed_values": ["ints", "exts", "inte", "exte"]}
X_PIXELS = {"max": 4294967295, "access_mode": "r", "value_type": "uint", "value": 1030, "min": 0}
STATE = {"value": "idle", "state": "normal", "value_type": "string", "critical_limits": [None, None],
         "time": "2019-07-29T18:24:34.755835", "unit": "", "critical_values": ["na", "error"]}


# ------------------------------------------------------------------------------------------------
# ParameterInfo on plain dicts


def test_float_parameter_with_unit_and_limits() -> None:
    info = ParameterInfo.from_response("detector", "config", "count_time", COUNT_TIME)
    assert (info.value_type, info.unit, info.min, info.max) == ("float", "s", 0.01818171818181818, 3600)
    assert info.python_type is float and info.readable and info.writable and not info.is_array
    coerced = info.validate(2)
    assert coerced == 2.0 and type(coerced) is float
    assert type(info.validate(np.float32(1.5))) is float


@pytest.mark.parametrize("value, words", [(5000.0, ["above", "maximum 3600 s"]), (0.001, ["below", "minimum 0.0181817 s"])])
def test_out_of_range_names_key_value_and_limit_with_unit(value: float, words: list[str]) -> None:
    info = ParameterInfo.from_response("detector", "config", "count_time", COUNT_TIME)
    with pytest.raises(OutOfRangeError) as caught:
        info.validate(value)
    message = str(caught.value)
    assert "detector/config/count_time" in message and f"{value:g}" in message
    for word in words:
        assert word in message


def test_enum_parameter_refuses_values_not_allowed() -> None:
    info = ParameterInfo.from_response("detector", "config", "trigger_mode", TRIGGER_MODE)
    assert info.allowed_values == ("ints", "exts", "inte", "exte") and info.python_type is str
    assert info.validate("ints") == "ints"
    with pytest.raises(NotAllowedValueError) as caught:
        info.validate("internal")
    assert "'internal'" in str(caught.value) and "'ints', 'exts', 'inte', 'exte'" in str(caught.value)


def test_read_only_uint_is_refused_client_side() -> None:
    info = ParameterInfo.from_response("detector", "config", "x_pixels_in_detector", X_PIXELS)
    assert info.python_type is int and info.readable and not info.writable
    with pytest.raises(ReadOnlyParameterError, match="x_pixels_in_detector is read-only"):
        info.validate(512)


def test_missing_access_mode_means_read_write_for_config_and_read_only_for_status() -> None:
    config = ParameterInfo.from_response("detector", "config", "photon_energy", {"value": 8000.0, "value_type": "float"})
    status = ParameterInfo.from_response("detector", "status", "state", STATE)
    assert config.access_mode == "rw" and config.writable
    assert status.readable and not status.writable


@pytest.mark.parametrize("value_type, value", [
    ("float", "fast"), ("float", True), ("uint", 2.5), ("int", "3"), ("bool", 1), ("string", 3), ("float[]", 1.0),
])
def test_wrong_type_is_refused_client_side(value_type: str, value: object) -> None:
    info = ParameterInfo("detector", "config", "some_key", value_type=value_type)
    with pytest.raises(WrongTypeError, match=f"detector/config/some_key takes .*{re.escape(value_type)}"):
        info.validate(value)


def test_coercions_and_implicit_uint_minimum() -> None:
    uint = ParameterInfo("detector", "config", "nimages", value_type="uint")
    assert uint.validate(3.0) == 3 and type(uint.validate(np.int64(4))) is int
    with pytest.raises(OutOfRangeError, match="below the minimum 0"):
        uint.validate(-1)
    with pytest.raises(OutOfRangeError, match="not a finite number"):
        ParameterInfo("detector", "config", "beam_center_x", value_type="float").validate(float("nan"))
    axis = ParameterInfo("detector", "config", "omega_axis", value_type="float[]")
    assert axis.is_array and axis.python_type is list
    assert axis.validate(np.array([0, 1, 0])) == [0.0, 1.0, 0.0]
    assert ParameterInfo("detector", "config", "transformation_order", value_type="list").validate(("a", "b")) == ["a", "b"]


def test_image_parameters_are_recognised_by_name() -> None:
    assert is_image_parameter("flatfield") and is_image_parameter("threshold/2/pixel_mask")
    assert not is_image_parameter("pixel_mask_applied") and not is_image_parameter("threshold/1/energy")


# ------------------------------------------------------------------------------------------------
# Against the simulator


@pytest.fixture
def client(simulator) -> Iterator[DetectorClient]:
    detector_client = DetectorClient("127.0.0.1", simulator.port)
    try:
        yield detector_client
    finally:
        detector_client.close()


@pytest.fixture
def ready(client: DetectorClient) -> DetectorClient:
    """A client of an initialized simulator."""
    client.initialize()
    return client


def test_discovers_api_version(client: DetectorClient) -> None:
    assert client.discover_version() == "1.8.0"
    assert client.api_version == "1.8.0"


def test_client_on_api_1_6_0(simulator) -> None:
    with DetectorClient("127.0.0.1", simulator.port, api_version="1.6.0") as old_client:
        assert old_client.api_version == "1.6.0"
        old_client.initialize()
        assert old_client.state() == "idle"
        assert old_client.write("detector", "nimages", 2)["nimages"] == 2
        series_id = old_client.arm()
        assert old_client.disarm() == series_id


def test_unsupported_version_is_refused_client_side() -> None:
    with pytest.raises(SimplonError, match="1.7.0"):
        DetectorClient("127.0.0.1", 80, api_version="1.7.0")


def test_keys_listings(ready: DetectorClient) -> None:
    config_keys = ready.list_keys("detector", "config")
    assert {"count_time", "frame_time", "trigger_mode", "photon_energy", "x_pixels_in_detector"} <= set(config_keys)
    assert "state" in ready.list_keys("detector", "status")
    assert {"initialize", "arm", "trigger", "disarm", "cancel", "abort"} <= set(ready.list_keys("detector", "command"))
    assert {"mode", "format", "header_detail"} <= set(ready.list_keys("stream", "config"))
    with pytest.raises(UnknownParameterError):
        ready.list_keys("detector", "no_such_task")


def test_read_float_with_unit_and_limits(ready: DetectorClient) -> None:
    count_time = ready.read("detector", "config", "count_time")
    assert isinstance(count_time.value, float)
    info = count_time.info
    assert (info.value_type, info.unit, info.writable) == ("float", "s", True)
    assert info.min is not None and info.max is not None and info.min <= count_time.value <= info.max
    assert ready.describe("detector", "config", "count_time") == info


def test_read_enum_with_allowed_values(ready: DetectorClient) -> None:
    trigger_mode = ready.read("detector", "config", "trigger_mode")
    assert {"ints", "inte", "exts", "exte"} <= set(trigger_mode.info.allowed_values)
    assert trigger_mode.value in trigger_mode.info.allowed_values


def test_read_read_only_uint(ready: DetectorClient) -> None:
    width = ready.read("detector", "config", "x_pixels_in_detector")
    assert width.value == 512  # QUADRO
    assert (width.info.value_type, width.info.access_mode, width.info.writable) == ("uint", "r", False)


def test_read_status_with_time(ready: DetectorClient) -> None:
    state = ready.read("detector", "status", "state")
    assert state.value == "idle" and ready.state() == "idle"
    assert not state.info.writable and state.time


def test_write_count_time_returns_the_changed_timing_keys(simulator) -> None:
    calls: list[tuple[str, str, object]] = []
    with DetectorClient("127.0.0.1", simulator.port, on_changed=lambda *call: calls.append(call)) as client:
        client.initialize()
        old_frame_time = client.get_value("detector", "config", "frame_time")
        new_count_time = old_frame_time * 4
        changed = client.write("detector", "count_time", new_count_time)
        assert changed["count_time"] == pytest.approx(new_count_time)
        assert changed["frame_time"] > new_count_time  # count_time > frame_time pushed frame_time up
        assert changed["frame_time"] == client.get_value("detector", "config", "frame_time")
        assert calls == [("detector", key, value) for key, value in changed.items()]


def test_write_photon_energy_returns_the_thresholds(simulator) -> None:
    calls: list[tuple[str, str, object]] = []
    with DetectorClient("127.0.0.1", simulator.port, on_changed=lambda *call: calls.append(call)) as client:
        client.initialize()
        limits = client.describe("detector", "config", "photon_energy")
        energy = (limits.min + limits.max) / 2  # QUADRO is an electron detector: tens of keV
        changed = client.write("detector", "photon_energy", energy)
        assert changed["photon_energy"] == pytest.approx(energy)
        assert changed["threshold/1/energy"] == pytest.approx(0.5 * energy)
        assert changed["threshold/2/energy"] == pytest.approx(1.4 * energy)
        assert changed["wavelength"] == pytest.approx(12398.4 / energy, rel=1e-3)
        assert "flatfield" not in changed  # images are never re-read on their own
        assert {key for _, key, _ in calls} == set(changed)


def test_unknown_key_is_a_404_with_the_dcu_message(ready: DetectorClient) -> None:
    with pytest.raises(UnknownParameterError) as caught:
        ready.read("detector", "config", "no_such_key")
    assert caught.value.status_code == 404 and caught.value.method == "GET"
    assert caught.value.dcu_message and caught.value.dcu_message in str(caught.value)
    assert caught.value.url.endswith("/detector/api/1.8.0/config/no_such_key")
    with pytest.raises(UnknownParameterError):
        ready.write("detector", "no_such_key", 1, validate=False)


def _refused_by_dcu(client: DetectorClient, key: str, value: object) -> InvalidValueError:
    with pytest.raises(InvalidValueError) as caught:
        client.write("detector", key, value, validate=False)
    error = caught.value
    assert error.status_code == 400 and error.method == "PUT"
    assert key in error.dcu_message and error.dcu_message in str(error)
    return error


def test_wrong_type(ready: DetectorClient) -> None:
    with pytest.raises(WrongTypeError):
        ready.write("detector", "count_time", "fast")
    _refused_by_dcu(ready, "count_time", "fast")


def test_out_of_range_client_side_and_on_the_dcu(ready: DetectorClient) -> None:
    maximum = ready.describe("detector", "config", "count_time").max
    before = ready.get_value("detector", "config", "count_time")
    with pytest.raises(OutOfRangeError, match=f"above the maximum {maximum:.6g} s"):
        ready.write("detector", "count_time", maximum * 2)
    error = _refused_by_dcu(ready, "count_time", maximum * 2)
    assert f"{maximum:g}" in error.dcu_message or repr(float(maximum)) in error.dcu_message
    assert ready.get_value("detector", "config", "count_time") == before


def test_value_not_allowed(ready: DetectorClient) -> None:
    with pytest.raises(NotAllowedValueError, match="ints"):
        ready.write("detector", "trigger_mode", "internal")
    _refused_by_dcu(ready, "trigger_mode", "internal")


def test_read_only(ready: DetectorClient) -> None:
    with pytest.raises(ReadOnlyParameterError):
        ready.write("detector", "x_pixels_in_detector", 256)
    _refused_by_dcu(ready, "x_pixels_in_detector", 256)


def test_before_initialize(client: DetectorClient) -> None:
    assert client.state() == "na"
    with pytest.raises(DetectorNotInitializedError, match="run Initialize first") as caught:
        client.read("detector", "config", "count_time")
    assert caught.value.dcu_message in str(caught.value)
    with pytest.raises(DetectorNotInitializedError):
        client.write("detector", "count_time", 0.1)
    with pytest.raises(DetectorNotInitializedError):
        client.write("detector", "count_time", 0.1, validate=False)
    with pytest.raises(DetectorNotInitializedError):
        client.arm()


def test_arm_returns_increasing_series_ids_and_initialize_resets_them(ready: DetectorClient) -> None:
    first = ready.arm()
    assert ready.state() == "ready"
    assert ready.disarm() == first
    assert ready.state() == "idle"
    second = ready.arm()
    assert second == first + 1
    assert ready.cancel() == second
    third = ready.arm()
    assert ready.abort() == third == second + 1
    ready.initialize()
    assert ready.arm() == first
    ready.disarm()


def test_ints_trigger_blocks_until_the_series_is_done(ready: DetectorClient) -> None:
    ready.write("detector", "trigger_mode", "ints")
    ready.write("detector", "nimages", 3)
    ready.write("detector", "ntrigger", 2)
    ready.arm()
    ready.trigger()
    assert ready.state() == "ready"  # one trigger left
    ready.trigger()
    assert ready.state() == "idle"  # the DCU disarmed itself after the last image


def test_abort_while_a_trigger_blocks_in_another_thread(ready: DetectorClient) -> None:
    ready.write("detector", "nimages", 100000)
    series_id = ready.arm()
    outcome: list[object] = []

    def trigger() -> None:
        try:
            ready.trigger()
            outcome.append("returned")
        except SimplonError as error:
            outcome.append(error)

    trigger_thread = threading.Thread(target=trigger)
    trigger_thread.start()
    try:
        _wait_for(lambda: ready.state() == "acquire", "the trigger to start the exposure")
        assert ready.abort() == series_id
    finally:
        trigger_thread.join(timeout=60)
    assert not trigger_thread.is_alive() and outcome
    assert ready.state() == "idle"


def test_unknown_command(ready: DetectorClient) -> None:
    with pytest.raises(UnknownParameterError):
        ready.command("detector", "no_such_command")


def _wait_for(condition: Callable[[], bool], what: str, deadline_s: float = 30.0) -> None:
    deadline = time.monotonic() + deadline_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


# ------------------------------------------------------------------------------------------------
# Transport failures and DCU answers the simulator does not produce


def test_connection_refused() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with DetectorClient("127.0.0.1", port, api_version="1.8.0") as client:
        with pytest.raises(DcuConnectionError) as caught:
            client.state()
    assert not isinstance(caught.value, DcuTimeoutError)
    assert f"127.0.0.1:{port}" in str(caught.value) and "refused" in str(caught.value).lower()


class FakeDcu:
    """A scripted HTTP server: ``routes[(method, path)] = (status, body text)`` or ``HANG``
    (the request is held until the test ends)."""

    HANG = object()

    def __init__(self, routes: dict[tuple[str, str], object]) -> None:
        self.routes = routes
        self.requests: list[tuple[str, str, bytes]] = []
        self.release = threading.Event()
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                fake.requests.append((self.command, self.path, self.rfile.read(length)))
                route = fake.routes.get((self.command, self.path), (404, f"unknown path: {self.path}"))
                if route is FakeDcu.HANG:
                    fake.release.wait()
                    return
                status, text = route
                payload = text.encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_PUT = _answer

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02})
        self.thread.start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


@pytest.fixture
def fake_dcu() -> Iterator[Callable[[dict], FakeDcu]]:
    started: list[FakeDcu] = []

    def start(routes: dict) -> FakeDcu:
        started.append(FakeDcu(routes))
        return started[-1]

    yield start
    for fake in started:
        fake.close()


V18 = "/detector/api/1.8.0"


def test_other_api_versions_are_refused(fake_dcu) -> None:
    fake = fake_dcu({("GET", "/detector/api/version/"): (200, '{"value": "2.0.0", "value_type": "string"}')})
    with DetectorClient("127.0.0.1", fake.port) as client:
        with pytest.raises(SimplonError, match="'2.0.0'.*supports 1.8.0, 1.6.0"):
            client.api_version


@pytest.mark.parametrize("put_answer", ["", '""', "null"])
def test_write_tolerates_an_empty_change_list(fake_dcu, put_answer: str) -> None:
    fake = fake_dcu({
        ("PUT", f"{V18}/config/nimages"): (200, put_answer),
        ("GET", f"{V18}/config/nimages"): (200, '{"value": 7, "value_type": "uint", "access_mode": "rw"}'),
    })
    calls: list[tuple] = []
    with DetectorClient("127.0.0.1", fake.port, api_version="1.8.0", on_changed=lambda *c: calls.append(c)) as client:
        assert client.write("detector", "nimages", 7) == {"nimages": 7}
    assert calls == [("detector", "nimages", 7)]
    assert ("PUT", f"{V18}/config/nimages", b'{"value": 7}') in fake.requests


def test_commands_without_argument_send_no_body_and_series_id_spellings(fake_dcu) -> None:
    fake = fake_dcu({
        ("PUT", f"{V18}/command/arm"): (200, '{"series id": 7}'),
        ("PUT", f"{V18}/command/disarm"): (200, "{}"),
    })
    with DetectorClient("127.0.0.1", fake.port, api_version="1.8.0") as client:
        assert client.arm() == 7
        with pytest.raises(SimplonError, match="answered disarm with {}"):
            client.disarm()
    assert fake.requests[0] == ("PUT", f"{V18}/command/arm", b"")


def test_server_error_keeps_the_dcu_message(fake_dcu) -> None:
    fake = fake_dcu({("PUT", f"{V18}/command/arm"): (500, "arm failed: series would exceed 1 week")})
    with DetectorClient("127.0.0.1", fake.port, api_version="1.8.0") as client:
        with pytest.raises(DcuRequestError) as caught:
            client.arm()
    assert type(caught.value) is DcuRequestError and caught.value.status_code == 500
    assert "series would exceed 1 week" in str(caught.value)


def test_a_call_past_its_timeout(fake_dcu) -> None:
    fake = fake_dcu({("GET", f"{V18}/status/state"): FakeDcu.HANG, ("PUT", f"{V18}/command/trigger"): FakeDcu.HANG})
    with DetectorClient("127.0.0.1", fake.port, api_version="1.8.0", timeouts=Timeouts(default=0.2)) as client:
        with pytest.raises(DcuTimeoutError, match=f"127.0.0.1:{fake.port} did not answer GET detector/status/state within 0.2 s"):
            client.state()
        with pytest.raises(DcuTimeoutError, match="detector/command/trigger within 0.3 s"):
            client.trigger(timeout=0.3)


def test_closed_client_refuses_calls() -> None:
    client = DetectorClient("127.0.0.1", 80, api_version="1.8.0")
    client.close()
    with pytest.raises(SimplonError, match="closed"):
        client.state()


def test_version_discovery_falls_back_to_the_url_without_slash(fake_dcu) -> None:
    fake = fake_dcu({("GET", "/detector/api/version"): (200, '{"value": "1.6.0", "value_type": "string"}')})
    with DetectorClient("127.0.0.1", fake.port) as client:
        assert client.api_version == "1.6.0"


def test_simplon_imports_only_urllib3_and_the_standard_library() -> None:
    import ast
    import sys
    from pathlib import Path

    import tango_dectris_live.simplon as package

    for source in Path(package.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                assert top == "urllib3" or top in sys.stdlib_module_names, f"{source.name} imports {name}"


def test_write_skips_images_and_keys_that_cannot_be_read(fake_dcu) -> None:
    fake = fake_dcu({
        ("PUT", f"{V18}/config/photon_energy"): (200, '["flatfield", "difference_mode", "photon_energy"]'),
        ("GET", f"{V18}/config/photon_energy"): (200, '{"value": 9000.0, "value_type": "float", "unit": "eV"}'),
        ("GET", f"{V18}/status/state"): (200, '{"value": "idle", "value_type": "string"}'),
    })
    with DetectorClient("127.0.0.1", fake.port, api_version="1.8.0") as client:
        assert client.write("detector", "photon_energy", 9000.0) == {"photon_energy": 9000.0}
    requested = [(method, path) for method, path, _ in fake.requests]
    assert ("GET", f"{V18}/config/difference_mode") in requested  # tried, 404, left out
    assert ("GET", f"{V18}/config/flatfield") not in requested  # a detector-sized image: never re-read


def test_recent_values_are_reused_until_a_write_or_initialize(fake_dcu) -> None:
    fake = fake_dcu({
        ("GET", f"{V18}/config/nimages"): (200, '{"value": 7, "value_type": "uint", "access_mode": "rw"}'),
        ("PUT", f"{V18}/config/nimages"): (200, '["nimages"]'),
        ("PUT", f"{V18}/command/initialize"): (200, ""),
    })
    reads = lambda: fake.requests.count(("GET", f"{V18}/config/nimages", b""))  # noqa: E731
    with DetectorClient("127.0.0.1", fake.port, api_version="1.8.0") as client:
        assert client.recent_value("detector", "nimages", 60) == 7 and reads() == 1
        assert client.recent_value("detector", "nimages", 60) == 7 and reads() == 1  # reused
        assert client.recent_value("detector", "nimages", 0) == 7 and reads() == 2  # 0: always read
        client.write("detector", "nimages", 7, validate=False)  # re-reads what it changed
        assert reads() == 3 and client.recent_value("detector", "nimages", 60) == 7 and reads() == 3
        client.initialize()
        assert client.recent_value("detector", "nimages", 60) == 7 and reads() == 4
