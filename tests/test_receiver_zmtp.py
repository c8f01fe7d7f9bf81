"""The receiver's zmtp transport: ZMTP 3 read in the receiver thread (tango_dectris_live/receiver/zmtp.py
and StreamLoop.attach). The plain round trips run through it by default (test_receiver_roundtrip.py);
here: choosing the transport, connecting, reconnecting, commands, damaged streams, big messages."""
from __future__ import annotations

import socket
import struct
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np
import pytest

from tango_dectris_live.receiver import StreamReceiver, decode_frames_into
from tango_dectris_live.receiver import zmtp
from tango_dectris_live.testing import wait_for
from tango_dectris_live.testing.stream_producer import (StreamProducer, collect_series, random_frames, v1_end,
                                                       v1_header, v1_image)
from tests.zmtp_peer import FakePushPeer, frame, greeting, message

SHAPE = (16, 24)


def _series(series: int, frames: np.ndarray, encoding: str = "bslz4") -> list[list[bytes]]:
    return ([v1_header(series, nimages=len(frames), shape=frames.shape[1:], dtype=frames.dtype.name)]
            + [v1_image(series, i, f, encoding) for i, f in enumerate(frames)] + [v1_end(series)])


def _assert_complete(receiver: StreamReceiver, frames: np.ndarray) -> None:
    summary, received, _events = collect_series(receiver, decode_frames_into, frames.dtype.name)
    assert summary.end_reason == "complete" and summary.missing == 0
    assert sorted(received) == list(range(len(frames)))
    np.testing.assert_array_equal(np.stack([received[i] for i in range(len(frames))]), frames)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def _connected_receiver(peer: FakePushPeer) -> Iterator[tuple[StreamReceiver, bytes]]:
    """A running receiver whose connection ``peer`` accepted and answered, and what it sent."""
    with ThreadPoolExecutor(1) as pool:
        accepted = pool.submit(peer.accept)
        with StreamReceiver(peer.endpoint, frame_shape=SHAPE, frame_stack_size=4, num_slots=4) as receiver:
            sent = accepted.result(timeout=20)
            wait_for(lambda: receiver.stats().connected, what="the receiver's connection")
            yield receiver, sent


def test_transport_is_chosen_by_endpoint_and_checked():
    assert StreamReceiver("tcp://127.0.0.1:1").transport == "zmtp"
    assert StreamReceiver("tcp://127.0.0.1:1", transport="libzmq").transport == "libzmq"
    assert StreamReceiver("ipc:///tmp/tango-dectris-live-test").transport == "libzmq"
    with pytest.raises(ValueError, match="needs a tcp://host:port endpoint"):
        StreamReceiver("ipc:///tmp/tango-dectris-live-test", transport="zmtp")
    with pytest.raises(ValueError, match="transport must be one of"):
        StreamReceiver("tcp://127.0.0.1:1", transport="udp")


def test_endpoint_parsing():
    assert zmtp.TcpEndpoint.parse("tcp://10.0.0.5:31001") == zmtp.TcpEndpoint("10.0.0.5", 31001)
    assert zmtp.TcpEndpoint.parse("tcp://dcu.example:9999") == zmtp.TcpEndpoint("dcu.example", 9999)
    for other in ("tcp://host", "tcp://host:port", "ipc:///x", "tcp://*:9999x", "tcp://:1"):
        assert zmtp.TcpEndpoint.parse(other) is None, other


def test_the_receiver_greets_as_a_pull_socket():
    with FakePushPeer() as peer:
        with _connected_receiver(peer) as (receiver, sent):
            assert sent[0] == 0xFF and sent[9] == 0x7F and sent[10] == 3 and sent[12:16] == b"NULL"
            ready = sent[64:]
            assert ready[0] == 0x04 and ready[2:8] == b"\x05READY"
            assert zmtp.parse_ready(ready[2:]) == {"socket-type": b"PULL"}


def test_a_ping_gets_its_pong_and_the_stream_goes_on():
    frames = random_frames(6, SHAPE, seed=3)
    with FakePushPeer() as peer:
        with _connected_receiver(peer) as (receiver, _):
            receiver.listen()
            ping = b"\x04PING" + struct.pack(">H", 300) + b"ctx-7"
            messages = _series(1, frames)
            peer.send(message(messages[0]) + frame(ping, command=True)
                      + b"".join(message(parts) for parts in messages[1:]))
            assert peer.recv_exactly(2 + 10) == frame(b"\x04PONG" + b"ctx-7", command=True)
            _assert_complete(receiver, frames)
            stats = receiver.stats()
    assert stats.zmtp_commands == 1 and stats.error_count == 0 and stats.disconnects == 0


def test_a_stream_arriving_a_few_bytes_at_a_time():
    frames = random_frames(5, SHAPE, seed=4)
    with FakePushPeer() as peer:
        with _connected_receiver(peer) as (receiver, _):
            receiver.listen()
            peer.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            data = b"".join(message(parts) for parts in _series(1, frames))
            for start in range(0, len(data), 7):  # every frame header and body split somewhere
                peer.send(data[start:start + 7])
            _assert_complete(receiver, frames)


def test_a_message_with_too_many_parts_is_counted_and_skipped():
    frames = random_frames(3, SHAPE, seed=5)
    with FakePushPeer() as peer:
        with _connected_receiver(peer) as (receiver, _):
            receiver.listen()
            peer.send_messages([[b"{}"] * 40] + _series(1, frames))
            _assert_complete(receiver, frames)
            assert receiver.stats().errors == {"too_many_parts": 1}


