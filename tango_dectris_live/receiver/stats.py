"""Receiver statistics: a snapshot dataclass and the sliding window behind its rates."""
from __future__ import annotations

import threading
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


class RateWindow:
    """Frames/s and bytes/s from cumulative counters sampled over a sliding time window."""

    def __init__(self, window: float = 2.0) -> None:
        self.window = window
        self._samples: deque[tuple[float, int, int]] = deque()
        self._lock = threading.Lock()

    def add(self, when: float, frames: int, nbytes: int) -> None:
        with self._lock:
            self._samples.append((when, frames, nbytes))
            while len(self._samples) > 2 and when - self._samples[1][0] >= self.window:
                self._samples.popleft()

    def rates(self) -> tuple[float, float]:
        """(frames per second, bytes per second); zero until two samples exist."""
        with self._lock:
            if len(self._samples) < 2:
                return 0.0, 0.0
            t0, f0, b0 = self._samples[0]
            t1, f1, b1 = self._samples[-1]
        if t1 <= t0:
            return 0.0, 0.0
        return (f1 - f0) / (t1 - t0), (b1 - b0) / (t1 - t0)
