"""Stream v1 messages regrouped by their content, whatever the ZeroMQ message boundaries.

A DCU sends each stream v1 message (SIMPLON.md §3) as one multipart ZeroMQ message. Replays of
zmqdump recordings do not keep those boundaries: LiberTEM-live's ``libertem-live-dectris-sim``
sends the global header's parts as separate single-part messages and the end message alone, and
a recording whose header has an appendix shifts every later 4-part group by one part. The parts
themselves say where a message starts and how many parts it has, so :class:`V1Regrouper` takes
parts as they come and cuts them into v1 messages by content:

* A *start part* is a small JSON object whose ``htype`` is ``dheader-1.0``, ``dimage-1.0`` or
  ``dseries_end-1.0``. A header has 1, 2 or 8 parts (``header_detail`` none, basic, all), an image
  4 (``dimage``, ``dimage_d``, blob, ``dconfig``), an end 1.
* One more part after those that does not start a message is the appendix (header or image).
* A blob where its description says one comes (the image blob; the flatfield, pixel mask and
  count-rate table of an ``all`` header) is taken by its declared size: a part of exactly that
  size is the blob, whatever its bytes look like.
* Where the ZeroMQ message ends right after a message's parts: an image is complete at once (its
  frame is placed without waiting); a part that comes next and does not start a message is its
  appendix, which the receiver does not use, and is dropped (``add(follows_image=True)`` says
  that the last message, taken elsewhere, was such an image). A header that filled a multipart
  ZeroMQ message of its own (a DCU's framing) is complete; any other header (its appendix is part
  of :class:`SeriesHeader`) is *held* until the next part tells, or until
  :meth:`V1Regrouper.finish_held`.

What cannot be a message is reported in order with the messages, as a
:class:`MalformedMessageError` whose ``reason`` names it: ``incomplete_header`` (a header whose
parts did not all come before the next message started or the stream was cut), ``truncated`` (the
same for an image), and for a run of parts that belong to no message (counted once per run)
``bad_json``, ``missing_key``, ``unknown_message`` (e.g. a stream v2 message) or
``unexpected_part``.
"""
from __future__ import annotations

import json
from collections import deque
from collections.abc import Sequence
from typing import Any, Union

from .errors import MalformedMessageError, StreamFormatError
from .v1 import PartLike

HEADER = "dheader-1.0"
IMAGE = "dimage-1.0"
END = "dseries_end-1.0"
START_HTYPES = frozenset((HEADER, IMAGE, END))
# htypes of the parts inside a message: a stray one is an ``unexpected_part``, not an unknown message
_INNER_HTYPES = frozenset(("dimage_d-1.0", "dconfig-1.0", "dflatfield-1.0", "dpixelmask-1.0",
                           "dcountrate_table-1.0"))
_HEADER_PARTS = {"none": 1, "basic": 2, "all": 8}
_IMAGE_PARTS = 4
_IMAGE_BLOB_INDEX = 2
_HEADER_BLOB_INDEXES = (3, 5, 7)  # flatfield, pixel mask, count-rate table of an ``all`` header
# A start part is a few dozen bytes (dheader 57, dimage 86, dseries_end 39 in the EIGER capture);
# a bigger part is never parsed to find out whether it is one.
_MAX_START_PART = 4096
_CBOR_SIGNATURE = b"\xd9\xd9\xf7"
_ITEM_SIZES = {"uint8": 1, "int8": 1, "uint16": 2, "int16": 2, "uint32": 4, "int32": 4,
               "float32": 4, "float64": 8}

#: What :meth:`V1Regrouper.take` gives: the parts of one v1 message, or why parts were dropped.
RegroupedItem = Union[list, StreamFormatError]


def _nbytes(part: PartLike) -> int:
    return len(part) if isinstance(part, bytes) else memoryview(part).nbytes


