"""The simulator's own stream faults into the compiled receiver: each fault has its counted,
documented outcome (docs/receiver.md), and the next acquisition on the same receiver is complete.

Every acquisition is driven the way the device does it in active mode: the DCU's arm (which sends
the series header at once) through :class:`DetectorClient`, then ``receiver.arm(series_id)``, then
the software trigger.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

from sim.data import ScanDataGenerator, default_nav_shape
from tango_dectris_live.receiver import (
    ReceiverError,
    ReceiverMode,
    SeriesFinished,
    SeriesStarted,
    SeriesSummary,
    StackReady,
    StreamReceiver,
    decode_frames_into,
)
from tango_dectris_live.simplon import DetectorClient
from tango_dectris_live.stream import StreamFormatError
from tango_dectris_live.testing import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.parametrize("simulator", ["ARINA"], indirect=True)]

NIMAGES = 24
SHAPE = (96, 96)  # ARINA binned 2x2
FAULT_FRAME = 5
FORMATS = [pytest.param("legacy", id="v1"), pytest.param("cbor", id="v2")]


@dataclass
class Acquisition:
    """What the receiver delivered for one series."""

    summary: SeriesSummary
    header_series: int
    frames: dict[int, np.ndarray] = field(default_factory=dict)
    undecodable: dict[int, str] = field(default_factory=dict)  # frame number: reason and message

    @property
    def stored(self) -> list[int]:
        """Frame numbers that are in a frame stack, decodable or not."""
        return sorted([*self.frames, *self.undecodable])


class SimulatedBeamline:
    """A simulator configured for small ``ints`` series and a client to drive it."""

    def __init__(self, simulator: Any, stream_format: str) -> None:
        self.simulator = simulator
        self.stream_format = stream_format
        self.version = 1 if stream_format == "legacy" else 2
        self.client = DetectorClient("127.0.0.1", simulator.port)
        self.client.initialize()
        for key, value in (("trigger_mode", "ints"), ("nimages", NIMAGES), ("ntrigger", 1),
                           ("compression", "bslz4"), ("binning_mode", "2x2"), ("pixel_format", "uint16")):
            self.client.write("detector", key, value)
        self.client.write("stream", "format", stream_format)
        self.client.write("stream", "mode", "enabled")
        # a receiver held back by a consumer must never make the simulator drop frames
        simulator.detector.update_sim_config({"pacing": "max", "send_timeout_ms": 60_000})
        settings = simulator.detector.get_sim_config()
        self.truth = ScanDataGenerator(SHAPE[1], SHAPE[0], np.uint16, nav_shape=default_nav_shape(NIMAGES),
                                       seed=settings["seed"], dose=settings["dose"],
                                       pool_size=settings["pool_size"])
        port = simulator.stream_port if self.version == 1 else simulator.stream2_port
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self._trigger_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sim-trigger")

    def close(self) -> None:
        self._trigger_thread.shutdown(wait=True)
        self.client.close()

    @contextmanager
    def receiver(self, **settings: Any) -> Iterator[StreamReceiver]:
        options = dict(stream_version=self.version, frame_shape=SHAPE, dtype="uint16", frame_stack_size=8,
                       num_slots=4, timeout=5.0)
        options.update(settings)
        with StreamReceiver(self.endpoint, **options) as receiver:
            yield receiver

    def set_faults(self, faults: Sequence[dict[str, Any]]) -> None:
        self.simulator.detector.update_sim_config({"faults": list(faults)})

    def arm_and_trigger(self, receiver: StreamReceiver | None) -> tuple[int, Future]:
        """DCU arm (the header goes out now), receiver.arm(series id), trigger in the background
        (it returns once the simulator has sent the frames, which back-pressure can delay)."""
        series_id = self.client.arm()
        if receiver is not None:
            receiver.arm(series_id)
        return series_id, self._trigger_thread.submit(self.client.trigger)

    def acquire(self, receiver: StreamReceiver, faults: Sequence[dict[str, Any]] = ()) -> Acquisition:
        self.set_faults(faults)
        series_id, triggered = self.arm_and_trigger(receiver)
        acquisition = collect(receiver)
        triggered.result(timeout=30)
        assert acquisition.header_series == series_id == acquisition.summary.series
        return acquisition

    def assert_matches_truth(self, acquisition: Acquisition) -> None:
        for number, frame in acquisition.frames.items():
            np.testing.assert_array_equal(frame, self.truth.frame(number), err_msg=f"frame {number}")

    def assert_next_acquisition_is_complete(self, receiver: StreamReceiver) -> None:
        acquisition = self.acquire(receiver)
        assert acquisition.summary.end_reason == "complete"
        assert acquisition.summary.missing == 0 and not acquisition.summary.errors
        assert sorted(acquisition.frames) == list(range(NIMAGES)) and not acquisition.undecodable
        self.assert_matches_truth(acquisition)
        assert receiver.mode is ReceiverMode.IDLE


def collect(receiver: StreamReceiver, timeout: float = 20.0) -> Acquisition:
    """Events until the series finishes; each stored frame decoded on its own, so that one
    undecodable frame does not hide the others."""
    header_series = -1
    frames: dict[int, np.ndarray] = {}
    undecodable: dict[int, str] = {}
    while True:
        event = receiver.next_event(timeout)
        assert event is not None, f"no receiver event within {timeout} s"
        if isinstance(event, SeriesStarted):
            header_series = event.header.series_id
        elif isinstance(event, StackReady):
            handle = event.handle
            out = np.zeros((1, *handle.shape), np.uint16)
            numbers = handle.index()["frame"]
            for position in range(handle.frames):
                number = int(numbers[position])
                assert number not in frames and number not in undecodable, f"frame {number} delivered twice"
                try:
                    decode_frames_into(handle, position, position + 1, out)
                except StreamFormatError as error:
                    # only the text: the traceback would keep views of the shared memory alive
                    undecodable[number] = f"{error.reason}: {error}"
                else:
                    frames[number] = out[0].copy()
            receiver.release(handle)
        elif isinstance(event, SeriesFinished):
            return Acquisition(event.summary, header_series, frames, undecodable)
        else:
            raise AssertionError(f"unexpected receiver event {event!r}")


@pytest.fixture(params=FORMATS)
def beamline(request, simulator):
    line = SimulatedBeamline(simulator, request.param)
    try:
        yield line
    finally:
        line.close()


def _all_but(*missing: int) -> list[int]:
    return [n for n in range(NIMAGES) if n not in missing]


# ---- one test per simulator fault ------------------------------------------------------------------

def test_clean_series_in_active_mode_keeps_the_header_sent_at_arm(beamline):
    with beamline.receiver() as receiver:
        assert receiver.mode is ReceiverMode.IDLE  # not reading while the DCU's arm sends the header
        beamline.assert_next_acquisition_is_complete(receiver)
        assert receiver.stats().error_count == 0


def test_drop(beamline):
    with beamline.receiver() as receiver:
        got = beamline.acquire(receiver, [{"kind": "drop", "frames": [FAULT_FRAME, 11]}])
        assert got.summary.end_reason == "end_message"
        np.testing.assert_array_equal(got.summary.missing_frames, [FAULT_FRAME, 11])
        assert sorted(got.frames) == _all_but(FAULT_FRAME, 11) and not got.summary.errors
        beamline.assert_matches_truth(got)
        assert receiver.stats().frames_missing == 2
        beamline.assert_next_acquisition_is_complete(receiver)


def test_duplicate(beamline):
    with beamline.receiver() as receiver:
        got = beamline.acquire(receiver, [{"kind": "duplicate", "frame": FAULT_FRAME}])
        assert got.summary.end_reason == "complete" and got.summary.missing == 0
        assert dict(got.summary.errors) == {"duplicate": 1}
        assert sorted(got.frames) == list(range(NIMAGES))  # collect() fails on a double delivery
        beamline.assert_matches_truth(got)
        assert receiver.stats().duplicates == 1
        beamline.assert_next_acquisition_is_complete(receiver)


def test_reorder(beamline):
    with beamline.receiver() as receiver:
        got = beamline.acquire(receiver, [{"kind": "reorder", "frames": [FAULT_FRAME, 17]}])
        assert got.summary.end_reason == "complete" and got.summary.missing == 0 and not got.summary.errors
        assert sorted(got.frames) == list(range(NIMAGES))
        beamline.assert_matches_truth(got)  # placed by frame number, not by arrival
        beamline.assert_next_acquisition_is_complete(receiver)


def test_corrupt_blob_is_stored_and_fails_or_differs_at_decode(beamline):
    with beamline.receiver() as receiver:
        got = beamline.acquire(receiver, [{"kind": "corrupt", "frame": FAULT_FRAME}])
        # the receiver does not decompress: the corrupt frame is received like any other
        assert got.summary.end_reason == "complete" and got.summary.missing == 0 and not got.summary.errors
        assert got.stored == list(range(NIMAGES))
        corrupt = got.frames.pop(FAULT_FRAME, None)
        assert corrupt is None or not np.array_equal(corrupt, beamline.truth.frame(FAULT_FRAME))
        assert set(got.undecodable) <= {FAULT_FRAME}
        beamline.assert_matches_truth(got)
        beamline.assert_next_acquisition_is_complete(receiver)


def test_truncated_blob(beamline):
    with beamline.receiver() as receiver:
        got = beamline.acquire(receiver, [{"kind": "truncate", "frame": FAULT_FRAME, "mode": "blob"}])
        if beamline.version == 1:
            # the dimage_d part declares the full size: checked in the receiver, frame dropped
            assert got.summary.end_reason == "end_message"
            np.testing.assert_array_equal(got.summary.missing_frames, [FAULT_FRAME])
            assert dict(got.summary.errors) == {"size_mismatch": 1}
            assert sorted(got.frames) == _all_but(FAULT_FRAME)
        else:
            # v2 carries no separate size: the short blob is stored and its decode fails
            assert got.summary.end_reason == "complete" and got.summary.missing == 0
            assert sorted(got.undecodable) == [FAULT_FRAME]
            assert sorted(got.frames) == _all_but(FAULT_FRAME)
        beamline.assert_matches_truth(got)
        beamline.assert_next_acquisition_is_complete(receiver)


def test_truncated_message_parts(beamline):
    with beamline.receiver() as receiver:
        got = beamline.acquire(receiver, [{"kind": "truncate", "frame": FAULT_FRAME, "mode": "parts"}])
        assert got.summary.end_reason == "end_message"
        np.testing.assert_array_equal(got.summary.missing_frames, [FAULT_FRAME])
        # v1: two of four parts; v2: half a CBOR message, refused by the parser
        assert dict(got.summary.errors) == ({"truncated": 1} if beamline.version == 1 else {"bad_cbor": 1})
        assert sorted(got.frames) == _all_but(FAULT_FRAME)
        beamline.assert_matches_truth(got)
        beamline.assert_next_acquisition_is_complete(receiver)


def test_wrong_series_id(beamline):
    with beamline.receiver() as receiver:
        got = beamline.acquire(receiver, [{"kind": "wrong_series", "frame": FAULT_FRAME}])
        assert got.summary.end_reason == "end_message"
        np.testing.assert_array_equal(got.summary.missing_frames, [FAULT_FRAME])
        assert dict(got.summary.errors) == {"wrong_series": 1}
        beamline.assert_matches_truth(got)
        beamline.assert_next_acquisition_is_complete(receiver)


def test_stale_end_before_the_header(beamline):
    with beamline.receiver() as receiver:
        beamline.assert_next_acquisition_is_complete(receiver)  # the stale end is then a repeat
        got = beamline.acquire(receiver, [{"kind": "stale_end"}])
        assert got.summary.end_reason == "complete" and got.summary.missing == 0
        assert receiver.stats().errors == {"stale": 1}
        beamline.assert_matches_truth(got)
        beamline.assert_next_acquisition_is_complete(receiver)


def test_stall_shorter_than_the_timeout(beamline):
    with beamline.receiver(timeout=10.0) as receiver:
        got = beamline.acquire(receiver, [{"kind": "stall", "frame": FAULT_FRAME, "ms": 300}])
        assert got.summary.end_reason == "complete" and got.summary.missing == 0 and not got.summary.errors
        beamline.assert_matches_truth(got)
        beamline.assert_next_acquisition_is_complete(receiver)


def test_sender_stops_mid_series_ends_by_timeout(beamline):
    with beamline.receiver(timeout=0.5) as receiver:
        got = beamline.acquire(receiver, [{"kind": "stop", "frame": FAULT_FRAME}])
        assert got.summary.end_reason == "timeout"
        np.testing.assert_array_equal(got.summary.missing_frames, np.arange(FAULT_FRAME + 1, NIMAGES))
        assert sorted(got.frames) == list(range(FAULT_FRAME + 1))
        beamline.assert_matches_truth(got)
        receiver.timeout = 10.0  # the next series may wait for the trigger on a busy machine
        beamline.assert_next_acquisition_is_complete(receiver)


def test_socket_closed_and_bound_again(beamline):
    with beamline.receiver() as receiver:
        got = beamline.acquire(receiver, [{"kind": "rebind", "frame": FAULT_FRAME}])
        # messages still queued in the closed socket are lost (as on a DCU restart): only frames
        # sent before the rebind can be missing, and the series still ends with the DCU's end
        assert got.summary.end_reason in ("complete", "end_message")
        assert set(got.summary.missing_frames.tolist()) <= set(range(FAULT_FRAME + 1))
        assert sorted(got.frames) == _all_but(*got.summary.missing_frames.tolist())
        beamline.assert_matches_truth(got)
        beamline.assert_next_acquisition_is_complete(receiver)  # ZeroMQ reconnected by itself


# ---- active mode edge cases, back-pressure, passive mode ---------------------------------------------

def test_arm_without_a_header_reports_no_header_then_recovers(beamline):
    with beamline.receiver(timeout=0.5) as receiver:
        beamline.client.write("stream", "mode", "disabled")  # the DCU arms but streams nothing
        series_id, triggered = beamline.arm_and_trigger(receiver)
        event = receiver.next_event(20)
        triggered.result(timeout=30)
        assert isinstance(event, ReceiverError) and event.kind == "no_header"
        assert f"series {series_id} armed but no header" in event.message
        assert receiver.mode is ReceiverMode.IDLE and receiver.stats().errors == {"no_header": 1}
        beamline.client.write("stream", "mode", "enabled")
        receiver.timeout = 10.0  # the next series may wait for the trigger on a busy machine
        beamline.assert_next_acquisition_is_complete(receiver)


def test_messages_of_an_unarmed_series_are_drained_as_stale(beamline):
    with beamline.receiver() as receiver:
        # a series the receiver was not armed for: its messages wait in ZeroMQ (receiver idle)
        _series_id, triggered = beamline.arm_and_trigger(None)
        triggered.result(timeout=30)
        beamline.assert_next_acquisition_is_complete(receiver)
        # header, every frame and the end of the unarmed, older series
        assert receiver.stats().errors == {"stale": NIMAGES + 2}


def test_back_pressure_with_two_slots_delivers_every_frame_once(beamline):
    with beamline.receiver(num_slots=2, frame_stack_size=4, receive_hwm=4) as receiver:
        beamline.set_faults([])
        series_id, triggered = beamline.arm_and_trigger(receiver)
        held: list[Any] = []
        frames: dict[int, np.ndarray] = {}
        summary = None
        while summary is None:
            event = receiver.next_event(20)
            assert event is not None and not isinstance(event, ReceiverError), event
            if isinstance(event, StackReady):
                handle = event.handle
                out = np.zeros((handle.frames, *SHAPE), np.uint16)
                for number, frame in zip(decode_frames_into(handle, 0, handle.frames, out), out):
                    assert int(number) not in frames, f"frame {int(number)} delivered twice"
                    frames[int(number)] = frame.copy()
                held.append(handle)
                if len(held) == 2:
                    # both slots are with the consumer: the receiver has to stop reading
                    wait_for(lambda: receiver.stats().backpressure_seconds > 0, what="back-pressure")
                    receiver.release(held.pop(0))
            elif isinstance(event, SeriesFinished):
                summary = event.summary
        for handle in held:
            receiver.release(handle)
        triggered.result(timeout=30)
        assert summary.series == series_id and summary.end_reason == "complete" and summary.missing == 0
        assert sorted(frames) == list(range(NIMAGES))
        for number, frame in frames.items():
            np.testing.assert_array_equal(frame, beamline.truth.frame(number))
        stats = receiver.stats()
        assert stats.backpressure_seconds > 0 and stats.slots_total == 2 and stats.error_count == 0
        assert beamline.simulator.sink.dropped == 0


def test_passive_mode_takes_three_series_in_a_row(beamline):
    with beamline.receiver() as receiver:
        receiver.listen()
        armed = []
        for _ in range(3):
            series_id, triggered = beamline.arm_and_trigger(None)  # armed by someone else
            triggered.result(timeout=30)
            armed.append(series_id)
        for series_id in armed:
            got = collect(receiver)
            assert got.summary.series == got.header_series == series_id
            assert got.summary.end_reason == "complete" and got.summary.missing == 0
            assert sorted(got.frames) == list(range(NIMAGES))
            beamline.assert_matches_truth(got)
        assert receiver.mode is ReceiverMode.LISTENING
        assert receiver.stats().series_finished == 3 and receiver.stats().error_count == 0
