"""Partial results of one receiver node, on the wire and merged (several nodes on one stream).

A DCU's ZeroMQ PUSH socket deals a series' messages among every connected receiver, so with
several *node* devices each processes a share of the frames. A node publishes, a few times per
second and once at the end, its :class:`PartialResults`: for every analysis the UDF's **raw**
whole-scan buffers (before ``get_results``: what LiberTEM merges) and the map of the scan
positions it processed. The *merging* device folds the latest partial of every node into one
result with each UDF's own ``merge`` -- LiberTEM's semantics: detector-shaped ("sig"/"single")
buffers combine as the UDF says (the sums add), scan-shaped ("nav") buffers are placed by frame
index -- and then extracts the published results exactly as a single node does.

Wire format (a Tango DevEncoded value, format :data:`PARTIAL_FORMAT`): a 4-byte little-endian
length, a JSON header of that length, then the buffers' bytes, C order, at the offsets the header
gives. No pickle: a node cannot make the merger run code.
"""
from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from .analyses import AnalysisParameters, AnalysisRegistry, SelectedAnalysis
from .libertem_internals import allocate_full_results, full_buffers, merge_partial, results_of, udf_input_dtype
from .live_dataset import LiveDataSet, ScanShape
from .snapshot import ResultSnapshot, RunState, blank_unprocessed

PARTIAL_FORMAT = "tango-dectris-live/partial-results/1"
_LENGTH = struct.Struct("<I")
_MAX_HEADER = 1 << 20


class PartialResultsError(ValueError):
    """A partial-results message that cannot be taken (the message says what is wrong)."""


