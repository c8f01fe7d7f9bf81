"""The receiver's connection policy: ``always`` (connected from start on) and ``per_series``
(connected only while armed or listening), so that another consumer of the DCU's PUSH socket, which
deals messages round-robin to every connected peer, gets whole series while the receiver is idle."""
from __future__ import annotations

import re
import socket

import numpy as np
import pytest
import zmq
from zmq.utils.monitor import recv_monitor_message

from tango_dectris_live.receiver import StreamConnectError, StreamReceiver, decode_frames_into
from tango_dectris_live.testing import wait_for
from tango_dectris_live.testing.stream_producer import StreamProducer, collect_series, random_frames

SHAPE = (16, 24)
TRANSPORTS = ("zmtp", "libzmq")


class PeerCount:
    """How many peers the producer's PUSH socket deals to: handshakes done minus disconnections,
    from its socket monitor."""

    def __init__(self, producer: StreamProducer) -> None:
        self._monitor = producer.socket.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
        self.peers = 0

    def __call__(self) -> int:
        while self._monitor.poll(0):
            event = recv_monitor_message(self._monitor)["event"]
            self.peers += 1 if event == zmq.EVENT_HANDSHAKE_SUCCEEDED else -1
        return self.peers

    def wait_for(self, peers: int) -> None:
        wait_for(lambda: self() == peers, what=f"{peers} peer(s) on the producer's PUSH socket")

    def close(self) -> None:
        self._monitor.close(0)


@pytest.fixture(params=TRANSPORTS)
def per_series(request):
    """A producer, its peer count, and a started per_series receiver on its endpoint."""
    with StreamProducer(1) as producer:
        peers = PeerCount(producer)
        try:
            with StreamReceiver(producer.endpoint, frame_shape=SHAPE, frame_stack_size=4, num_slots=4,
                                transport=request.param, connection="per_series") as receiver:
                yield producer, peers, receiver
        finally:
            peers.close()


def _assert_complete(receiver: StreamReceiver, series: int, frames: np.ndarray) -> None:
    summary, received, _events = collect_series(receiver, decode_frames_into)
    assert summary.series == series and summary.end_reason == "complete" and summary.missing == 0
    assert sorted(received) == list(range(len(frames)))
    np.testing.assert_array_equal(np.stack([received[i] for i in range(len(frames))]), frames)


def _receive_all(pull: zmq.Socket, count: int) -> list[list[bytes]]:
    messages = []
    for _ in range(count):
        assert pull.poll(10_000), f"the consumer got {len(messages)} of {count} messages"
        messages.append(pull.recv_multipart())
    return messages


def test_per_series_leaves_whole_series_to_another_consumer_while_idle(per_series):
    producer, peers, receiver = per_series
    stats = receiver.stats()
    assert (stats.connection, stats.connected) == ("per_series", False)
    assert peers() == 0  # started, idle: not connected

    # series 0: connect before the DCU's arm, then arm; the end message is taken before disconnecting
    receiver.connect()
    assert receiver.stats().connected
    peers.wait_for(1)
    receiver.arm(0)
    first = random_frames(5, SHAPE, seed=0)
    producer.send_all(producer.series(0, first))
    _assert_complete(receiver, 0, first)
    peers.wait_for(0)
    assert not receiver.stats().connected

    # series 1 while the receiver is idle: another consumer gets every message of it
    context = zmq.Context.instance()
    other = context.socket(zmq.PULL)
    try:
        other.connect(producer.endpoint)
        peers.wait_for(1)
        second = producer.series(1, random_frames(7, SHAPE, seed=1))
        producer.send_all(second)
        assert _receive_all(other, len(second)) == second
    finally:
        other.close(0)
    peers.wait_for(0)

    # series 2: arm() connects by itself; the DCU queues what it sends until then
    receiver.arm(2)
    third = random_frames(6, SHAPE, seed=2)
    producer.send_all(producer.series(2, third))
    _assert_complete(receiver, 2, third)
    peers.wait_for(0)
    stats = receiver.stats()
    assert dict(stats.errors) == {} and stats.frames_received == len(first) + len(third)
    assert not stats.connected and stats.series_finished == 2


