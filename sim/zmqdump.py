"""zmqdump recordings of a ZeroMQ stream: read, write, record, and replay through the sink.

File format (the one LiberTEM-live's simulator replays): a flat sequence of records, each an
8-byte little-endian signed length followed by the bytes of one ZeroMQ message *part*. Part
boundaries of multipart messages are not stored, so on reading, stream v1 parts are regrouped
into messages by their ``htype`` (a ``dheader-1.0`` with its detail-dependent parts and an
optional appendix, ``dimage-1.0`` + 3 parts + an optional appendix, ``dseries_end-1.0``); a
stream v2 record (starting with the CBOR self-describe tag) is a message of its own.

Replay (``update_sim_config({"replay_file": path})``) of a v1 or a v2 recording; the stream
format set over REST must match the recording's. Image ``i`` of the armed series is recorded image
``i % n``. What is rewritten:

* v1: the ``series`` of the ``dheader-1.0`` and ``dimage-1.0`` parts becomes the armed series id
  and the ``frame`` of image ``i`` becomes ``i``.
* v2: in the start and image messages the values of the top-level ``series_id``,
  ``series_unique_id`` and (image) ``image_id`` keys become the armed ones; the bytes are patched
  in place (no CBOR re-encoding), so every other byte is sent exactly as recorded.

Everything else (config parts, blobs, ``dimage_d``, hash, times, appendices, v2 start fields) is
sent as recorded: replaying a recording under the series it was recorded with sends the recorded
bytes. The end message is the sink's own.

Record: ``python -m sim.zmqdump record --connect tcp://127.0.0.1:PORT --out FILE
[--messages N | --until-end]`` (SIGINT stops and keeps what was written).
"""
from __future__ import annotations

import argparse
import json
import signal
import struct
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator

import zmq

SELF_DESCRIBE_PREFIX = b"\xd9\xd9\xf7"
LENGTH = struct.Struct("<q")


def _read_parts(stream: BinaryIO, path: str) -> Iterator[bytes]:
    while True:
        head = stream.read(LENGTH.size)
        if not head:
            return
        if len(head) != LENGTH.size:
            raise ValueError(f"{path}: truncated record length at the end of the file")
        (length,) = LENGTH.unpack(head)
        if length < 0:
            raise ValueError(f"{path}: negative record length {length}; not a zmqdump file")
        body = stream.read(length)
        if len(body) != length:
            raise ValueError(f"{path}: record of {length} bytes cut short ({len(body)} bytes left)")
        yield body


def _json_part(part: bytes) -> dict | None:
    if not part.startswith(b"{"):
        return None
    try:
        obj = json.loads(part)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return obj if isinstance(obj, dict) else None


def _htype(part: bytes) -> str | None:
    obj = _json_part(part)
    return obj.get("htype") if obj else None


HEADER_PARTS = {"none": 1, "basic": 2, "all": 8}


def group_messages(parts: Iterable[bytes], path: str = "<parts>") -> Iterator[list[bytes]]:
    """Regroup a flat list of parts into messages (see the module docstring)."""
    pending = list(parts)
    i = 0
    while i < len(pending):
        part = pending[i]
        if part.startswith(SELF_DESCRIBE_PREFIX):
            yield [part]
            i += 1
            continue
        obj = _json_part(part)
        htype = obj.get("htype") if obj else None
        if htype == "dheader-1.0":
            n = HEADER_PARTS.get(obj.get("header_detail"), 1)  # type: ignore[union-attr]
        elif htype == "dimage-1.0":
            n = 4
        elif htype == "dseries_end-1.0":
            n = 1
        else:
            raise ValueError(f"{path}: part {i} is not the start of a stream message "
                             f"(htype {htype!r}, first bytes {part[:40]!r})")
        message = pending[i:i + n]
        if len(message) != n:
            raise ValueError(f"{path}: {htype} message at part {i} has {len(message)} of {n} parts")
        i += n
        # An appendix is any extra part that does not start the next message.
        if htype != "dseries_end-1.0" and i < len(pending) and not pending[i].startswith(SELF_DESCRIBE_PREFIX) \
                and _htype(pending[i]) not in ("dheader-1.0", "dimage-1.0", "dseries_end-1.0"):
            message.append(pending[i])
            i += 1
        yield message


