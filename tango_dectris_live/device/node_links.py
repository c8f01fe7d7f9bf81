"""A merging device's receiver nodes, over Tango: commands fanned out with a ``tango.Group``,
partial results taken from each node's ``partial_results`` change events.

The nodes are plain ``DectrisLive`` devices with the ``Role`` property ``node``, known by their
Tango device names (the merging device's ``Nodes`` property) and started like any Tango server
(Starter, systemd). Nothing here is a cluster manager of its own: Tango finds, starts and reaches them.
"""
from __future__ import annotations

import logging
import threading
from typing import Any, Callable

import tango

from ..processing.partials import PartialResults, PartialResultsError

log = logging.getLogger(__name__)

PARTIAL_RESULTS = "partial_results"
# Prepare builds a node's receiver and workers and connects it: seconds when its workers are new
COMMAND_TIMEOUT_MS = 30_000
PING_TIMEOUT_MS = 2_000


class TangoNodes:
    """The node devices ``names`` (see the module docstring)."""

    def __init__(self, names: list[str]) -> None:
        self.names = list(names)
        self.on_partial: Callable[[str, PartialResults], None] | None = None
        self.on_problem: Callable[[str, str], None] | None = None
        self._lock = threading.Lock()
        self._proxies: dict[str, tango.DeviceProxy] = {}
        self._pings: dict[str, tango.DeviceProxy] = {}
        self._subscriptions: dict[str, int] = {}

    def _proxy(self, name: str, ping: bool = False) -> tango.DeviceProxy:
        """A proxy per node (another, with a short timeout, for pings: a dead node's host may
        take the whole timeout to refuse)."""
        table = self._pings if ping else self._proxies
        with self._lock:
            proxy = table.get(name)
            if proxy is None:
                proxy = tango.DeviceProxy(name)
                proxy.set_timeout_millis(PING_TIMEOUT_MS if ping else COMMAND_TIMEOUT_MS)
                table[name] = proxy
            return proxy

    def connect(self) -> None:
        """Subscribe to every node's partial results; a node that is not up yet is subscribed
        once it is (Tango's stateless subscription retries)."""
        for name in self.names:
            if name in self._subscriptions:
                continue
            try:
                proxy = self._proxy(name)
                self._subscriptions[name] = proxy.subscribe_event(
                    PARTIAL_RESULTS, tango.EventType.CHANGE_EVENT, self._callback(name), stateless=True)
            except tango.DevFailed as error:
                log.warning("cannot subscribe to the partial results of node %s: %s", name, _reason(error))

    def _callback(self, name: str) -> Callable[[Any], None]:
        def take(event: Any) -> None:
            if event.err:
                # heartbeat lost, node restarted: the ping of a running series decides about it
                log.debug("node %s: event error %s", name, event.errors[0].desc if event.errors else "")
                return
            value = event.attr_value.value if event.attr_value is not None else None
            if not value or len(value) != 2 or not value[1]:
                return  # the empty value a node has before its first series
            try:
                partial = PartialResults.decode(value[0], value[1])
            except PartialResultsError as error:
                if self.on_problem is not None:
                    self.on_problem(name, str(error))
                return
            if self.on_partial is not None:
                self.on_partial(name, partial)
        return take

    def progress(self, name: str) -> tuple[int, int] | str:
        """(series id, frames processed) of node ``name`` as it reports them now, or why it does
        not answer (a short timeout: a dead node must not hold the series up)."""
        try:
            values = self._proxy(name, ping=True).read_attributes(["series_id", "frames_processed"])
            return int(values[0].value), int(values[1].value)
        except tango.DevFailed as error:
            return _reason(error)

    def read_partial(self, name: str) -> PartialResults | None:
        """The node's partial results read directly (when its events did not come: a node
        restarted since the subscription is subscribed again by Tango only after a while)."""
        try:
            value = self._proxy(name).read_attribute(PARTIAL_RESULTS).value
        except tango.DevFailed as error:
            log.debug("reading the partial results of node %s: %s", name, _reason(error))
            return None
        if not value or len(value) != 2 or not value[1]:
            return None
        try:
            return PartialResults.decode(value[0], value[1])
        except PartialResultsError as error:
            if self.on_problem is not None:
                self.on_problem(name, str(error))
            return None

    def alive(self, name: str) -> str:
        try:
            self._proxy(name, ping=True).ping()
            return ""
        except tango.DevFailed as error:
            return _reason(error)

    def command(self, names: list[str], command: str, argument: Any = None) -> dict[str, str]:
        """``command`` on every node of ``names`` at once (a ``tango.Group``); the failures."""
        if not names:
            return {}
        group = tango.Group("dectris-live-nodes")
        group.add(names, timeout_ms=COMMAND_TIMEOUT_MS)
        replies = group.command_inout(command) if argument is None else group.command_inout(command, argument)
        failures = {}
        for reply in replies:
            if reply.has_failed():
                failures[reply.dev_name()] = _reason_of_stack(reply.get_err_stack())
        return {self._known(name): reason for name, reason in failures.items()}

    def _known(self, name: str) -> str:
        """The name as configured (a group answers with lower-case names, maybe with a host)."""
        lowered = name.lower()
        for known in self.names:
            if lowered == known.lower() or lowered.endswith("/" + known.lower()):
                return known
        return name

    def close(self) -> None:
        for name, subscription in list(self._subscriptions.items()):
            try:
                self._proxies[name].unsubscribe_event(subscription)
            except tango.DevFailed as error:
                log.debug("unsubscribing from node %s: %s", name, _reason(error))
        self._subscriptions.clear()


def _reason(error: tango.DevFailed) -> str:
    return _reason_of_stack(error.args)


def _reason_of_stack(stack: Any) -> str:
    if not stack:
        return "failed (no reason given)"
    first = stack[0]
    return f"{first.reason}: {first.desc.strip()}"
