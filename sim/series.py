"""The contract between the simulated DCU (REST state machine) and the stream senders.

The state machine decides *when* a series starts, which frames are sent and when it ends; a
:class:`StreamSink` decides *what goes on the wire*. The REST side only ever talks to a sink
through this protocol, so the stream implementation can be swapped (null sink, v1/v2 sender,
replay) without touching the state machine.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class SeriesInfo:
    """Everything a stream sender needs to know about one armed series."""

    series_id: int
    series_unique_id: str  # 26-character ULID (stream v2)
    arm_date: str  # RFC 3339 with offset, e.g. 2026-11-23T19:14:02.123+00:00
    trigger_mode: str  # ints / inte / exts / exte
    nimages: int
    ntrigger: int
    count_time: float
    frame_time: float
    width: int  # x_pixels_in_detector (after ROI / binning)
    height: int  # y_pixels_in_detector (after ROI / binning)
    bit_depth: int  # bit_depth_image: 8, 16 or 32
    compression: str  # detector/config/compression: bslz4, lz4, none
    detector_config: dict[str, Any] = field(default_factory=dict)  # snapshot of every config value
    stream_config: dict[str, Any] = field(default_factory=dict)  # mode, format, header_detail, appendices

    @property
    def total_frames(self) -> int:
        """Frames in the whole series (nimages is 1 in the inte/exte modes)."""
        return self.nimages * self.ntrigger

    @property
    def stream_enabled(self) -> bool:
        return self.stream_config.get("mode") == "enabled"


class StreamSink(Protocol):
    """What the state machine calls; implementations live in the sim's stream modules."""

    def bind(self) -> tuple[int, int]:
        """Bind the v1 and v2 PUSH sockets; return the actual (v1 port, v2 port)."""

    def start_series(self, series: SeriesInfo) -> None:
        """Called on arm: send the global header (v1) or start message (v2) if the stream is on."""

    def send_frames(self, series: SeriesInfo, first_frame: int, count: int, period_s: float,
                    stop: threading.Event) -> int:
        """Send frames ``first_frame .. first_frame+count-1`` (0-based, continuous across
        triggers), one every ``period_s`` seconds (0: as fast as possible). Return early when
        ``stop`` is set. Returns the number of frames sent. With the stream disabled it only
        takes the time the exposure would take."""

    def end_series(self, series: SeriesInfo) -> None:
        """Called on completion, disarm, cancel and abort: the end-of-series message."""

    def dropped_frames(self) -> int:
        """Images of the current (or last) series no consumer took (``stream/status/dropped``)."""

    def get_sim_config(self) -> dict[str, Any]:
        """Simulator-only settings (data generator, pacing, faults) as JSON-able values."""

    def update_sim_config(self, changes: dict[str, Any]) -> dict[str, Any]:
        """Apply simulator-only settings; raise ValueError with a readable message if invalid."""

    def close(self) -> None:
        """Unbind the sockets."""


class NullStreamSink:
    """A sink that sends nothing but keeps the detector's timing (stream not implemented)."""

    def __init__(self) -> None:
        self._sim_config: dict[str, Any] = {}

    def bind(self) -> tuple[int, int]:
        return 0, 0

    def start_series(self, series: SeriesInfo) -> None:
        return None

    def send_frames(self, series: SeriesInfo, first_frame: int, count: int, period_s: float,
                    stop: threading.Event) -> int:
        # Pace against a deadline (start + i*period) so per-frame overhead does not add up.
        start = time.monotonic()
        for sent in range(count):
            if period_s > 0:
                if stop.wait(max(0.0, start + (sent + 1) * period_s - time.monotonic())):
                    return sent
            elif stop.is_set():
                return sent
        return count

    def end_series(self, series: SeriesInfo) -> None:
        return None

    def dropped_frames(self) -> int:
        return 0

    def get_sim_config(self) -> dict[str, Any]:
        return dict(self._sim_config)

    def update_sim_config(self, changes: dict[str, Any]) -> dict[str, Any]:
        raise ValueError("this simulator has no stream sender; no simulator settings exist")

    def close(self) -> None:
        return None