def read_zmqdump(path: str | Path) -> Iterator[list[bytes]]:
    """The messages of a zmqdump file, each a list of parts."""
    with open(path, "rb") as stream:
        parts = list(_read_parts(stream, str(path)))
    yield from group_messages(parts, str(path))


def write_zmqdump(path: str | Path, messages: Iterable[list[bytes]]) -> int:
    """Write ``messages`` (lists of parts) as a zmqdump file; returns the number of messages."""
    count = 0
    with open(path, "wb") as stream:
        for message in messages:
            for part in message:
                stream.write(LENGTH.pack(len(part)))
                stream.write(part)
            count += 1
    return count


def _rewrite_series(part: bytes, series_id: int, **extra: int) -> bytes:
    obj = json.loads(part)
    obj["series"] = series_id
    obj.update(extra)
    return (json.dumps(obj, separators=(",", ":"), sort_keys=True) + "\n").encode()


def _cbor_head(data: bytes, pos: int) -> tuple[int, int, int]:
    """(major type, argument, position after the head) of the CBOR item at ``pos``."""
    first = data[pos]
    major, info = first >> 5, first & 0x1F
    if info < 24:
        return major, info, pos + 1
    if info > 27:
        raise ValueError(f"indefinite-length or reserved CBOR item at byte {pos}")
    width = 1 << (info - 24)
    return major, int.from_bytes(data[pos + 1:pos + 1 + width], "big"), pos + 1 + width


def _cbor_uint(value: int) -> bytes:
    if value < 24:
        return bytes([value])
    for info, width in ((24, 1), (25, 2), (26, 4), (27, 8)):
        if value < 1 << (8 * width):
            return bytes([info]) + value.to_bytes(width, "big")
    raise ValueError(f"{value} does not fit a CBOR unsigned integer")


def _cbor_text(value: str) -> bytes:
    raw = value.encode()
    head = _cbor_uint(len(raw))
    return bytes([0x60 | head[0]]) + head[1:] + raw


def _patch_v2_value(message: bytes, key: str, new_value: bytes, major: int) -> bytes:
    """Replace the value of top-level ``key`` (an unsigned integer or a text string, major type
    ``major``) of a recorded v2 message by the encoded ``new_value``."""
    needle = _cbor_text(key)
    at = message.find(needle)
    if at < 0:
        raise ValueError(f"recorded v2 message has no {key!r} key")
    start = at + len(needle)
    found, argument, end = _cbor_head(message, start)
    if found != major:
        raise ValueError(f"recorded v2 message: {key!r} has CBOR major type {found}, expected {major}")
    if major == 3:
        end += argument
    return message[:start] + new_value + message[end:]


def _v2_type(message: bytes) -> str:
    """The ``type`` value of a v2 message (its first key, by SIMPLON §4); "" when it has none."""
    major, _, pos = _cbor_head(message, len(SELF_DESCRIBE_PREFIX))
    if major != 5:
        raise ValueError("a stream v2 message must be a CBOR map")
    major, length, pos = _cbor_head(message, pos)
    if major != 3 or message[pos:pos + length] != b"type":
        return ""
    major, length, pos = _cbor_head(message, pos + length)
    return message[pos:pos + length].decode(errors="replace") if major == 3 else ""


