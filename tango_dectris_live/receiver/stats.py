"""Receiver statistics: a snapshot dataclass, and the rate meter behind its rates (which the
acquisition uses for its processing rate too)."""
from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType


@dataclass(frozen=True)
class ReceiverStats:
    """What the receiver has done since start(); rates over the last ``window`` seconds."""

    frames_received: int
    bytes_received: int
    messages_received: int
    frames_missing: int  # over the finished series
    duplicates: int
    errors: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    slots_in_use: int = 0  # filling, queued or held by a consumer
    slots_total: int = 0
    frames_per_second: float = 0.0
    megabytes_per_second: float = 0.0
    backpressure_seconds: float = 0.0
    series_active: int | None = None
    series_finished: int = 0
    transport: str = "libzmq"  # how the stream is read: "zmtp" or "libzmq" (StreamReceiver's transport)
    connection: str = "always"  # the connection policy: "always" or "per_series"
    # whether a connection is up now (zmtp: handshaken; libzmq: its socket monitor saw the
    # handshake), how often it dropped, why the last connection attempt failed ("" after a
    # success), ZMTP commands seen (PINGs)
    connected: bool = True
    disconnects: int = 0
    connect_error: str = ""
    zmtp_commands: int = 0

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())


class RateMeter:
    """The per-second rate of a cumulative counter (frames received, frames processed, bytes)
    over a sliding window of time: ``add(total, now)`` samples the counter and returns the rate.

    The rate spans the newest sample and the latest one at least ``window`` seconds older (all
    samples while there is less history), so it covers a whole window once there is one: a
    counter that stops moving reads 0 after ``window`` seconds. Samples may come from one thread
    and readers from others.
    """

    def __init__(self, window: float = 2.0) -> None:
        if not window > 0:
            raise ValueError(f"the rate window must be a positive number of seconds, got {window!r}")
        self.window = window
        self._samples: deque[tuple[float, float]] = deque()  # (time, total)
        self._lock = threading.Lock()

    def add(self, total: float, now: float | None = None) -> float:
        """Sample the counter's ``total`` at ``now`` (default: ``time.monotonic()``); the rate."""
        now = time.monotonic() if now is None else now
        with self._lock:
            self._samples.append((now, total))
            while len(self._samples) > 2 and now - self._samples[1][0] >= self.window:
                self._samples.popleft()
            return self._rate()

    def rate(self) -> float:
        """Per second over the window; 0 until two samples at different times exist."""
        with self._lock:
            return self._rate()

    def reset(self) -> None:
        """Forget every sample (a new series: its counter starts again)."""
        with self._lock:
            self._samples.clear()

    def _rate(self) -> float:
        if len(self._samples) < 2:
            return 0.0
        (t0, n0), (t1, n1) = self._samples[0], self._samples[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0
