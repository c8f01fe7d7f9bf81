"""HTTP client of a DECTRIS DCU (SIMPLON API 1.8.0 and 1.6.0): parameters, commands, errors."""
from __future__ import annotations

import json
import logging
import math
import re
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import urllib3

from .errors import (
    DcuConnectionError,
    DcuRequestError,
    DcuTimeoutError,
    DetectorNotInitializedError,
    InvalidValueError,
    SimplonError,
    UnknownParameterError,
)
from .parameters import MODULES, ParameterInfo, ParameterValue, is_image_parameter

log = logging.getLogger(__name__)

SUPPORTED_API_VERSIONS = ("1.8.0", "1.6.0")

ChangedCallback = Callable[[str, str, Any], None]  # (module, key, new value)
ActivityListener = Callable[[str], None]  # (event): one of ACTIVITY_EVENTS

#: What a listener added with :meth:`DetectorClient.add_activity_listener` hears: the successful
#: commands sent through the client (``trigger_started`` when a trigger is sent, then
#: ``trigger_done`` when the DCU answered it, or ``trigger_failed``) and the stream events the
#: acquisition layer reports with :meth:`DetectorClient.note_stream`.
COMMAND_EVENTS = ("initialize", "arm", "trigger_started", "trigger_done", "trigger_failed", "disarm",
                  "cancel", "abort")
STREAM_EVENTS = ("series_started", "series_ended")
ACTIVITY_EVENTS = COMMAND_EVENTS + STREAM_EVENTS

# How DCUs and simulators word "this key or command does not exist here" in a 4xx/5xx body
# (LiberTEM-live's sim: HTTP 500 {"error": "Parameter photon_energy not implemented."}).
_NOT_PROVIDED_WORDING = re.compile(
    r"not\s+implemented|not\s+supported|unsupported\s+(?:parameter|key|command)"
    r"|unknown\s+(?:parameter|key|command|path|resource)"
    r"|no\s+such\s+(?:parameter|key|command|path|resource)",
    re.IGNORECASE)

_NO_BODY = object()


@dataclass(frozen=True)
class Timeouts:
    """Seconds each kind of call may take before :class:`DcuTimeoutError` (ADEiger's figures)."""

    default: float = 5.0
    initialize: float = 240.0
    arm: float = 120.0
    trigger_margin: float = 10.0  # added to the series duration for a blocking ints trigger


class _Connections:
    """Keep-alive HTTP connections to one DCU (urllib3: thread-safe, a connection per concurrent
    call, so that an Abort does not wait for a blocking ints Trigger to return).

    Why urllib3 and not ``requests`` (on which it is built): a GET costs ~0.2 ms of CPU through
    urllib3 and ~0.8 ms through a requests session (environment, proxies, hooks and cookies are
    looked at again on every request); a Start makes 15 requests, a step scan one Start per point.
    """

    def __init__(self, host: str, port: int) -> None:
        proxy = _environment_proxy(host)
        options = dict(num_pools=2, maxsize=8, retries=False)  # retries: ours, GET only (see _send)
        self._manager = urllib3.ProxyManager(proxy, **options) if proxy else urllib3.PoolManager(**options)
        self._closed = False

    def request(self, method: str, url: str, body: str | None, headers: dict[str, str],
                timeout: float) -> _Answer:
        if self._closed:
            raise SimplonError("the DCU client is closed; create a new DetectorClient")
        response = self._manager.request(method, url, body=body, headers=headers,
                                         timeout=urllib3.Timeout(connect=timeout, read=timeout),
                                         redirect=False)
        return _Answer(response.status, response.data)

    def forget_idle(self) -> None:
        """Close the kept-alive connections not in use (they may lead to a DCU that restarted)."""
        self._manager.clear()

    def close(self) -> None:
        self._closed = True
        self._manager.clear()


@dataclass(frozen=True)
class _Answer:
    """A DCU's answer: its HTTP status and body."""

    status_code: int
    content: bytes

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", errors="replace")

    def json(self) -> Any:
        return json.loads(self.content)


