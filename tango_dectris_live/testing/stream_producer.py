"""A small DCU stand-in for tests and benchmarks: builds stream v1 and v2 messages and PUSHes them.

Independent of the receiver's code: the messages are built from SIMPLON.md with json, cbor2,
bitshuffle and lz4 and nothing of ``tango_dectris_live`` is imported (the layering test checks it),
so a receiver bug cannot hide behind a shared helper.
"""
from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Sequence
from typing import Any

import bitshuffle
import cbor2
import lz4.block
import numpy as np
import zmq

V1_ENCODINGS = {"bslz4": "bs{bits}-lz4<", "lz4": "lz4<", "none": "<"}
V2_TYPED_ARRAY_TAGS = {np.dtype("u1"): 64, np.dtype("<u2"): 69, np.dtype("<u4"): 70}


def compress(frame: np.ndarray, encoding: str, version: int = 1) -> bytes:
    """The blob a DCU sends for ``frame`` (bslz4 byte-identical recipe of SIMPLON.md §5.1)."""
    raw = np.ascontiguousarray(frame)
    if encoding == "bslz4":
        return struct.pack(">QI", raw.nbytes, 8192) + bitshuffle.compress_lz4(raw).tobytes()
    if encoding == "lz4" and version == 1:
        return lz4.block.compress(raw.tobytes(), store_size=False)
    if encoding == "lz4":  # v2: HDF5 filter 32004 framing, one block
        data = raw.tobytes()
        block = lz4.block.compress(data, store_size=False)
        if len(block) >= len(data):
            block = data
        return struct.pack(">QI", len(data), len(data)) + struct.pack(">I", len(block)) + block
    if encoding == "none":
        return raw.tobytes()
    raise ValueError(f"unknown encoding {encoding!r}")


