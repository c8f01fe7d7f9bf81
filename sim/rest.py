"""The SIMPLON REST API over HTTP (standard library only): URL grammar, JSON bodies, status codes.

``/<module>/api/<version>/<task>/<parameter>`` (SIMPLON.md §1.1) is mapped onto a
:class:`~sim.detector.SimulatedDetector`; simulator-only settings live under ``/sim/api/config``.
Refusals are plain text: 404 for what does not exist, 400 for what cannot be done or written.
The ``partial`` profile answers like LiberTEM-live's simulator instead (HTTP 500 with a JSON
``{"error": ...}`` body for what it does not implement).
"""
from __future__ import annotations

import socket
import struct
import threading

import json
import logging
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

from sim.detector import (MODULES, SUPPORTED_API_VERSIONS, CommandRejected, SimulatedDetector,
                          UnknownCommand, WriteRefusedByServer)
from sim.parameters import InvalidParameterValue, ParameterNotFound

log = logging.getLogger(__name__)

API_VERSION = "1.8.0"
MAX_BODY_BYTES = 1 << 20
JSON_TYPE = "application/json; charset=utf-8"
TEXT_TYPE = "text/plain; charset=utf-8"


class RequestRefused(Exception):
    """A request the URL grammar or the body format rules out, with its HTTP status; with
    ``json_error`` the body is ``{"error": message}`` (Flask-style) instead of plain text."""

    def __init__(self, status: HTTPStatus, message: str, json_error: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.json_error = json_error


def _reject_constant(name: str) -> Any:
    raise RequestRefused(HTTPStatus.BAD_REQUEST, f"body: {name} is not a valid JSON number")


def parse_json_body(raw: bytes) -> Any:
    """The JSON of a request body (None when empty); NaN and Infinity are refused."""
    if not raw.strip():
        return None
    try:
        return json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except UnicodeDecodeError:
        raise RequestRefused(HTTPStatus.BAD_REQUEST, "body is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise RequestRefused(HTTPStatus.BAD_REQUEST, f"body is not valid JSON: {exc}") from None


# What a DCU with only part of SIMPLON answers (older firmware, other simulators): no key
# listings, no filewriter/monitor/system modules, only the basic stream settings (stream v1).
API_PROFILES = ("full", "minimal", "partial")
MINIMAL_MODULES = ("detector", "stream")
MINIMAL_STREAM_KEYS = {"config": ("mode", "header_detail"), "status": ("state", "dropped")}

# The "partial" profile: LiberTEM-live's simulator (libertem_live.detectors.dectris.sim, Flask).
# Routes exist for detector config and commands and stream config, API 1.8.0 only; anything else
# (detector/status/state included) has no route: 404. On a route, a key or command it does not
# implement answers HTTP 500 {"error": "Parameter <key> not implemented."} (a stream config write:
# the same text, plain).
PARTIAL_API_VERSION = "1.8.0"
PARTIAL_DETECTOR_CONFIG = ("bit_depth_image", "compression", "count_time", "frame_time", "nimages",
                           "ntrigger", "trigger_mode", "x_pixels_in_detector", "y_pixels_in_detector")
PARTIAL_STREAM_CONFIG = ("header_detail", "mode")
PARTIAL_COMMANDS = ("abort", "arm", "cancel", "disarm", "initialize", "trigger")
FLASK_NOT_FOUND = ("The requested URL was not found on the server. If you entered the URL manually "
                   "please check your spelling and try again.")


class SimplonHTTPServer(ThreadingHTTPServer):
    """An HTTP server answering the SIMPLON API of one simulated detector."""

    # server_close() joins the handler threads (after close_connections() hung up on them), so
    # that a stopped simulator holds no socket on its port and can be restarted on it at once.
    daemon_threads = False
    block_on_close = True

    def __init__(self, address: tuple[str, int], detector: SimulatedDetector, verbose: bool = False,
                 profile: str = "full") -> None:
        if profile not in API_PROFILES:
            raise ValueError(f"API profile must be one of {', '.join(API_PROFILES)}, got {profile!r}")
        self.detector = detector
        self.verbose = verbose
        self.profile = profile
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(address, SimplonRequestHandler)

    def get_request(self) -> tuple[socket.socket, Any]:
        connection, address = super().get_request()
        with self._connections_lock:
            self._connections.add(connection)
        return connection, address

    def shutdown_request(self, request: Any) -> None:
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        """Hang up on every client: a stopped DCU must look unreachable, also to clients that
        hold a keep-alive connection (their handler threads would otherwise keep answering)."""
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            try:
                # Reset rather than close politely: a polite close leaves our side in FIN_WAIT2
                # until the client notices, and the port could not be bound again meanwhile.
                connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                connection.shutdown(socket.SHUT_RD)  # wakes the handler thread, which closes it
            except OSError:
                pass  # already closed by the client

    def handle_error(self, request: Any, client_address: Any) -> None:
        # a client that hangs up mid-answer is normal (timeouts, Ctrl-C); say nothing unless verbose
        if self.verbose:
            super().handle_error(request, client_address)


class SimplonRequestHandler(BaseHTTPRequestHandler):
    """One HTTP request of the SIMPLON API."""

    protocol_version = "HTTP/1.1"
    # headers and body go out in two writes; with Nagle on, the second waits ~40 ms for an ACK
    disable_nagle_algorithm = True
    server_version = "SimplonSimulator/1.0"
    server: SimplonHTTPServer

    def do_GET(self) -> None:  # noqa: N802 (name fixed by BaseHTTPRequestHandler)
        self._answer("GET")

    def do_PUT(self) -> None:  # noqa: N802
        self._answer("PUT")

    def do_HEAD(self) -> None:  # noqa: N802 (ADEiger polls HEAD /data/<file>)
        self._answer("HEAD")

    def do_POST(self) -> None:  # noqa: N802
        self._answer("POST")

    def do_DELETE(self) -> None:  # noqa: N802
        self._answer("DELETE")

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (base class signature)
        if self.server.verbose:
            super().log_message(format, *args)

    # ------------------------------------------------------------------------------------------
    def _answer(self, method: str) -> None:
        try:
            body = self._read_body()
            status, answer = HTTPStatus.OK, self._route(method, body)
        except (ParameterNotFound, UnknownCommand) as exc:
            status, answer = HTTPStatus.NOT_FOUND, str(exc)
        except (InvalidParameterValue, CommandRejected) as exc:
            status, answer = HTTPStatus.BAD_REQUEST, str(exc)
        except WriteRefusedByServer as exc:
            status, answer = HTTPStatus.INTERNAL_SERVER_ERROR, {"error": str(exc)}
        except RequestRefused as exc:
            status, answer = exc.status, {"error": str(exc)} if exc.json_error else str(exc)
        except Exception as exc:  # the last resort of the handler edge: log it, answer one line
            log.exception("unexpected error on %s %s", method, self.path)
            reason = " ".join(str(exc).split())  # one line, whatever the exception text holds
            status, answer = HTTPStatus.INTERNAL_SERVER_ERROR, f"internal simulator error: {type(exc).__name__}: {reason}"
        if status is HTTPStatus.OK or isinstance(answer, dict):
            self._send(status, json.dumps(answer).encode("utf-8"), JSON_TYPE)
        else:
            self._send(status, str(answer).encode("utf-8"), TEXT_TYPE)

    def _read_body(self) -> bytes:
        length_header = self.headers.get("Content-Length", "0") or "0"
        try:
            length = int(length_header)
        except ValueError:
            raise RequestRefused(HTTPStatus.BAD_REQUEST, f"Content-Length {length_header!r} is not a number") from None
        if length > MAX_BODY_BYTES:
            # leave the rest unread and close: answering before reading would desynchronise keep-alive
            self.close_connection = True
            raise RequestRefused(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body of {length} bytes is too large")
        return self.rfile.read(length) if length > 0 else b""

    def _send(self, status: HTTPStatus, payload: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    def _route(self, method: str, body: bytes) -> Any:
        path = unquote(urlsplit(self.path).path)
        parts = [part for part in path.split("/") if part]
        if parts == ["detector", "api", "version"]:
            self._require(method, "GET", path)
            return {"value": API_VERSION, "value_type": "string"}
        if parts == ["sim", "api", "config"]:
            return self._sim_config(method, body)
        if len(parts) < 4 or parts[1] != "api":
            raise RequestRefused(HTTPStatus.NOT_FOUND, f'unknown path: "{path}"')
        module, _, version, task, *rest = parts
        if self.server.profile == "partial":
            self._refuse_outside_partial_profile(method, module, version, task, "/".join(rest))
        if module not in MODULES:
            raise RequestRefused(HTTPStatus.NOT_FOUND, f'unknown module "{module}" in path "{path}"')
        if version not in SUPPORTED_API_VERSIONS:
            raise RequestRefused(HTTPStatus.BAD_REQUEST,
                                 f"unsupported API version {version}; this DCU speaks "
                                 f"{' and '.join(SUPPORTED_API_VERSIONS)}")
        key = "/".join(rest)
        if not key:
            raise RequestRefused(HTTPStatus.NOT_FOUND, f'unknown path: "{path}" (no parameter named)')
        if self.server.profile == "minimal":
            self._refuse_outside_minimal_profile(module, task, key, path)
        detector = self.server.detector
        if task in ("config", "status"):
            if key == "keys":
                self._require(method, "GET", path)
                return detector.config_keys(module) if task == "config" else detector.status_keys(module)
            if method == "GET":
                return detector.get_config(module, key) if task == "config" else detector.get_status(module, key)
            self._require(method, "PUT" if task == "config" else "GET", path)
            return detector.put_config(module, key, self._written_value(key, body))
        if task == "command":
            if key == "keys":
                self._require(method, "GET", path)
                return detector.command_keys(module, version)
            self._require(method, "PUT", path)
            return detector.command(module, key, self._command_body(key, body), version)
        raise RequestRefused(HTTPStatus.NOT_FOUND, f'unknown path: "{path}" (task "{task}" does not exist)')

    @staticmethod
    def _refuse_outside_minimal_profile(module: str, task: str, key: str, path: str) -> None:
        if module not in MINIMAL_MODULES:
            raise RequestRefused(HTTPStatus.NOT_FOUND, f'unknown module "{module}" in path "{path}"')
        if key == "keys" and task in ("config", "status"):
            raise RequestRefused(HTTPStatus.NOT_FOUND, f'unknown path: "{path}" (this DCU lists no keys)')
        if module == "stream" and task in MINIMAL_STREAM_KEYS and key not in MINIMAL_STREAM_KEYS[task]:
            raise RequestRefused(HTTPStatus.NOT_FOUND, f'unknown parameter "{key}" in path "{path}"')

    @staticmethod
    def _refuse_outside_partial_profile(method: str, module: str, version: str, task: str, key: str) -> None:
        routed = version == PARTIAL_API_VERSION and (
            (module == "detector" and task == "config" and method in ("GET", "PUT"))
            or (module == "detector" and task == "command" and method == "PUT")
            or (module == "stream" and task == "config" and method in ("GET", "PUT")))
        if not routed or not key or "/" in key:  # Flask's <parameter> is one path segment
            raise RequestRefused(HTTPStatus.NOT_FOUND, f"404 Not Found: {FLASK_NOT_FOUND}")
        implemented = {("detector", "config"): PARTIAL_DETECTOR_CONFIG,
                       ("detector", "command"): PARTIAL_COMMANDS,
                       ("stream", "config"): PARTIAL_STREAM_CONFIG}[(module, task)]
        if key not in implemented:
            plain_text = module == "stream" and method == "PUT"
            raise RequestRefused(HTTPStatus.INTERNAL_SERVER_ERROR, f"Parameter {key} not implemented.",
                                 json_error=not plain_text)

    @staticmethod
    def _require(method: str, allowed: str, path: str) -> None:
        if method != allowed:
            raise RequestRefused(HTTPStatus.METHOD_NOT_ALLOWED, f"{method} is not supported on {path}; use {allowed}")

    @staticmethod
    def _written_value(key: str, body: bytes) -> Any:
        document = parse_json_body(body)
        if not isinstance(document, dict) or "value" not in document:
            raise RequestRefused(HTTPStatus.BAD_REQUEST,
                                 f'{key}: the body must be a JSON object {{"value": ...}}, got {body[:200]!r}')
        return document["value"]

    @staticmethod
    def _command_body(name: str, body: bytes) -> dict[str, Any] | None:
        document = parse_json_body(body)
        if document is not None and not isinstance(document, dict):
            raise RequestRefused(HTTPStatus.BAD_REQUEST,
                                 f"{name}: a command body must be empty or a JSON object, got {body[:200]!r}")
        return document

    def _sim_config(self, method: str, body: bytes) -> Any:
        detector = self.server.detector
        if method == "GET":
            return detector.get_sim_config()
        self._require(method, "PUT", "/sim/api/config")
        changes = parse_json_body(body)
        if not isinstance(changes, dict):
            raise RequestRefused(HTTPStatus.BAD_REQUEST, "simulator settings: the body must be a JSON object")
        try:
            return detector.update_sim_config(changes)
        except ValueError as exc:
            raise RequestRefused(HTTPStatus.BAD_REQUEST, str(exc)) from None