def test_per_series_connected_while_listening_until_cancel(per_series):
    producer, peers, receiver = per_series
    receiver.listen()
    peers.wait_for(1)
    for series in (4, 5):  # stays connected from one series to the next
        frames = random_frames(3, SHAPE, seed=series)
        producer.send_all(producer.series(series, frames))
        _assert_complete(receiver, series, frames)
    assert receiver.stats().connected
    receiver.cancel()
    peers.wait_for(0)
    assert not receiver.stats().connected and dict(receiver.stats().errors) == {}


def test_per_series_keeps_a_series_that_begins_before_the_end_of_the_last(per_series):
    """The DCU armed again before the completed series' end came: the receiver stays connected
    (closing would drop what is on its way) and the next arm() takes that series whole."""
    producer, peers, receiver = per_series
    receiver.arm(7)
    first, second = random_frames(4, SHAPE, seed=7), random_frames(4, SHAPE, seed=8)
    producer.send_all(producer.series(7, first, end=False) + producer.series(8, second))
    _assert_complete(receiver, 7, first)
    receiver.arm(8)
    _assert_complete(receiver, 8, second)
    peers.wait_for(0)  # series 8's end came: disconnected
    assert dict(receiver.stats().errors) == {}


def test_per_series_header_missing_goes_idle_and_disconnects(per_series):
    producer, peers, receiver = per_series
    receiver.timeout = 0.2
    receiver.arm(3)
    peers.wait_for(1)
    event = receiver.next_event(10)
    assert event.kind == "no_header"
    peers.wait_for(0)
    assert not receiver.stats().connected


def _unused_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("connection", ["always", "per_series"])
def test_connect_without_a_dcu_raises_naming_the_endpoint(transport, connection):
    endpoint = f"tcp://127.0.0.1:{_unused_port()}"
    with StreamReceiver(endpoint, frame_shape=SHAPE, transport=transport, connection=connection) as receiver:
        with pytest.raises(StreamConnectError, match=re.escape(endpoint)) as raised:
            receiver.connect(timeout=0.3)
        assert raised.value.endpoint == endpoint and isinstance(raised.value, ConnectionError)
        assert not receiver.stats().connected and receiver.running


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_always_is_connected_from_start_and_while_idle(transport):
    with StreamProducer(1) as producer:
        peers = PeerCount(producer)
        try:
            with StreamReceiver(producer.endpoint, frame_shape=SHAPE, transport=transport) as receiver:
                receiver.connect()  # returns once connected (at once when it is already)
                stats = receiver.stats()
                assert (stats.connection, stats.connected) == ("always", True)
                peers.wait_for(1)
                frames = random_frames(4, SHAPE, seed=3)
                receiver.arm(3)
                producer.send_all(producer.series(3, frames))
                _assert_complete(receiver, 3, frames)
                # idle and still connected: what the DCU sends now waits for the next arm (in the
                # receiver's own socket buffers)
                assert receiver.stats().connected and peers() == 1
                producer.send_all(producer.series(4, frames))
                receiver.arm(4)
                _assert_complete(receiver, 4, frames)
                assert dict(receiver.stats().errors) == {} and peers() == 1
        finally:
            peers.close()


def test_connection_policy_is_checked():
    with pytest.raises(ValueError, match="connection must be one of always, per_series"):
        StreamReceiver("tcp://127.0.0.1:1", connection="sometimes")
    with StreamProducer(1) as producer, StreamReceiver(producer.endpoint, connection="per_series") as receiver:
        for bad in (0, -1.0, "5", True):
            with pytest.raises(ValueError, match="positive timeout"):
                receiver.connect(bad)


def test_always_idle_connection_with_unread_messages_is_dropped_when_the_dcu_restarts():
    """The DCU sent something while the receiver was idle (unread in its socket) and was then
    killed: the queued bytes must not make connect() trust the dead connection, or the header the
    restarted DCU sends at the next arm goes nowhere."""
    frames = random_frames(3, SHAPE, seed=11)
    producer = StreamProducer(1)
    port = producer.port
    with StreamReceiver(producer.endpoint, frame_shape=SHAPE, frame_stack_size=4, transport="zmtp") as receiver:
        receiver.connect()
        producer.send_all(producer.series(1, frames))  # idle: stays unread in the receiver's socket
        producer.close()  # the DCU is killed
        with StreamProducer(1, port=port) as back:
            receiver.connect()
            assert receiver.stats().disconnects == 1, "the dead connection was kept"
            receiver.arm(2)
            back.send_all(back.series(2, frames))
            _assert_complete(receiver, 2, frames)