def _json(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode() + b"\n"


# ---- stream v1 ---------------------------------------------------------------------------------

def v1_header(series: int, *, nimages: int, shape: tuple[int, int], dtype: str = "uint16",
              detail: str = "basic", appendix: str | None = None, ntrigger: int = 1) -> list[bytes]:
    height, width = shape
    parts = [_json({"header_detail": detail, "htype": "dheader-1.0", "series": series})]
    if detail in ("basic", "all"):
        parts.append(_json({
            "bit_depth_image": np.dtype(dtype).itemsize * 8, "count_time": 0.001, "frame_time": 0.001,
            "nimages": nimages, "ntrigger": ntrigger, "software_version": "1.8.0",
            "x_pixels_in_detector": width, "y_pixels_in_detector": height}))
    if detail == "all":
        flatfield = np.ones((height, width), np.float32)
        mask = np.zeros((height, width), np.uint32)
        table = np.zeros((4, 2), np.float32)
        parts += [_json({"htype": "dflatfield-1.0", "shape": [width, height], "type": "float32"}),
                  flatfield.tobytes(),
                  _json({"htype": "dpixelmask-1.0", "shape": [width, height], "type": "uint32"}),
                  mask.tobytes(),
                  _json({"htype": "dcountrate_table-1.0", "shape": [2, 4], "type": "float32"}),
                  table.tobytes()]
    if appendix is not None:
        parts.append(appendix.encode())
    return parts


def v1_image(series: int, frame_number: int, frame: np.ndarray, encoding: str = "bslz4",
             appendix: str | None = None, blob: bytes | None = None) -> list[bytes]:
    height, width = frame.shape
    if blob is None:
        blob = compress(frame, encoding, 1)
    name = V1_ENCODINGS[encoding].format(bits=frame.dtype.itemsize * 8)
    parts = [
        _json({"frame": frame_number, "hash": "", "htype": "dimage-1.0", "series": series}),
        _json({"encoding": name, "htype": "dimage_d-1.0", "shape": [width, height], "size": len(blob),
               "type": frame.dtype.name}),
        blob,
        _json({"htype": "dconfig-1.0", "real_time": 1000, "start_time": 1000 * frame_number,
               "stop_time": 1000 * frame_number + 1000}),
    ]
    if appendix is not None:
        parts.append(appendix.encode())
    return parts


def v1_end(series: int) -> list[bytes]:
    return [_json({"htype": "dseries_end-1.0", "series": series})]


# ---- stream v2 ---------------------------------------------------------------------------------

def _cbor(message: dict[str, Any]) -> bytes:
    return cbor2.dumps(cbor2.CBORTag(55799, message))


def v2_start(series: int, *, nimages: int, shape: tuple[int, int], dtype: str = "uint16",
             detail: str = "basic", appendix: Any = None, channels: Sequence[str] = ("threshold_1",)) -> list[bytes]:
    height, width = shape
    message: dict[str, Any] = {
        "type": "start", "series_id": series, "series_unique_id": f"SERIES{series:020d}",
        "arm_date": cbor2.CBORTag(0, "2026-01-01T00:00:00.000+00:00"),
        "channels": list(channels), "count_time": 0.001, "frame_time": 0.001,
        "image_dtype": np.dtype(dtype).name, "image_size_x": width, "image_size_y": height,
        "number_of_images": nimages,
    }
    if detail == "all":
        tag = V2_TYPED_ARRAY_TAGS[np.dtype("<u4")]
        message["pixel_mask"] = {name: cbor2.CBORTag(40, [[height, width], cbor2.CBORTag(
            tag, np.zeros((height, width), np.uint32).tobytes())]) for name in channels}
    if appendix is not None:
        message["user_data"] = appendix
    return [_cbor(message)]


def _v2_array(frame: np.ndarray, encoding: str, blob: bytes | None) -> cbor2.CBORTag:
    tag = V2_TYPED_ARRAY_TAGS[frame.dtype.newbyteorder("<") if frame.dtype.itemsize > 1 else frame.dtype]
    if blob is None:
        blob = compress(frame, encoding, 2)
    if encoding == "none":
        payload: Any = blob
    else:
        elem = frame.dtype.itemsize if encoding == "bslz4" else 0
        payload = cbor2.CBORTag(56500, [encoding, elem, blob])
    return cbor2.CBORTag(40, [list(frame.shape), cbor2.CBORTag(tag, payload)])


def v2_image(series: int, frame_number: int, frame: np.ndarray | Sequence[np.ndarray], encoding: str = "bslz4",
             appendix: Any = None, blob: bytes | None = None,
             channels: Sequence[str] = ("threshold_1",)) -> list[bytes]:
    frames = [frame] if isinstance(frame, np.ndarray) else list(frame)
    message: dict[str, Any] = {
        "type": "image", "series_id": series, "series_unique_id": f"SERIES{series:020d}",
        "image_id": frame_number, "real_time": [1000, 1000000],
        "series_date": cbor2.CBORTag(0, "2026-01-01T00:00:00.000+00:00"),
        "start_time": [1000 * frame_number, 1000000], "stop_time": [1000 * frame_number + 1000, 1000000],
        "data": {name: _v2_array(f, encoding, blob) for name, f in zip(channels, frames)},
    }
    if appendix is not None:
        message["user_data"] = appendix
    return [_cbor(message)]


def v2_end(series: int) -> list[bytes]:
    return [_cbor({"type": "end", "series_id": series, "series_unique_id": f"SERIES{series:020d}"})]


# ---- ZeroMQ framing of stream v1 messages --------------------------------------------------------

#: How v1 messages are cut into ZeroMQ messages: ``multipart`` one multipart message per v1 message
#: (a DCU); ``single_parts`` every part alone; ``libertem_sim`` as LiberTEM-live's zmqdump replay
#: (libertem_live.detectors.dectris.sim.ZMQReplay) sends a recording: the first two parts alone,
#: then groups of four parts whatever they are, the end message alone; ``regrouped`` the parts cut
#: into messages of 1, 2, 3, 5, 7, 1, 2, ... parts across the v1 message boundaries.
FRAMINGS = ("multipart", "single_parts", "libertem_sim", "regrouped")


def reframe(messages: Sequence[Sequence[bytes]], framing: str) -> list[list[bytes]]:
    """The ZeroMQ messages that carry the v1 ``messages`` (lists of parts) in ``framing``."""
    if framing == "multipart":
        return [list(parts) for parts in messages]
    parts = [part for message in messages for part in message]
    if framing == "single_parts":
        return [[part] for part in parts]
    if framing == "libertem_sim":
        ends = [message[0] for message in messages if b'"dseries_end-1.0"' in message[0]]
        body = [part for part in parts if part not in ends]
        grouped = [[part] for part in body[:2]]
        grouped += [body[i:i + 4] for i in range(2, len(body), 4)]
        return grouped + [[end] for end in ends]
    if framing == "regrouped":
        sizes = (1, 2, 3, 5, 7)
        grouped, start, turn = [], 0, 0
        while start < len(parts):
            grouped.append(parts[start:start + sizes[turn % len(sizes)]])
            start += sizes[turn % len(sizes)]
            turn += 1
        return grouped
    raise ValueError(f"unknown framing {framing!r}; one of {', '.join(FRAMINGS)}")


MESSAGE_BUILDERS = {
    1: {"header": v1_header, "image": v1_image, "end": v1_end},
    2: {"header": v2_start, "image": v2_image, "end": v2_end},
}


def random_frames(count: int, shape: tuple[int, int], dtype: str = "uint16", seed: int = 0) -> np.ndarray:
    """Sparse Poisson-like frames (compress like real diffraction data, and differ per frame)."""
    rng = np.random.default_rng(seed)
    info = np.iinfo(dtype)
    frames = rng.poisson(0.3, size=(count, *shape)).astype(dtype)
    frames[:, 0, 0] = np.arange(count) % info.max  # every frame distinct
    frames[:, -1, -1] = info.max  # a saturated pixel
    return frames


class StreamProducer:
    """A PUSH socket bound to a free loopback port; sends multipart messages."""

    def __init__(self, version: int = 1, send_hwm: int = 1000, port: int | None = None) -> None:
        self.version = version
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.PUSH)
        self.socket.setsockopt(zmq.SNDHWM, send_hwm)
        self.socket.setsockopt(zmq.LINGER, 0)
        if port is None:
            self.port = self.socket.bind_to_random_port("tcp://127.0.0.1")
        else:  # a given port: a detector coming back where it was
            self.socket.bind(f"tcp://127.0.0.1:{port}")
            self.port = port
        self.endpoint = f"tcp://127.0.0.1:{self.port}"
        self.builders = MESSAGE_BUILDERS[version]

    def send(self, parts: Sequence[bytes], timeout: float = 10.0) -> None:
        """Send one message; raises TimeoutError when the receiver does not take it in time."""
        if not self.socket.poll(int(timeout * 1000), zmq.POLLOUT):
            raise TimeoutError(f"receiver did not accept a message within {timeout} s")
        self.socket.send_multipart(list(parts), copy=False)

    def send_all(self, messages: Iterable[Sequence[bytes]], timeout: float = 10.0) -> None:
        for parts in messages:
            self.send(parts, timeout)

    def header(self, series: int, **kwargs: Any) -> list[bytes]:
        return self.builders["header"](series, **kwargs)

    def image(self, series: int, frame_number: int, frame: np.ndarray, encoding: str = "bslz4",
              **kwargs: Any) -> list[bytes]:
        return self.builders["image"](series, frame_number, frame, encoding, **kwargs)

    def end(self, series: int) -> list[bytes]:
        return self.builders["end"](series)

    def series(self, series: int, frames: np.ndarray, encoding: str = "bslz4", *, order: Iterable[int] | None = None,
               detail: str = "basic", header_appendix: Any = None, image_appendix: Any = None,
               end: bool = True) -> list[list[bytes]]:
        """All messages of one series: header, the frames (in ``order``, default 0..n-1), end."""
        indices = range(len(frames)) if order is None else order
        messages = [self.header(series, nimages=len(frames), shape=frames.shape[1:], dtype=frames.dtype.name,
                                detail=detail, appendix=header_appendix)]
        messages += [self.image(series, i, frames[i], encoding, appendix=image_appendix) for i in indices]
        if end:
            messages.append(self.end(series))
        return messages

    def close(self) -> None:
        self.socket.close(0)
        self.context.term()

    def __enter__(self) -> StreamProducer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def collect_series(receiver: Any, decode_frames_into: Any, dtype: str = "uint16", timeout: float = 10.0,
                   release: bool = True) -> tuple[Any, dict[int, np.ndarray], list[Any]]:
    """Consume events until a series finishes: (summary, {frame number: decoded frame}, all events).

    Duck-typed on the receiver's events so that this module imports nothing from the receiver.
    """
    frames: dict[int, np.ndarray] = {}
    events = []
    while True:
        event = receiver.next_event(timeout)
        if event is None:
            raise TimeoutError(f"no receiver event within {timeout} s; events so far: {events}")
        events.append(event)
        if hasattr(event, "handle"):
            handle = event.handle
            out = np.zeros((handle.frames, *handle.shape), dtype=dtype)
            numbers = decode_frames_into(handle, 0, handle.frames, out)
            for number, frame in zip(numbers, out):
                if int(number) in frames:
                    raise AssertionError(f"frame {int(number)} delivered twice")
                frames[int(number)] = frame.copy()
            if release:
                receiver.release(handle)
        elif hasattr(event, "summary"):
            return event.summary, frames, events
