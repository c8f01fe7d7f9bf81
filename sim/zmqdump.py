"""zmqdump recordings of a ZeroMQ stream: read, write, record, and replay through the sink.

File format (the one LiberTEM-live's simulator replays): a flat sequence of records, each an
8-byte little-endian signed length followed by the bytes of one ZeroMQ message *part*. Part
boundaries of multipart messages are not stored, so on reading, stream v1 parts are regrouped
into messages by their ``htype`` (a ``dheader-1.0`` with its detail-dependent parts and an
optional appendix, ``dimage-1.0`` + 3 parts + an optional appendix, ``dseries_end-1.0``); a
stream v2 record (starting with the CBOR self-describe tag) is a message of its own.

Replay (``update_sim_config({"replay_file": path})``) supports v1 recordings. What is rewritten:
the ``series`` of the ``dheader-1.0``, ``dimage-1.0`` and ``dseries_end-1.0`` parts becomes the
armed series id, and image ``i`` of the armed series is recorded image ``i % n`` with its
``frame`` set to ``i``. Everything else (config part, blobs, ``dimage_d``, hash, ``dconfig``
times, appendices) is sent exactly as recorded.

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


@dataclass
class ReplayRecording:
    """A v1 recording ready to be replayed for any armed series id."""

    header_parts: list[bytes]
    images: list[list[bytes]]

    @classmethod
    def load(cls, path: str | Path) -> "ReplayRecording":
        header: list[bytes] | None = None
        images: list[list[bytes]] = []
        for message in read_zmqdump(path):
            if message[0].startswith(SELF_DESCRIBE_PREFIX):
                raise ValueError(f"{path}: replay supports stream v1 (legacy) recordings only; "
                                 f"this one holds CBOR (stream v2) messages")
            htype = _htype(message[0])
            if htype == "dheader-1.0" and header is None:
                header = message
            elif htype == "dimage-1.0":
                images.append(message)
        if header is None or not images:
            raise ValueError(f"{path}: a replay recording needs a dheader-1.0 and at least one "
                             f"image; found {'a' if header else 'no'} header and {len(images)} images")
        return cls(header, images)

    def header(self, series_id: int) -> list[bytes]:
        return [_rewrite_series(self.header_parts[0], series_id)] + self.header_parts[1:]

    def image(self, frame_number: int, series_id: int) -> list[bytes]:
        recorded = self.images[frame_number % len(self.images)]
        return [_rewrite_series(recorded[0], series_id, frame=frame_number)] + list(recorded[1:])


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