@dataclass(frozen=True)
class PartialResults:
    """What one node has of one series: per analysis (in the series' order) its UDF's raw
    whole-scan buffers by name, and ``done``, the flat map of scan positions it processed."""

    series: int
    state: str  # the node's RunState value: running, finished, stopped, aborted, failed
    end_seen: bool  # the DCU's end message of the series reached this node
    frames_received: int
    frames_processed: int
    analyses: tuple[str, ...]
    done: np.ndarray
    buffers: tuple[dict[str, np.ndarray], ...]
    error: str = ""
    sequence: int = 0  # grows with every partial a node sends for a series (a late one is older)
    # compact numbering (a node's frames as they came): row i of the scan-shaped buffers is frame
    # order[i]; None: row i is frame i
    order: np.ndarray | None = None
    extra: Mapping[str, object] = field(default_factory=dict)

    @property
    def final(self) -> bool:
        return RunState(self.state).is_final

    def encode(self) -> tuple[str, bytes]:
        """(format, bytes) for a Tango DevEncoded attribute."""
        payload: list[bytes] = []
        offset = 0
        packed = np.packbits(self.done.astype(bool, copy=False)).tobytes()
        entries = []
        for index, buffers in enumerate(self.buffers):
            for name, array in buffers.items():
                data = np.ascontiguousarray(array)
                entries.append({"analysis": index, "name": name, "dtype": data.dtype.str,
                                "shape": list(data.shape), "offset": offset, "nbytes": data.nbytes})
                payload.append(data.tobytes())
                offset += data.nbytes
        header = {"series": int(self.series), "state": self.state, "end_seen": bool(self.end_seen),
                  "frames_received": int(self.frames_received), "frames_processed": int(self.frames_processed),
                  "analyses": list(self.analyses), "error": self.error, "sequence": int(self.sequence),
                  "extra": dict(self.extra), "done": {"size": int(self.done.size), "offset": offset,
                                                      "nbytes": len(packed)}, "buffers": entries}
        payload.append(packed)
        if self.order is not None:
            order = np.ascontiguousarray(self.order, dtype="<i8")
            header["order"] = {"size": int(order.size), "offset": offset + len(packed), "nbytes": order.nbytes}
            payload.append(order.tobytes())
        text = json.dumps(header).encode()
        return PARTIAL_FORMAT, _LENGTH.pack(len(text)) + text + b"".join(payload)

    @classmethod
    def decode(cls, fmt: str, data: bytes) -> PartialResults:
        """The partial results of a DevEncoded value; :class:`PartialResultsError` says why not."""
        if fmt != PARTIAL_FORMAT:
            raise PartialResultsError(f"partial results in format {fmt!r}, expected {PARTIAL_FORMAT!r}")
        data = memoryview(bytes(data))
        if len(data) < _LENGTH.size:
            raise PartialResultsError(f"partial results of {len(data)} bytes: shorter than their length field")
        (length,) = _LENGTH.unpack_from(data)
        if length > _MAX_HEADER or _LENGTH.size + length > len(data):
            raise PartialResultsError(f"partial results header of {length} bytes does not fit the "
                                      f"{len(data)} bytes received")
        try:
            header = json.loads(bytes(data[_LENGTH.size:_LENGTH.size + length]))
            body = data[_LENGTH.size + length:]
            analyses = tuple(str(name) for name in header["analyses"])
            buffers: list[dict[str, np.ndarray]] = [{} for _ in analyses]
            for entry in header["buffers"]:
                index, offset, nbytes = int(entry["analysis"]), int(entry["offset"]), int(entry["nbytes"])
                dtype, shape = np.dtype(entry["dtype"]), tuple(int(n) for n in entry["shape"])
                if not 0 <= index < len(analyses) or dtype.hasobject:
                    raise PartialResultsError(f"buffer {entry['name']!r}: analysis index {index} or "
                                              f"type {dtype} not allowed")
                if nbytes != math.prod(shape) * dtype.itemsize or offset < 0 or offset + nbytes > len(body):
                    raise PartialResultsError(f"buffer {entry['name']!r} of shape {shape} {dtype} does not "
                                              f"match its {nbytes} bytes at {offset} (body {len(body)} bytes)")
                buffers[index][str(entry["name"])] = np.frombuffer(body[offset:offset + nbytes],
                                                                   dtype).reshape(shape).copy()
            done_info = header["done"]
            size, offset, nbytes = int(done_info["size"]), int(done_info["offset"]), int(done_info["nbytes"])
            if nbytes != (size + 7) // 8 or offset + nbytes > len(body):
                raise PartialResultsError(f"done map of {size} positions does not match its {nbytes} bytes")
            done = np.unpackbits(np.frombuffer(body[offset:offset + nbytes], np.uint8), count=size).astype(bool)
            order = None
            if header.get("order") is not None:
                o_size, o_offset, o_bytes = (int(header["order"][k]) for k in ("size", "offset", "nbytes"))
                if o_bytes != 8 * o_size or o_offset < 0 or o_offset + o_bytes > len(body) or o_size > size:
                    raise PartialResultsError(f"frame order of {o_size} entries does not match its {o_bytes} bytes")
                order = np.frombuffer(body[o_offset:o_offset + o_bytes], "<i8").astype(np.int64)
                if order.size and (order.min() < 0 or order.max() >= size):
                    raise PartialResultsError(f"frame order names frames outside the scan of {size}")
            state = str(header["state"])
            RunState(state)
            return cls(series=int(header["series"]), state=state, end_seen=bool(header["end_seen"]),
                       frames_received=int(header["frames_received"]),
                       frames_processed=int(header["frames_processed"]), analyses=analyses, done=done,
                       buffers=tuple(buffers), error=str(header.get("error", "")),
                       sequence=int(header.get("sequence", 0)), extra=dict(header.get("extra", {})), order=order)
        except PartialResultsError:
            raise
        except (KeyError, TypeError, ValueError) as error:
            raise PartialResultsError(f"malformed partial results header: {type(error).__name__}: {error}") \
                from error


def partial_of(selected: Sequence[SelectedAnalysis], done: np.ndarray, **fields) -> PartialResults:
    """The raw whole-scan buffers of ``selected``'s UDFs (copies) and ``done`` as a partial."""
    return PartialResults(analyses=tuple(s.name for s in selected), done=done.copy(),
                          buffers=tuple({name: array.copy() for name, (_kind, array) in full_buffers(s.udf).items()}
                                        for s in selected), **fields)