def _environment_proxy(host: str) -> str | None:
    """The http proxy the environment names for the DCU, unless no_proxy exempts it."""
    proxy = urllib.request.getproxies().get("http")
    if not proxy or urllib.request.proxy_bypass(host):
        return None
    return proxy


class DetectorClient:
    """Talks to one DCU over HTTP; thread-safe; Tango-free.

    Metadata (type, unit, limits, allowed values) is cached per key and dropped for a module when
    one of its parameters is written, because a write can move the limits of other keys.
    """

    def __init__(
        self,
        host: str,
        port: int = 80,
        api_version: str | None = None,
        timeouts: Timeouts = Timeouts(),
        on_changed: ChangedCallback | None = None,
    ) -> None:
        if api_version is not None and api_version not in SUPPORTED_API_VERSIONS:
            raise SimplonError(
                f"SIMPLON API version {api_version!r} is not supported; use one of {', '.join(SUPPORTED_API_VERSIONS)}"
            )
        self.host = host
        self.port = port
        self.base_url = f"http://{host}:{port}"
        self.timeouts = timeouts
        self.on_changed = on_changed
        self._api_version = api_version
        self._connections = _Connections(host, port)
        self._metadata_lock = threading.Lock()
        self._metadata: dict[tuple[str, str, str], ParameterInfo] = {}
        # config (module, key): (read at, value, unit)
        self._values: dict[tuple[str, str], tuple[float, Any, str | None]] = {}
        self._listeners_lock = threading.Lock()
        self._activity_listeners: list[ActivityListener] = []
        self._armed_series_id: int | None = None
        # Whether detector/status/state answered the last time it was asked (None: not asked yet).
        self._reports_state: bool | None = None

    def __repr__(self) -> str:
        return f"DetectorClient({self.base_url!r}, api_version={self._api_version!r})"

    def __enter__(self) -> "DetectorClient":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the HTTP connections; the client cannot be used afterwards."""
        self._connections.close()

    # ---------------------------------------------------------------- version and listings

    @property
    def api_version(self) -> str:
        """The SIMPLON version used in URLs; asked from the DCU on first use if not given."""
        if self._api_version is None:
            self._api_version = self.discover_version()
        return self._api_version

    def discover_version(self) -> str:
        """Ask the DCU which SIMPLON version it speaks (``GET /detector/api/version/``); a client
        created without ``api_version`` uses it from then on."""
        url = f"{self.base_url}/detector/api/version/"
        try:
            response = self._request("GET", url, call="version discovery")
        except UnknownParameterError:
            # Clients disagree on the trailing slash (ADEiger omits it); a DCU may serve only one form.
            url = url.rstrip("/")
            response = self._request("GET", url, call="version discovery")
        body = self._parse_json(response, "GET", url)
        version = body.get("value") if isinstance(body, dict) else None
        if version not in SUPPORTED_API_VERSIONS:
            raise SimplonError(
                f"the DCU at {self.host}:{self.port} speaks SIMPLON API {version!r}; "
                f"this client supports {', '.join(SUPPORTED_API_VERSIONS)} only"
            )
        if self._api_version is None:
            self._api_version = version
        return version

    def list_keys(self, module: str, task: str) -> list[str]:
        """Names the DCU lists under ``<module>/<task>/keys`` (task: config, status or command)."""
        url = self._url(module, task, "keys")
        body = self._parse_json(self._request("GET", url, call=f"{module}/{task}/keys"), "GET", url)
        if not isinstance(body, list):
            raise SimplonError(f"GET {url}: expected a JSON list of names, the DCU answered {body!r}")
        return [str(name) for name in body]

    # ---------------------------------------------------------------- parameters

    def read(self, module: str, task: str, key: str) -> ParameterValue:
        """Value and metadata of one config or status parameter, in one GET."""
        url = self._url(module, task, key)
        body = self._parse_json(self._request("GET", url, call=f"{module}/{task}/{key}"), "GET", url)
        if not isinstance(body, dict) or "value" not in body:
            raise SimplonError(f"GET {url}: expected a JSON object with 'value', the DCU answered {body!r}")
        info = ParameterInfo.from_response(module, task, key, body)
        with self._metadata_lock:
            self._metadata[(module, task, key)] = info
            if task == "config":
                self._values[(module, key)] = (time.monotonic(), body["value"], info.unit or None)
        return ParameterValue(info=info, value=body["value"], time=body.get("time"), state=body.get("state"))

    def get_value(self, module: str, task: str, key: str) -> Any:
        """The value of one parameter."""
        return self.read(module, task, key).value

    def known_config(self) -> dict[str, tuple[Any, str | None]]:
        """Every config value this client has read (the last value of each), with its unit:
        ``{"key": (value, unit)}`` for the detector module, ``{"module/key": ...}`` for the others,
        without asking the DCU (for a series file's record of the detector's settings at arm)."""
        with self._metadata_lock:
            return {(key if module == "detector" else f"{module}/{key}"):
                    (value, unit) for (module, key), (_, value, unit) in self._values.items()}

    def recent_value(self, module: str, key: str, max_age: float) -> Any:
        """A config value as this client last read it, when that was at most ``max_age`` seconds
        ago, else read now. Writes through this client re-read what they change, so only a change
        by another client within ``max_age`` goes unseen; a write, an initialize or a lost
        connection forgets the values read before it."""
        if max_age > 0:
            with self._metadata_lock:
                entry = self._values.get((module, key))
            if entry is not None and time.monotonic() - entry[0] <= max_age:
                return entry[1]
        return self.get_value(module, "config", key)

    def describe(self, module: str, task: str, key: str) -> ParameterInfo:
        """Metadata of one parameter, from the cache or from one GET."""
        with self._metadata_lock:
            info = self._metadata.get((module, task, key))
        return info if info is not None else self.read(module, task, key).info

    def write(self, module: str, key: str, value: Any, validate: bool = True) -> dict[str, Any]:
        """Set a config parameter; return ``{key: new value}`` for every key the write changed.

        With ``validate`` the value is checked against the DCU's metadata first and refused
        client-side (ReadOnlyParameterError, WrongTypeError, OutOfRangeError, NotAllowedValueError).
        Each changed key that can be read is re-read and passed to ``on_changed``.
        """
        if validate:
            value = self.describe(module, "config", key).validate(value)
        url = self._url(module, "config", key)
        response = self._request("PUT", url, call=f"{module}/config/{key}", value=value)
        changed_keys = self._changed_keys(response, url)
        if key not in changed_keys:
            changed_keys.insert(0, key)
        self._forget_metadata(module)
        new_values: dict[str, Any] = {}
        for changed in changed_keys:
            if is_image_parameter(changed):
                continue
            try:
                new_values[changed] = self.get_value(module, "config", changed)
            except DcuRequestError as error:
                # The DCU lists keys it cannot serve (tickit records "difference_mode"); the write
                # itself succeeded, so a key that cannot be re-read is only left out.
                log.debug("changed key %s/config/%s cannot be re-read: %s", module, changed, error)
        if self.on_changed is not None:
            for changed, new_value in new_values.items():
                self.on_changed(module, changed, new_value)
        return new_values

    # ---------------------------------------------------------------- commands

    def command(self, module: str, name: str, value: Any = None, timeout: float | None = None) -> Any:
        """Run ``PUT <module>/command/<name>``; return the parsed JSON answer or None when empty."""
        if timeout is None:
            timeout = {"initialize": self.timeouts.initialize, "arm": self.timeouts.arm}.get(
                name, self.timeouts.default
            )
        url = self._url(module, "command", name)
        body = _NO_BODY if value is None else value
        response = self._request("PUT", url, call=f"{module}/command/{name}", value=body, timeout=timeout)
        text = response.text.strip()
        if not text:
            return None
        try:
            return json.loads(text)
        except ValueError:
            return text  # e.g. a plain-text URI; nothing to parse

    def state(self) -> str:
        """``detector/status/state``: na, initialize, configure, ready, acquire, idle, test, error.

        Raises :class:`UnknownParameterError` on a DCU that does not provide it (LiberTEM-live's
        simulator); :attr:`reports_state` remembers which it was."""
        try:
            value = str(self.get_value("detector", "status", "state"))
        except UnknownParameterError:
            self._reports_state = False
            raise
        self._reports_state = True
        return value

    @property
    def reports_state(self) -> bool | None:
        """Whether the DCU answered ``detector/status/state`` the last time it was asked
        (None before the first time)."""
        return self._reports_state

    def initialize(self) -> None:
        """Initialize the detector (blocks, up to minutes on a real DCU); resets the series id."""
        self.command("detector", "initialize")
        with self._metadata_lock:
            self._metadata.clear()
            self._values.clear()
        self._armed_series_id = None  # series ids start again
        self._announce("initialize")

    def arm(self) -> int:
        """Arm for a series; returns its series id."""
        series_id = self._series_id(self.command("detector", "arm"), "arm")
        self._armed_series_id = series_id
        self._announce("arm")
        return series_id

    def trigger(self, count_time: float | None = None, timeout: float | None = None) -> None:
        """Send a software trigger. In ``ints`` the DCU answers when the triggered images are done,
        so the default timeout is frame_time × nimages + trigger_start_delay + the margin."""
        if timeout is None:
            timeout = self.trigger_timeout(count_time)
        self._announce("trigger_started")
        try:
            self.command("detector", "trigger", value=count_time, timeout=timeout)
        except SimplonError:
            self._announce("trigger_failed")
            raise
        self._announce("trigger_done")

    def disarm(self) -> int:
        """End the series (flushes data, stream end message); returns its series id."""
        return self._ending_command("disarm")

    def cancel(self) -> int:
        """Stop after the current image; returns the series id."""
        return self._ending_command("cancel")

    def abort(self) -> int:
        """Stop at once, dropping data in the pipeline; returns the series id."""
        return self._ending_command("abort")

    def _ending_command(self, name: str) -> int:
        series_id = self._series_id(self.command("detector", name), name)
        self._announce(name)
        return series_id

    # ---------------------------------------------------------------- activity

    def add_activity_listener(self, listener: ActivityListener) -> None:
        """Call ``listener(event)`` after each successful command through this client and for each
        stream event given to :meth:`note_stream` (events: :data:`ACTIVITY_EVENTS`). It runs in
        the thread of the command (or of the stream); an exception it raises is logged and never
        fails the command."""
        with self._listeners_lock:
            self._activity_listeners.append(listener)

    def remove_activity_listener(self, listener: ActivityListener) -> None:
        with self._listeners_lock:
            if listener in self._activity_listeners:
                self._activity_listeners.remove(listener)

    def note_stream(self, event: str, series_id: int | None = None) -> None:
        """Report what the data stream showed: ``series_started`` (a series' header arrived) or
        ``series_ended`` (its end message). With ``series_id``, an event of a series older than
        the one this client armed last is ignored (a late end of the previous series); newer ones
        (armed by another client) count."""
        if event not in STREAM_EVENTS:
            raise ValueError(f"stream event must be one of {', '.join(STREAM_EVENTS)}, not {event!r}")
        armed = self._armed_series_id
        if series_id is not None and armed is not None and int(series_id) < armed:
            log.debug("stream event %s of series %s ignored: series %s is the one armed here",
                      event, series_id, armed)
            return
        self._announce(event)

    def _announce(self, event: str) -> None:
        with self._listeners_lock:
            listeners = list(self._activity_listeners)
        for listener in listeners:
            try:
                listener(event)
            except Exception:  # noqa: BLE001 - a listener must never fail the DCU command
                log.exception("activity listener %r failed on event %r", listener, event)

    def trigger_timeout(self, count_time: float | None = None, *, frame_time: float | None = None,
                        nimages: int | None = None, start_delay: float | None = None) -> float:
        """How long an ints trigger may take: the images' time, the start delay and the margin
        (the values the caller has just read or set are given: fewer GETs)."""
        if frame_time is None:
            frame_time = float(self.get_value("detector", "config", "frame_time"))
        if nimages is None:
            nimages = int(self.get_value("detector", "config", "nimages"))
        if start_delay is None:
            try:
                start_delay = float(self.get_value("detector", "config", "trigger_start_delay") or 0.0)
            except UnknownParameterError:  # older firmware has no trigger_start_delay
                start_delay = 0.0
        exposure = frame_time * nimages
        if count_time is not None:
            exposure = max(exposure, float(count_time))
        return exposure + start_delay + self.timeouts.trigger_margin

    def _series_id(self, body: Any, call: str) -> int:
        if isinstance(body, dict):
            for name in ("sequence id", "series id"):
                if name in body:
                    return int(body[name])
        raise SimplonError(
            f"the DCU at {self.host}:{self.port} answered {call} with {body!r}; expected {{\"sequence id\": N}}"
        )

    # ---------------------------------------------------------------- HTTP

    def _url(self, module: str, task: str, key: str) -> str:
        if module not in MODULES:
            raise ValueError(f"unknown SIMPLON module {module!r}; one of {', '.join(MODULES)}")
        return f"{self.base_url}/{module}/api/{self.api_version}/{task}/{key}"

    def _forget_metadata(self, module: str) -> None:
        """After a write to ``module``: its limits and its values may have moved."""
        with self._metadata_lock:
            for cached in [k for k in self._metadata if k[0] == module]:
                del self._metadata[cached]
            for cached in [k for k in self._values if k[0] == module]:
                self._values[cached] = (-math.inf, *self._values[cached][1:])  # kept, no longer recent

    def _request(
        self, method: str, url: str, *, call: str, value: Any = _NO_BODY, timeout: float | None = None
    ) -> _Answer:
        """One HTTP exchange; transport failures and non-2xx answers become SimplonErrors."""
        timeout = self.timeouts.default if timeout is None else timeout
        # SIMPLON commands without an argument must have no body at all (1.8 reference).
        body = None if value is _NO_BODY else json.dumps({"value": value})
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        where = f"{self.host}:{self.port}"
        try:
            response = self._send(method, url, body, headers, timeout)
        except (urllib3.exceptions.NewConnectionError, urllib3.exceptions.ProtocolError) as error:
            with self._metadata_lock:
                self._values.clear()  # the DCU may come back restarted, with other values
            raise DcuConnectionError(
                f"cannot reach the DCU at {where} for {method} {call}: {_root_cause(error)}; "
                "check that the DCU is on and the host and port are right"
            ) from error
        except urllib3.exceptions.TimeoutError as error:
            raise DcuTimeoutError(
                f"the DCU at {where} did not answer {method} {call} within {timeout:g} s ({error})"
            ) from error
        except (urllib3.exceptions.HTTPError, OSError) as error:
            raise DcuConnectionError(f"{method} {call} to the DCU at {where} failed: {error}") from error
        if not 200 <= response.status_code < 300:
            raise self._request_error(response, method, url, call, has_value=value is not _NO_BODY)
        return response

    def _send(self, method: str, url: str, body: str | None, headers: dict[str, str],
              timeout: float) -> _Answer:
        """One HTTP exchange. A read (GET) whose connection the DCU reset -- a kept-alive one to a
        DCU that restarted, or one that a DCU coming up drops -- is tried again on new
        connections, a few times over a fraction of a second; a command (PUT) never is: it may
        have reached the DCU."""
        for attempt in range(_GET_ATTEMPTS):
            try:
                return self._connections.request(method, url, body, headers, timeout)
            except (urllib3.exceptions.NewConnectionError, urllib3.exceptions.ProtocolError) as error:
                if method != "GET" or attempt == _GET_ATTEMPTS - 1 or not _was_reset(error):
                    raise
                self._connections.forget_idle()  # they lead to the same place
                time.sleep(_GET_RETRY_PAUSE_S * attempt)
        raise AssertionError("unreachable")

    def _request_error(
        self, response: _Answer, method: str, url: str, call: str, *, has_value: bool
    ) -> DcuRequestError:
        status = response.status_code
        dcu_message = _dcu_text(response)
        details = dict(status_code=status, dcu_message=dcu_message, url=url, method=method)
        said = f"HTTP {status}: {dcu_message}" if dcu_message else f"HTTP {status}"
        where = f"{self.host}:{self.port}"
        if status in (400, 404) and self._detector_not_initialized(dcu_message, call):
            return DetectorNotInitializedError(
                f"{method} {call} refused: the detector is not initialized (state 'na'); "
                f"run Initialize first (DCU said {said})",
                **details,
            )
        if status == 404 or (status >= 400 and _says_not_provided(status, dcu_message)):
            return UnknownParameterError(
                f"{method} {call}: the DCU at {where} does not provide this parameter or command "
                f"(DCU said {said})",
                **details,
            )
        is_config_write = method == "PUT" and "/config/" in url
        if status == 400 and (is_config_write or has_value):
            return InvalidValueError(f"{method} {call}: the DCU refused the value (DCU said {said})", **details)
        if is_config_write:
            return DcuRequestError(f"{method} {call}: the DCU at {where} refused the write (DCU said {said})",
                                   **details)
        return DcuRequestError(f"{method} {call} failed on the DCU at {where} ({said})", **details)

    def _detector_not_initialized(self, dcu_message: str, call: str) -> bool:
        """Before Initialize a DCU answers like an unknown key; ask its state to tell them apart
        (not on a DCU that has no state: there nothing is ever "not initialized")."""
        if "not initialized" in dcu_message.lower():
            return True
        if call in ("detector/status/state", "version discovery") or call.endswith("/command/initialize"):
            return False
        if self._reports_state is False:
            return False
        try:
            return self.state() == "na"
        except SimplonError as error:
            log.debug("could not read detector state while classifying an error: %s", error)
            return False

    @staticmethod
    def _changed_keys(response: _Answer, url: str) -> list[str]:
        """The PUT answer: a JSON list of changed keys; empty, ``""`` and ``null`` mean none listed."""
        text = response.text.strip()
        if not text:
            return []
        try:
            body = json.loads(text)
        except ValueError:
            log.debug("PUT %s: answer is not JSON, no changed keys taken from it: %r", url, text)
            return []
        if isinstance(body, list):
            return [str(name) for name in body]
        return []

    @staticmethod
    def _parse_json(response: _Answer, method: str, url: str) -> Any:
        try:
            return response.json()
        except ValueError as error:
            raise SimplonError(f"{method} {url}: the DCU answered with invalid JSON: {response.text[:200]!r}") from error


def _dcu_text(response: _Answer) -> str:
    """The DCU's own words from an error answer: the ``error`` (or ``message``) of a JSON object
    body, else the body text."""
    text = response.text.strip()
    if text.startswith("{"):
        try:
            body = json.loads(text)
        except ValueError:
            return text
        if isinstance(body, dict):
            for field in ("error", "message", "detail"):
                if isinstance(body.get(field), str) and body[field].strip():
                    return body[field].strip()
    return text


def _says_not_provided(status: int, dcu_message: str) -> bool:
    """A 4xx/5xx that means "no such key or command here" rather than a failure: 501, or a body
    worded so (LiberTEM-live's sim answers 500 "Parameter photon_energy not implemented.")."""
    return status == 501 or bool(_NOT_PROVIDED_WORDING.search(dcu_message))


_GET_ATTEMPTS = 3
_GET_RETRY_PAUSE_S = 0.1


def _was_reset(error: BaseException) -> bool:
    """Whether the connection was reset or dropped by the DCU (not refused: nobody listening)."""
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, (ConnectionResetError, ConnectionAbortedError, BrokenPipeError)):
            return True
        if type(cause).__name__ in ("RemoteDisconnected", "ProtocolError"):
            return True
        cause = cause.__context__ or cause.__cause__
    return False


def _root_cause(error: BaseException) -> str:
    """The innermost reason (e.g. 'Connection refused') instead of urllib3's nested reprs."""
    cause: BaseException = error
    while True:
        inner = cause.__context__ or cause.__cause__
        if inner is None:
            break
        cause = inner
    reason = getattr(cause, "strerror", None) or str(cause)
    return reason
