"""The DCU client and the supervisor on partial DCUs: what "not provided" looks like (404, or a
4xx/5xx worded so), the client's activity events, and a supervisor without detector state."""
from __future__ import annotations

import http.server
import logging
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from sim.server import SimulatorServer
from tango_dectris_live.simplon import (
    DcuRequestError,
    DetectorClient,
    InvalidValueError,
    UnknownParameterError,
)
from tango_dectris_live.simplon.client import ACTIVITY_EVENTS
from tango_dectris_live.simplon.supervision import NO_STATE_NOTE, DetectorCondition, DetectorSupervisor

V18 = "/detector/api/1.8.0"
JSON = "application/json"
TEXT = "text/plain"


class ScriptedHttpDcu:
    """A local HTTP server answering ``routes[(method, path)] = (status, content type, body)``;
    anything else is a 404. Records the requests."""

    def __init__(self, routes: dict[tuple[str, str], tuple[int, str, str]]) -> None:
        self.routes = routes
        self.requests: list[tuple[str, str]] = []
        scripted = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                scripted.requests.append((self.command, self.path))
                status, content_type, body = scripted.routes.get(
                    (self.command, self.path), (404, "text/html", "<title>404 Not Found</title>"))
                payload = body.encode()
                self.send_response(status)
                self.send_header("Content-Type", content_type)
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

    def client(self) -> DetectorClient:
        return DetectorClient("127.0.0.1", self.port, api_version="1.8.0")

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


@pytest.fixture
def scripted_dcu() -> Iterator[Callable[[dict], ScriptedHttpDcu]]:
    started: list[ScriptedHttpDcu] = []

    def start(routes: dict) -> ScriptedHttpDcu:
        started.append(ScriptedHttpDcu(routes))
        return started[-1]

    yield start
    for dcu in started:
        dcu.close()


# ------------------------------------------------------------------------------------------------
# "not provided" versus a real failure


@pytest.mark.parametrize("status, content_type, body, dcu_text", [
    (404, "text/html", "<title>404 Not Found</title>", "<title>404 Not Found</title>"),
    (500, JSON, '{"error": "Parameter photon_energy not implemented."}', "Parameter photon_energy not implemented."),
    (500, TEXT, "Parameter photon_energy not implemented.", "Parameter photon_energy not implemented."),
    (500, TEXT, "PARAMETER NOT IMPLEMENTED", "PARAMETER NOT IMPLEMENTED"),
    (400, TEXT, "photon_energy: not supported by this firmware", "photon_energy: not supported by this firmware"),
    (400, JSON, '{"message": "Unknown parameter photon_energy"}', "Unknown parameter photon_energy"),
    (500, TEXT, "no such key: photon_energy", "no such key: photon_energy"),
    (501, TEXT, "", ""),
])
def test_not_provided_answers_are_unknown_parameter_errors(scripted_dcu, status, content_type, body, dcu_text):
    dcu = scripted_dcu({("GET", f"{V18}/config/photon_energy"): (status, content_type, body),
                        ("GET", f"{V18}/status/state"): (200, JSON, '{"value": "idle"}')})
    with dcu.client() as client:
        with pytest.raises(UnknownParameterError) as caught:
            client.get_value("detector", "config", "photon_energy")
    error = caught.value
    assert error.status_code == status and error.dcu_message == dcu_text
    assert "does not provide" in str(error) and f"HTTP {status}" in str(error)
    assert dcu_text in str(error)


def test_a_genuine_server_error_stays_a_request_error(scripted_dcu):
    dcu = scripted_dcu({("GET", f"{V18}/config/count_time"): (500, JSON, '{"error": "detector board 3 timed out"}')})
    with dcu.client() as client:
        with pytest.raises(DcuRequestError) as caught:
            client.get_value("detector", "config", "count_time")
    assert type(caught.value) is DcuRequestError
    assert "detector board 3 timed out" in str(caught.value)


def test_commands_not_implemented_are_not_provided(scripted_dcu):
    dcu = scripted_dcu({("PUT", f"{V18}/command/hv_reset"): (500, JSON, '{"error": "Parameter hv_reset not implemented."}')})
    with dcu.client() as client:
        with pytest.raises(UnknownParameterError, match="Parameter hv_reset not implemented"):
            client.command("detector", "hv_reset")


def test_a_refused_write_keeps_the_dcus_text(scripted_dcu):
    refusal = "Value 5 for parameter nimages does not match file content 1."
    dcu = scripted_dcu({
        ("GET", f"{V18}/config/nimages"): (200, JSON, '{"value": 1, "value_type": "uint", "access_mode": "rw"}'),
        ("PUT", f"{V18}/config/nimages"): (500, JSON, f'{{"error": "{refusal}"}}'),
        ("PUT", f"{V18}/config/ntrigger"): (400, TEXT, "ntrigger: 0 is below the minimum 1"),
    })
    with dcu.client() as client:
        with pytest.raises(DcuRequestError) as caught:
            client.write("detector", "nimages", 5)
        assert not isinstance(caught.value, UnknownParameterError)
        assert refusal in str(caught.value) and "refused the write" in str(caught.value)
        assert caught.value.dcu_message == refusal
        with pytest.raises(InvalidValueError, match="below the minimum 1"):
            client.write("detector", "ntrigger", 0, validate=False)