def start_part(part: PartLike) -> tuple[str, dict[str, Any]] | None:
    """``(htype, fields)`` when ``part`` starts a v1 message, else None."""
    size = _nbytes(part)
    if size < 2 or size > _MAX_START_PART:
        return None
    data = bytes(part)
    if b'"htype"' not in data or not data.lstrip().startswith(b"{"):
        return None
    try:
        fields = json.loads(data)
    except (UnicodeDecodeError, ValueError, RecursionError):  # RecursionError: absurdly deep nesting
        return None
    if not isinstance(fields, dict) or fields.get("htype") not in START_HTYPES:
        return None
    return fields["htype"], fields


def _json_object(part: PartLike) -> dict[str, Any] | None:
    if _nbytes(part) > _MAX_START_PART:
        return None
    try:
        value = json.loads(bytes(part))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


class V1Regrouper:
    """Takes stream v1 parts one ZeroMQ message at a time (:meth:`add`) and gives back whole v1
    messages and problems, in stream order (:meth:`take`). See the module docstring."""

    def __init__(self) -> None:
        self._parts: list[PartLike] = []  # the message being collected
        self._needed = 0  # its parts without the appendix
        self._htype = ""
        self._first: dict[str, Any] = {}  # its start part's fields
        self._whole = False  # it began with the ZeroMQ message being added
        self._held: list[PartLike] | None = None  # a complete header: does an appendix follow?
        self._image_appendix_may_follow = False
        self._skipping = False  # inside a run of parts that belong to no message (counted once)
        self._ready: deque[RegroupedItem] = deque()

    # ---- state ----------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """Messages or problems waiting for :meth:`take`."""
        return bool(self._ready)

    @property
    def busy(self) -> bool:
        """True when the next ZeroMQ message must come through :meth:`add` to be understood: parts
        of an unfinished message, a header waiting for its appendix, a run of stray parts, or
        results not taken yet."""
        return bool(self._ready or self._parts or self._held is not None or self._skipping)

    @property
    def image_appendix_may_follow(self) -> bool:
        """The last message was an image given out without an appendix part."""
        return self._image_appendix_may_follow

    @property
    def holds_header(self) -> bool:
        """A complete header is held until the next part tells whether it is its appendix."""
        return self._held is not None

    # ---- input and output -----------------------------------------------------------------------

    def add(self, parts: Sequence[PartLike], *, follows_image: bool | None = None) -> None:
        """The parts of one ZeroMQ message, in order. ``follows_image``: whether the v1 message
        before these parts was an image without an appendix part, when the caller took messages
        itself since the last :meth:`add` (None: as this regrouper saw it)."""
        if follows_image is not None and not self._parts and self._held is None:
            self._image_appendix_may_follow = follows_image
        last = len(parts) - 1
        for index, part in enumerate(parts):
            self._add_part(part, first=index == 0, last=index == last)
        if self._parts:
            self._whole = False  # the message goes on in the next ZeroMQ message

    def take(self) -> RegroupedItem | None:
        """The next whole message (its parts, appendix included) or problem, or None."""
        return self._ready.popleft() if self._ready else None

    def put_back(self, item: RegroupedItem) -> None:
        """Return what :meth:`take` gave, to be taken again first."""
        self._ready.appendleft(item)

    def finish_held(self) -> bool:
        """Take a held header as complete, without an appendix; True when there was one."""
        if self._held is None:
            return False
        self._ready.append(self._held)
        self._held = None
        return True

    def reset(self) -> None:
        """The stream was cut (connection closed or lost): a held header is complete, an
        unfinished message is reported, and the next part starts afresh."""
        self.finish_held()
        if self._parts:
            self._ready.append(self._incomplete("the stream was cut"))
            self._parts = []
        self._image_appendix_may_follow = False
        self._skipping = False

    # ---- regrouping -----------------------------------------------------------------------------

    def _add_part(self, part: PartLike, *, first: bool, last: bool) -> None:
        start = None if self._parts and self._is_declared_blob(part) else start_part(part)
        if self._held is not None:
            held, self._held = self._held, None
            if start is None:
                held.append(part)  # its appendix
                self._ready.append(held)
                return
            self._ready.append(held)
        elif self._image_appendix_may_follow:
            self._image_appendix_may_follow = False
            if start is None:
                return  # the appendix of the image just given out; the receiver does not use it
        if self._parts:
            if start is None:
                self._parts.append(part)
                if len(self._parts) == self._needed:
                    self._complete(last)
                return
            self._ready.append(self._incomplete(f"a {start[0]} part started the next message"))
            self._parts = []
        if start is None:
            if not self._skipping:
                self._skipping = True
                self._ready.append(self._stray(part))
            return
        self._skipping = False
        self._htype, self._first = start
        self._parts = [part]
        self._whole = first
        if self._htype == HEADER:
            # an unknown header_detail: the parser says so; its other parts are counted as stray
            self._needed = _HEADER_PARTS.get(self._first.get("header_detail"), 1)
        else:
            self._needed = _IMAGE_PARTS if self._htype == IMAGE else 1
        if self._needed == 1:
            self._complete(last)

    def _complete(self, last: bool) -> None:
        message, self._parts = self._parts, []
        if self._htype == END:
            self._ready.append(message)
        elif not last:
            self._held = message  # the next part, in this same ZeroMQ message, tells
        elif self._htype == IMAGE:
            self._ready.append(message)
            self._image_appendix_may_follow = True
        elif self._whole and len(message) >= 2:
            self._ready.append(message)  # a multipart ZeroMQ message of its own: the DCU's framing
        else:
            self._held = message

    def _is_declared_blob(self, part: PartLike) -> bool:
        """Whether ``part`` comes where the message's description announces a blob, with the
        announced size."""
        index = len(self._parts)
        if self._htype == IMAGE and index == _IMAGE_BLOB_INDEX:
            description = _json_object(self._parts[1])
            size = description.get("size") if description else None
        elif self._htype == HEADER and self._needed == 8 and index in _HEADER_BLOB_INDEXES:
            description = _json_object(self._parts[index - 1])
            size = self._array_bytes(description) if description else None
        else:
            return False
        return isinstance(size, int) and size == _nbytes(part)

    @staticmethod
    def _array_bytes(description: dict[str, Any]) -> int | None:
        shape, item = description.get("shape"), _ITEM_SIZES.get(description.get("type"))
        if item is None or not isinstance(shape, list) or not all(isinstance(n, int) for n in shape):
            return None
        total = item
        for n in shape:
            total *= n
        return total

    def _incomplete(self, why: str) -> MalformedMessageError:
        series = self._first.get("series")
        got = f"{len(self._parts)} of its {self._needed} parts"
        if self._htype == HEADER:
            return MalformedMessageError(
                f"the global header of series {series} (header_detail {self._first.get('header_detail')!r}) "
                f"got {got} before {why}; the series cannot start from it", reason="incomplete_header")
        return MalformedMessageError(
            f"frame {self._first.get('frame')} of series {series}: {got} before {why}; dropped",
            reason="truncated")

    @staticmethod
    def _stray(part: PartLike) -> MalformedMessageError:
        """Why a part that belongs to no message is there; the run it begins is counted once."""
        data = bytes(memoryview(part)[:64])
        where = f"a part of {_nbytes(part)} bytes that belongs to no stream v1 message (first bytes {data!r})"
        if data.startswith(_CBOR_SIGNATURE):
            return MalformedMessageError(
                f"{where}: a stream v2 (CBOR) message; set the receiver's stream version to 2 or the "
                "detector's stream/config/format to legacy", reason="unknown_message")
        if not data.lstrip().startswith(b"{"):
            return MalformedMessageError(where, reason="unexpected_part")
        fields = _json_object(part)
        if fields is None:
            return MalformedMessageError(f"{where}: not a JSON object", reason="bad_json")
        htype = fields.get("htype")
        if not isinstance(htype, str):
            return MalformedMessageError(f"{where}: a JSON object without 'htype'", reason="missing_key")
        if htype in _INNER_HTYPES:
            return MalformedMessageError(f"{where}: a {htype} part without the message it belongs to",
                                         reason="unexpected_part")
        return MalformedMessageError(
            f"{where}: unknown htype {htype!r}; is the detector's stream format set to legacy/v1?",
            reason="unknown_message")
