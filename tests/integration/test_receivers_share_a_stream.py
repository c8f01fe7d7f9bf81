"""Two receivers on one detector stream, as receiver nodes will be: the DCU deals the messages
round-robin, so one receiver gets the header and one the end, and each a share of the frames. Armed
with the series as the DCU's configuration announces it, each takes its share without a header; the
one without the end is ended by ``cancel``; together they have every frame, exactly, once."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from tango_dectris_live.receiver import StreamReceiver, decode_frames_into
from tango_dectris_live.stream import SeriesHeader
from tango_dectris_live.testing import wait_for
from tango_dectris_live.testing.stream_producer import collect_series

from .test_sim_to_receiver import _put, prepare_series

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("simulator", ["ARINA"], indirect=True)
@pytest.mark.parametrize("stream_format, version, port_attr", [("legacy", 1, "stream_port"),
                                                                ("cbor", 2, "stream2_port")])
def test_two_receivers_announced_the_series_have_every_frame_once(simulator, stream_format, version, port_attr):
    nimages = 400
    truth, (height, width), dtype = prepare_series(simulator, nimages, stream_format)
    endpoint = f"tcp://127.0.0.1:{getattr(simulator, port_attr)}"
    receivers = [StreamReceiver(endpoint, stream_version=version, frame_shape=(height, width), dtype=dtype,
                                frame_stack_size=16, num_slots=8) for _ in range(2)]
    results: list[tuple | None] = [None, None]
    try:
        for receiver in receivers:
            receiver.start()
            receiver.connect()  # both connected before the arm: the DCU deals its messages to both
        series = int(_put(simulator, "detector", "command", "arm")["sequence id"])
        announced = SeriesHeader(series_id=series, number_of_images=nimages, shape=(height, width),
                                 dtype=np.dtype(dtype))
        for receiver in receivers:
            receiver.arm(series, announced)

        def collect(index: int) -> None:
            results[index] = collect_series(receivers[index], decode_frames_into, np.dtype(dtype).name, timeout=30)

        threads = [threading.Thread(target=collect, args=(i,)) for i in range(2)]
        for thread in threads:
            thread.start()
        _put(simulator, "detector", "command", "trigger")
        # the series is complete when the union of the two shares is: then the one that did not get
        # the end message is ended by cancel (what a merging device will do once every node drained)
        wait_for(lambda: sum(r.stats().frames_received for r in receivers) >= nimages, 30,
                 lambda: f"{nimages} frames between the two receivers")
        wait_for(lambda: any(result is not None for result in results), 30, lambda: "the end message at one receiver")
        for receiver, result in zip(receivers, results):
            if result is None:
                receiver.cancel()
        for thread in threads:
            thread.join(30)
    finally:
        for receiver in receivers:
            receiver.stop()
    summaries = [result[0] for result in results]
    shares = [result[1] for result in results]
    assert all(shares), [len(share) for share in shares]  # each got a share
    assert not set(shares[0]) & set(shares[1])  # no frame twice
    assert sorted(set(shares[0]) | set(shares[1])) == list(range(nimages))
    for share in shares:
        for number, frame in share.items():
            np.testing.assert_array_equal(frame, truth.frame(number), err_msg=f"frame {number}")
    assert sorted(summary.end_reason for summary in summaries) == ["cancelled", "end_message"]
    for receiver in receivers:
        assert receiver.stats().errors.get("header_mismatch", 0) == 0


@pytest.mark.parametrize("simulator", ["ARINA"], indirect=True)
@pytest.mark.parametrize("stream_format, version, port_attr", [("legacy", 1, "stream_port"),
                                                                ("cbor", 2, "stream2_port")])
def test_two_listening_receivers_take_headerless_series_from_the_template(simulator, stream_format, version,
                                                                           port_attr):
    """Passive: someone else arms and triggers, twice; each receiver listens with the series as the
    DCU's configuration describes them; the one that gets no header starts each series from its first
    image; both series' frames are there, each once."""
    nimages = 300
    truth, (height, width), dtype = prepare_series(simulator, nimages, stream_format)
    endpoint = f"tcp://127.0.0.1:{getattr(simulator, port_attr)}"
    template = SeriesHeader(series_id=0, number_of_images=nimages, shape=(height, width), dtype=np.dtype(dtype))
    receivers = [StreamReceiver(endpoint, stream_version=version, frame_shape=(height, width), dtype=dtype,
                                frame_stack_size=16, num_slots=8) for _ in range(2)]
    try:
        for receiver in receivers:
            receiver.start()
            receiver.connect()
        for round_ in range(2):
            for receiver in receivers:
                receiver.listen(template)
            results: list[tuple | None] = [None, None]

            def collect(index: int) -> None:
                results[index] = collect_series(receivers[index], decode_frames_into, np.dtype(dtype).name,
                                                timeout=30)

            threads = [threading.Thread(target=collect, args=(i,)) for i in range(2)]
            for thread in threads:
                thread.start()
            series = int(_put(simulator, "detector", "command", "arm")["sequence id"])
            _put(simulator, "detector", "command", "trigger")
            _put(simulator, "detector", "command", "disarm")
            wait_for(lambda: any(result is not None for result in results), 30, lambda: "the end at one receiver")
            wait_for(lambda: sum(r.stats().frames_received for r in receivers) >= (round_ + 1) * nimages, 30,
                     lambda: f"{nimages} frames of round {round_} between the two receivers")
            for receiver, result in zip(receivers, results):
                if result is None:
                    receiver.cancel()
            for thread in threads:
                thread.join(30)
            summaries = [result[0] for result in results]
            shares = [result[1] for result in results]
            assert all(summary.series == series for summary in summaries), summaries
            assert all(shares) and not set(shares[0]) & set(shares[1])
            assert sorted(set(shares[0]) | set(shares[1])) == list(range(nimages))
            for share in shares:
                for number, frame in share.items():
                    np.testing.assert_array_equal(frame, truth.frame(number), err_msg=f"frame {number}")
    finally:
        for receiver in receivers:
            receiver.stop()
    for receiver in receivers:
        errors = receiver.stats().errors
        assert errors.get("header_mismatch", 0) == 0 and errors.get("no_header", 0) == 0, errors