class ResultMerger:
    """The results of one series from the partials of several nodes (see the module docstring).

    ``merge`` starts from fresh buffers each time: a node's partials are cumulative, so the
    latest of each node is what counts."""

    def __init__(self, registry: AnalysisRegistry, analyses: Sequence[str], parameters: AnalysisParameters,
                 scan: ScanShape, frame_shape: tuple[int, int], raw_dtype: str) -> None:
        self.analyses = tuple(analyses)
        self.scan = scan
        self._registry = registry
        self._parameters = parameters
        self._frame_shape = tuple(frame_shape)
        self._raw_dtype = np.dtype(raw_dtype)
        self._dataset = LiveDataSet(scan.shape, self._frame_shape, self._raw_dtype)
        self.size = math.prod(scan.shape)

    def _fresh(self) -> list[SelectedAnalysis]:
        selected = self._registry.build(list(self.analyses), self._parameters, self._frame_shape)
        for s in selected:
            allocate_full_results(s.udf, self._dataset, udf_input_dtype(s.udf, self._raw_dtype))
        return selected

    def layout(self) -> dict[str, dict[str, tuple[tuple[int, ...], str]]]:
        """analysis -> result -> (shape, dtype) of what :meth:`merge` gives (for the series file)."""
        layout = {}
        empty = np.zeros(self.size, bool)
        shaped = empty.reshape(self.scan.shape)
        for s in self._fresh():
            results = results_of(s.udf, empty)
            own = {name: blank_unprocessed(np.array(buf.data), shaped) if buf.kind == "nav" else np.array(buf.data)
                   for name, buf in results.items()}
            layout[s.name] = {name: (value.shape, value.dtype.str) for name, value in s.extract_results(own).items()}
        return layout

    def check(self, partial: PartialResults) -> None:
        """:class:`PartialResultsError` unless ``partial`` is of this series' analyses and scan."""
        if partial.analyses != self.analyses:
            raise PartialResultsError(f"partial results of analyses {list(partial.analyses)}, the series runs "
                                      f"{list(self.analyses)}")
        if partial.done.size != self.size:
            raise PartialResultsError(f"partial results of a scan of {partial.done.size} positions, the series "
                                      f"has {self.size}")

    def merge(self, partials: Sequence[PartialResults], series: int, state: RunState,
              frames_missing_final: bool = False, error: str | None = None) -> ResultSnapshot:
        """One snapshot of ``partials`` merged (each already :meth:`check`-ed)."""
        selected = self._fresh()
        done = np.zeros(self.size, bool)
        partition = self._dataset.partition_for_run(0, None, self.size)
        for partial in partials:
            for s, node_buffers in zip(selected, partial.buffers):
                own = full_buffers(s.udf)
                if set(node_buffers) != set(own):
                    raise PartialResultsError(f"analysis {s.name}: a node sent buffers {sorted(node_buffers)}, "
                                              f"its UDF has {sorted(own)}")
                src = {}
                for name, (kind, dest) in own.items():
                    value = node_buffers[name]
                    if value.shape != dest.shape:
                        raise PartialResultsError(f"analysis {s.name} buffer {name}: shape {value.shape}, "
                                                  f"expected {dest.shape}")
                    if kind == "nav" and partial.order is not None:
                        # compact rows: row i is frame order[i]; the rows merged on the node are
                        # those whose frame it marks done
                        rows = np.flatnonzero(partial.done[partial.order])
                        placed = dest.copy()
                        placed[partial.order[rows]] = value[rows]
                        value = placed
                    elif kind == "nav":
                        # placed by frame index: where this node has no frame, what the others gave stays
                        value = value.copy()
                        value[~partial.done] = dest[~partial.done]
                    src[name] = value
                merge_partial(s.udf, partition, src)
            done |= partial.done
        shaped = done.reshape(self.scan.shape)
        buffers: dict[str, np.ndarray] = {}
        for s in selected:
            results = results_of(s.udf, done)
            own = {name: blank_unprocessed(np.array(buf.data), shaped) if buf.kind == "nav" else np.array(buf.data)
                   for name, buf in results.items()}
            buffers.update({k: np.ascontiguousarray(v) for k, v in s.extract_results(own).items()})
        processed = int(np.count_nonzero(done))
        return ResultSnapshot(
            series=series, state=state, scan_shape=self.scan.shape, scan_shape_note=self.scan.note,
            buffers=buffers, done=shaped, frames_expected=self.size, frames_processed=processed,
            frames_missing=self.size - processed if frames_missing_final else 0,
            stacks_merged=len(partials), error=error)
