"""A whole live acquisition without a simulator process: a fake DCU client and an in-memory stream.

:class:`FakeDcu` answers what the acquisition asks the DCU (config values, writes, arm, trigger,
cancel, abort) and, like a DCU, streams each armed series when triggered: its frames go to an
:class:`InMemoryStream` (the acquisition's receiver *and* frame source, built by
:class:`InMemoryPipelineFactory`), cut into stacks that the real worker processes decode from a
.npy file. Frames are deterministic; :meth:`FakeDcu.frames_of` gives the ground truth.
"""
from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from tango_dectris_live.processing.runner import LiveRunner
from tango_dectris_live.receiver import ReceiverStats, SeriesFinished, SeriesSummary
from tango_dectris_live.simplon.errors import DcuRequestError, UnknownParameterError
from tango_dectris_live.simplon.parameters import ParameterInfo
from tango_dectris_live.testing import wait_for

from .processing_fakes import ArrayFrameSource

SHAPE = (16, 16)


class InMemoryStream(ArrayFrameSource):
    """The receiver's control surface (arm, listen, cancel, connect, timeout, stats) over an
    in-memory frame source."""

    def __init__(self, folder: Path) -> None:
        super().__init__(folder)
        self.timeout = 10.0
        self.running = True
        self.armed: list[int] = []
        self.listening = False
        self.cancelled = 0
        self.frames_received = 0
        self.receiver_errors: list[tuple[str, str]] = []
        self.errors_seen = 0
        self.last_summary = None
        self._open_series: int | None = None

    # the receiver's side, as LiveAcquisition uses it
    def connect(self, timeout: float = 5.0) -> None:
        pass

    def arm(self, series: int) -> None:
        self.armed.append(series)

    def listen(self) -> None:
        self.listening = True

    def cancel(self) -> None:
        self.cancelled += 1
        self.listening = False
        self.end(reason="cancelled")

    def stop(self) -> None:
        self.running = False

    def stats(self) -> ReceiverStats:
        return ReceiverStats(frames_received=self.frames_received, bytes_received=0, messages_received=0,
                             frames_missing=0, duplicates=0, transport="in-memory")

    def next_event(self, timeout: float | None):
        event = super().next_event(timeout)
        summary = getattr(event, "summary", None)
        if summary is not None:
            self.last_summary = summary
        return event

    # the DCU's side
    def begin(self, series: int, frames: np.ndarray) -> None:
        self._open_series = series
        self._count = len(frames)
        self._sent: set[int] = set()
        self.begin_series(series, frames)

    def send(self, numbers: list[int], stack_size: int) -> None:
        self.frames_received += len(numbers)
        self._sent.update(numbers)
        self.send_frames(numbers, stack_size)

    def end(self, reason: str = "complete") -> None:
        """The series ends as the receiver ends it; the frames never sent are missing."""
        with self._lock:
            series, self._open_series = self._open_series, None
        if series is None:
            return
        missing = np.asarray(sorted(set(range(self._count)) - self._sent), np.int64)
        self._events.put(SeriesFinished(SeriesSummary(
            series=series, expected_frames=self._count, frames_received=len(self._sent), missing_frames=missing,
            end_reason=reason, ended_at=time.monotonic())))


class InMemoryPipelineFactory:
    """Hands a LiveAcquisition the in-memory stream instead of a StreamReceiver; the runner is
    the real one (worker processes)."""

    def __init__(self, stream: InMemoryStream, start_method: str = "spawn") -> None:
        self.stream = stream
        self.start_method = start_method
        self.runners_built = 0

    def receiver(self, geometry, **_settings: Any) -> InMemoryStream:
        self.stream.running = True
        return self.stream

    def source(self, receiver: InMemoryStream) -> InMemoryStream:
        return receiver

    def runner(self, workers: int, registry) -> LiveRunner:
        self.runners_built += 1
        return LiveRunner(workers, registry, start_method=self.start_method)


def _not_provided(module: str, task: str, key: str) -> UnknownParameterError:
    return UnknownParameterError(f"the fake DCU does not provide {module}/{task}/{key}", status_code=404,
                                 dcu_message="", url=f"{module}/{task}/{key}", method="GET")