def test_error_classification_asks_a_dcu_without_state_only_once(scripted_dcu):
    dcu = scripted_dcu({})  # everything 404, the state included
    with dcu.client() as client:
        for key in ("photon_energy", "description", "beam_center_x"):
            with pytest.raises(UnknownParameterError):
                client.get_value("detector", "config", key)
        assert client.reports_state is False
    assert dcu.requests.count(("GET", f"{V18}/status/state")) == 1


# ------------------------------------------------------------------------------------------------
# activity events


def test_commands_and_stream_events_reach_the_listeners(scripted_dcu, caplog):
    dcu = scripted_dcu({
        ("PUT", f"{V18}/command/{name}"): (200, JSON, '{"sequence id": 4}')
        for name in ("initialize", "arm", "trigger", "disarm", "cancel", "abort")})
    heard: list[str] = []

    def failing_listener(event: str) -> None:
        raise RuntimeError("listener bug")

    with dcu.client() as client:
        client.add_activity_listener(failing_listener)
        client.add_activity_listener(heard.append)
        with caplog.at_level(logging.ERROR, logger="tango_dectris_live.simplon.client"):
            client.initialize()
            assert client.arm() == 4
            client.trigger(timeout=5)
            client.note_stream("series_started", series_id=4)
            client.note_stream("series_ended", series_id=3)  # a late end of an earlier series
            client.note_stream("series_ended")
            client.cancel()
            client.abort()
            assert client.disarm() == 4
        with pytest.raises(ValueError, match="series_started, series_ended"):
            client.note_stream("series_paused")
    assert heard == ["initialize", "arm", "trigger_started", "trigger_done", "series_started",
                     "series_ended", "cancel", "abort", "disarm"]
    assert set(heard) <= set(ACTIVITY_EVENTS)
    assert "listener bug" in caplog.text


def test_a_failed_trigger_is_announced(scripted_dcu):
    dcu = scripted_dcu({("PUT", f"{V18}/command/trigger"): (400, TEXT, "trigger: not armed")})
    heard: list[str] = []
    with dcu.client() as client:
        client.add_activity_listener(heard.append)
        with pytest.raises(DcuRequestError):
            client.trigger(timeout=5)
    assert heard == ["trigger_started", "trigger_failed"]


# ------------------------------------------------------------------------------------------------
# the supervisor on the simulator's partial profile


def _wait_for(condition: Callable[[], bool], what: str, deadline_s: float = 20.0) -> None:
    deadline = time.monotonic() + deadline_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


@pytest.fixture
def partial_sim() -> Iterator[SimulatorServer]:
    with SimulatorServer(host="127.0.0.1", model="ARINA", profile="partial") as simulator:
        yield simulator


def test_supervisor_infers_the_state_of_a_dcu_without_one(partial_sim):
    published = []
    with DetectorClient("127.0.0.1", partial_sim.port) as client:
        supervisor = DetectorSupervisor(client, on_change=published.append)
        health = supervisor.refresh()
        assert supervisor.dcu_reports_state is False
        assert health.condition is DetectorCondition.IDLE and health.state_inferred
        assert health.message == f"detector idle ({NO_STATE_NOTE})"
        assert "detector/status/state not provided" in health.message

        client.write("detector", "nimages", 2)
        client.arm()
        # published at once by the arm, no poll in between
        assert published[-1].condition is DetectorCondition.BUSY and published[-1].dcu_state == "ready"
        assert published[-1].message.startswith("detector ready (the DCU reports no state")
        client.trigger()
        assert supervisor.health.dcu_state == "ready"  # trigger_done: ready for the next trigger
        client.note_stream("series_ended")
        assert supervisor.health.condition is DetectorCondition.IDLE
        client.arm()
        client.note_stream("series_started")
        assert supervisor.health.dcu_state == "acquire"
        client.disarm()
        assert published[-1].condition is DetectorCondition.IDLE
        assert supervisor.refresh().condition is DetectorCondition.IDLE


def test_supervisor_without_state_sees_the_dcu_go_and_come_back(partial_sim):
    port = partial_sim.port
    reconnects = []
    with DetectorClient("127.0.0.1", port, api_version="1.8.0") as client:
        supervisor = DetectorSupervisor(client, poll_period=0.05, on_reconnect=lambda: reconnects.append(1))
        assert supervisor.refresh().condition is DetectorCondition.IDLE
        partial_sim.stop()
        health = supervisor.refresh()
        assert health.condition is DetectorCondition.UNREACHABLE
        client.note_stream("series_started")  # no news of a DCU that does not answer
        assert supervisor.health.condition is DetectorCondition.UNREACHABLE
        with SimulatorServer(host="127.0.0.1", port=port, model="ARINA", profile="partial"):
            supervisor.start()
            try:
                _wait_for(lambda: supervisor.health.condition is not DetectorCondition.UNREACHABLE,
                          "the supervisor to see the DCU again")
            finally:
                supervisor.stop()
            assert supervisor.health.state_inferred and supervisor.health.dcu_state == "acquire"
            assert reconnects == [1, 1]