@dataclass
class ReplayRecording:
    """A v1 or v2 recording ready to be replayed for any armed series."""

    header_parts: list[bytes]
    images: list[list[bytes]]
    stream_format: str = "legacy"  # "legacy" (v1) or "cbor" (v2)

    @classmethod
    def load(cls, path: str | Path) -> "ReplayRecording":
        header: list[bytes] | None = None
        images: list[list[bytes]] = []
        formats = set()
        for message in read_zmqdump(path):
            if message[0].startswith(SELF_DESCRIBE_PREFIX):
                formats.add("cbor")
                kind = _v2_type(message[0])
                if kind == "start" and header is None:
                    header = message
                elif kind == "image":
                    images.append(message)
                continue
            formats.add("legacy")
            htype = _htype(message[0])
            if htype == "dheader-1.0" and header is None:
                header = message
            elif htype == "dimage-1.0":
                images.append(message)
        if len(formats) > 1:
            raise ValueError(f"{path}: the recording mixes stream v1 and stream v2 messages; "
                             f"record one stream per file")
        if header is None or not images:
            raise ValueError(f"{path}: a replay recording needs a header (dheader-1.0 / v2 start) and "
                             f"at least one image; found {'a' if header else 'no'} header and "
                             f"{len(images)} images")
        return cls(header, images, formats.pop())

    def header(self, series_id: int, series_unique_id: str = "") -> list[bytes]:
        if self.stream_format == "cbor":
            return [self._patch_v2(self.header_parts[0], series_id, series_unique_id)]
        return [_rewrite_series(self.header_parts[0], series_id)] + self.header_parts[1:]

    def image(self, frame_number: int, series_id: int, series_unique_id: str = "") -> list[bytes]:
        recorded = self.images[frame_number % len(self.images)]
        if self.stream_format == "cbor":
            return [self._patch_v2(recorded[0], series_id, series_unique_id, frame_number)]
        return [_rewrite_series(recorded[0], series_id, frame=frame_number)] + list(recorded[1:])

    @staticmethod
    def _patch_v2(message: bytes, series_id: int, series_unique_id: str,
                  image_id: int | None = None) -> bytes:
        message = _patch_v2_value(message, "series_id", _cbor_uint(series_id), 0)
        if series_unique_id:
            message = _patch_v2_value(message, "series_unique_id", _cbor_text(series_unique_id), 3)
        if image_id is not None:
            message = _patch_v2_value(message, "image_id", _cbor_uint(image_id), 0)
        return message


def record(connect: str, out: str | Path, *, messages: int | None = None, until_end: bool = False,
           stop: threading.Event | None = None, poll_ms: int = 100) -> int:
    """Connect a PULL socket to ``connect`` and write what arrives to ``out``; returns the number
    of messages written. Stops after ``messages`` messages, after an end-of-series message with
    ``until_end``, or when ``stop`` is set."""
    stop = stop or threading.Event()
    context = zmq.Context()
    sock = context.socket(zmq.PULL)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(connect)
    count = 0
    try:
        with open(out, "wb") as stream:
            while not stop.is_set() and (messages is None or count < messages):
                if not sock.poll(poll_ms):
                    continue
                parts = sock.recv_multipart()
                for part in parts:
                    stream.write(LENGTH.pack(len(part)))
                    stream.write(part)
                stream.flush()
                count += 1
                if until_end and _is_end(parts[0]):
                    break
    finally:
        sock.close(linger=0)
        context.term()
    return count


def _is_end(part: bytes) -> bool:
    if part.startswith(SELF_DESCRIBE_PREFIX):
        # The v2 end message is tiny; only its "type" value matters.
        return b"\x64type\x63end" in part[:16]
    return _htype(part) == "dseries_end-1.0"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sim.zmqdump", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("record", help="record a stream into a zmqdump file")
    rec.add_argument("--connect", required=True, help="endpoint of the PUSH socket, tcp://HOST:PORT")
    rec.add_argument("--out", required=True, help="file to write")
    limit = rec.add_mutually_exclusive_group()
    limit.add_argument("--messages", type=int, help="stop after this many messages")
    limit.add_argument("--until-end", action="store_true", help="stop after an end-of-series message")
    args = parser.parse_args(argv)
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    count = record(args.connect, args.out, messages=args.messages, until_end=args.until_end, stop=stop)
    print(f"recorded {count} messages to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