def test_a_damaged_stream_drops_the_connection_and_the_receiver_reconnects():
    frames = random_frames(4, SHAPE, seed=6)
    with FakePushPeer() as peer:
        with _connected_receiver(peer) as (receiver, _), ThreadPoolExecutor(1) as pool:
            receiver.listen()
            again = pool.submit(peer.accept)
            peer.send(b"\xf0\x05hello")  # reserved flag bits: the stream is out of step
            again.result(timeout=20)  # a second connection, handshaken
            wait_for(lambda: receiver.stats().connected, what="the reconnection")
            peer.send_messages(_series(2, frames))
            _assert_complete(receiver, frames)
            assert receiver.stats().disconnects == 1


def test_the_receiver_reconnects_when_the_detector_comes_back():
    first, second = random_frames(5, SHAPE, seed=7), random_frames(5, SHAPE, seed=8)
    producer = StreamProducer(1)
    port = producer.port
    with StreamReceiver(producer.endpoint, frame_shape=SHAPE, frame_stack_size=4) as receiver:
        receiver.listen()
        producer.send_all(_series(1, first))
        _assert_complete(receiver, first)
        producer.close()  # the DCU restarts
        wait_for(lambda: receiver.stats().disconnects == 1, what="the receiver noticing")
        with StreamProducer(1, port=port) as back:
            wait_for(lambda: receiver.stats().connected, what="the reconnection")
            back.send_all(_series(2, second))
            _assert_complete(receiver, second)
        assert receiver.stats().transport == "zmtp"


def test_a_receiver_started_before_the_detector_connects_when_it_appears():
    port = _free_port()
    frames = random_frames(5, SHAPE, seed=9)
    with StreamReceiver(f"tcp://127.0.0.1:{port}", frame_shape=SHAPE, frame_stack_size=4) as receiver:
        stats = receiver.stats()
        assert not stats.connected and "refused" in stats.connect_error.lower()
        receiver.listen()  # commands work while not connected
        with StreamProducer(1, port=port) as producer:
            wait_for(lambda: receiver.stats().connected, what="the connection")
            producer.send_all(_series(1, frames))
            _assert_complete(receiver, frames)


def test_messages_bigger_than_the_read_buffer():
    frames = random_frames(3, (1100, 1100), "uint32", seed=10)  # 4.8 MB uncompressed, buffer 4 MiB
    with StreamProducer(1) as producer, StreamReceiver(
            producer.endpoint, frame_shape=(1100, 1100), dtype="uint32", frame_stack_size=2, num_slots=2,
            bytes_per_frame=frames[0].nbytes) as receiver:
        receiver.listen()
        producer.send_all(_series(1, frames, "none"))
        _assert_complete(receiver, frames)
        assert receiver.stats().transport == "zmtp"


@pytest.mark.parametrize("requested, expected", [("auto", "libzmq"), ("zmtp", "zmtp")])
def test_a_peer_with_a_security_mechanism(requested, expected):
    with FakePushPeer() as peer, ThreadPoolExecutor(1) as pool:
        accepted = pool.submit(peer.accept, peer_greeting=greeting(mechanism=b"CURVE"))
        with StreamReceiver(peer.endpoint, frame_shape=SHAPE, transport=requested) as receiver:
            accepted.result(timeout=20)
            stats = wait_for(lambda: (s := receiver.stats()).transport == expected and
                             (expected == "libzmq" or s.connect_error) and s,
                             what=f"the {expected} transport")
            assert receiver.running
    if expected == "zmtp":
        assert "CURVE" in stats.connect_error and not stats.connected


@pytest.mark.parametrize("peer_bytes, error", [
    (b"HTTP/1.1 400 Bad Request\r\n\r\n", "did not send a ZeroMQ greeting (first bytes b'HTTP/1.1 4')"),
    (greeting(major=2), "ZMTP 2.x"),
])
def test_a_peer_that_is_not_a_zmtp3_push_socket_is_reported(peer_bytes, error):
    with FakePushPeer() as peer, ThreadPoolExecutor(1) as pool:
        accepted = pool.submit(peer.accept, handshake=False, instead=peer_bytes)
        with StreamReceiver(peer.endpoint, frame_shape=SHAPE, transport="zmtp") as receiver:
            accepted.result(timeout=20)
            stats = wait_for(lambda: (s := receiver.stats()).connect_error and s, what="the connection error")
            assert error in stats.connect_error and not stats.connected and receiver.running


def test_a_peer_of_the_wrong_socket_type_is_refused():
    with FakePushPeer() as peer, ThreadPoolExecutor(1) as pool:
        accepted = pool.submit(peer.accept, socket_type=b"PUB")
        with StreamReceiver(peer.endpoint, frame_shape=SHAPE) as receiver:
            accepted.result(timeout=20)
            stats = wait_for(lambda: (s := receiver.stats()).connect_error and s, what="the connection error")
            assert "PUB socket" in stats.connect_error and not stats.connected


def test_handshake_helpers_reject_what_they_should():
    assert zmtp.check_greeting(greeting(3, 1)) == (3, 1)
    with pytest.raises(zmtp.ZmtpUnsupported, match="PLAIN"):
        zmtp.check_greeting(greeting(mechanism=b"PLAIN"))
    with pytest.raises(zmtp.ZmtpError, match="refused the connection: no"):
        zmtp.parse_ready(b"\x05ERROR\x02no")
    with pytest.raises(zmtp.ZmtpError, match="truncated metadata"):
        zmtp.parse_ready(b"\x05READY\x0bSocket-Type\x00\x00\x00\x09PU")