class FakeDcu:
    """A DCU client double: config values, writes, and commands that stream into ``stream``.

    ``drop``: frame numbers never sent; ``hold_after``: with it, a trigger sends frames up to this
    number, then waits for :attr:`release` before sending the rest (so that a test can act
    mid-series)."""

    def __init__(self, stream: InMemoryStream, *, stack_size: int = 4) -> None:
        self.stream = stream
        self.stack_size = stack_size
        self.config: dict[tuple[str, str], Any] = {
            ("detector", "x_pixels_in_detector"): SHAPE[1], ("detector", "y_pixels_in_detector"): SHAPE[0],
            ("detector", "bit_depth_image"): 16, ("detector", "nimages"): 1, ("detector", "ntrigger"): 1,
            ("detector", "trigger_mode"): "ints", ("detector", "frame_time"): 0.001,
            ("detector", "count_time"): 0.0009, ("stream", "format"): "legacy", ("stream", "mode"): "enabled",
        }
        self.series_id = 0
        self.commands: list[str] = []
        self.drop: set[int] = set()
        self.hold_after: int | None = None
        self.release = threading.Event()
        self.refuse_trigger = False
        self._sending = threading.Lock()
        self._cut_short = threading.Event()

    # what the supervisor and the parameter catalogue ask (a DCU without key listings)
    host, port = "fake-dcu", 0
    dcu_state = "idle"

    def state(self) -> str:
        return self.dcu_state

    def discover_version(self) -> str:
        return "1.8.0"

    def list_keys(self, module: str, task: str) -> list[str]:
        raise _not_provided(module, task, "keys")

    def describe(self, module: str, task: str, key: str) -> ParameterInfo:
        return ParameterInfo.from_response(module, task, key, {"value": self.get_value(module, task, key)})

    def add_activity_listener(self, listener) -> None:
        pass

    def initialize(self) -> None:
        self.commands.append("initialize")
        self.dcu_state = "idle"

    def close(self) -> None:
        pass

    # reads and writes
    def get_value(self, module: str, task: str, key: str) -> Any:
        if (module, task, key) == ("detector", "status", "state"):
            return self.dcu_state
        if (module, key) not in self.config:
            raise _not_provided(module, task, key)
        return self.config[(module, key)]

    def write(self, module: str, key: str, value: Any) -> dict[str, Any]:
        self.config[(module, key)] = value
        return {key: value}

    def note_stream(self, event: str, series_id: int | None = None) -> None:
        self.commands.append(event)

    # commands
    def frames_of(self, series: int) -> np.ndarray:
        count = int(self.config[("detector", "nimages")]) * int(self.config[("detector", "ntrigger")])
        rng = np.random.default_rng(series)
        return rng.integers(0, 1000, size=(count, *SHAPE), dtype=np.uint16)

    def arm(self) -> int:
        self.series_id += 1
        self.commands.append("arm")
        self._cut_short.clear()
        self.stream.begin(self.series_id, self.frames_of(self.series_id))
        return self.series_id

    def trigger_timeout(self, count_time: float | None = None, *, frame_time: float | None = None,
                        nimages: int | None = None, start_delay: float | None = None) -> float:
        return 10.0

    def known_config(self) -> dict[str, tuple[Any, str | None]]:
        return {f"{module}/{key}": (value, None) for (module, key), value in self.config.items()}

    def recent_value(self, module: str, key: str, max_age: float) -> Any:
        return self.get_value(module, "config", key)

    def trigger(self, count_time: float | None = None, timeout: float | None = None) -> None:
        self.commands.append("trigger")
        if self.refuse_trigger:
            raise DcuRequestError("PUT detector/command/trigger failed (HTTP 500: trigger unit fault)",
                                  status_code=500, dcu_message="trigger unit fault", url="", method="PUT")
        count = len(self.frames_of(self.series_id))
        numbers = [n for n in range(count) if n not in self.drop]
        with self._sending:
            if self.hold_after is not None:
                first = [n for n in numbers if n <= self.hold_after]
                self.stream.send(first, self.stack_size)
                numbers = [n for n in numbers if n > self.hold_after]
                while not (self.release.wait(0.05) or self._cut_short.is_set()):
                    pass
                if self._cut_short.is_set():
                    return
            self.stream.send(numbers, self.stack_size)
            self.stream.end()

    def _ending(self, name: str) -> int:
        """disarm, cancel, abort: a series still streaming ends with what was sent (its end
        message); the frames not sent are missing."""
        self.commands.append(name)
        self._cut_short.set()
        self.stream.end(reason="end_message")
        return self.series_id

    def disarm(self) -> int:
        return self._ending("disarm")

    def cancel(self) -> int:
        return self._ending("cancel")

    def abort(self) -> int:
        return self._ending("abort")


def wait_until(condition, timeout: float = 60.0, what: str = "condition") -> None:
    wait_for(condition, timeout, what, interval=0.01)
