"""One series as a NeXus/HDF5 file: raw frames by direct chunk write, results, detector settings.

Layout (docs/saving.md has an ``h5ls -r`` listing)::

    /entry                          NXentry: start_time, end_time, series_id, title, scan_shape,
                                    program_name, saving_status
    /entry/instrument/detector      NXdetector: the detector's settings at arm (units attributes),
                                    data -> /entry/data/data
    /entry/data                     NXdata, signal "data"
    /entry/data/data                (n_frames, height, width), one chunk per frame
    /entry/data/missing_frames      int64 frame numbers not in the file (written at close)
    /entry/results/<analysis>       NXprocess, the analysis' parameters as attributes
    /entry/results/<analysis>/<b>   one result buffer; <b>_plot: an NXdata showing it
    /entry/results/frames_done      scan-shaped map of the frames processed (1) or not (0)

Frames written by several processes (``spec.parts``, a :class:`PartLayout`): each writes a part
file of its own beside the series file (``<name>_part<k>.h5``: ``/entry/data/data`` holds its
blocks of frames back to back), and the series file's ``/entry/data/data`` is a virtual dataset
(HDF5 VDS) that maps every frame to its place in its part, so readers still see one dataset.
Frame ``f`` is in block ``f // block``, and block ``b`` in part ``b % parts``: a static map, fixed
when the files are created, as a virtual dataset's must be.

Crash safety: every object is created first, then the file goes to SWMR mode, where HDF5 keeps
the file consistent on disk at every :meth:`~NexusSeriesWriter.flush`. A writer killed mid-series
leaves a file with the frames written before its last flush (its ``saving_status`` still says
``writing``; :func:`~.recovery.clear_write_flags` lets normal readers open it).

A full disk: before each stack the writer checks that the file can grow by the stack's size plus
room to close it (``fallocate``, which sees the free space, quotas and file-size limits). When it
cannot, no more frames are written and the file is closed normally, its ``saving_status`` saying
why. A write that fails anyway (the disk filled meanwhile) leaves HDF5 unable to close the file:
the writer then gives the file up as a killed writer would (:attr:`NexusSeriesWriter.abandoned`),
and its process must exit without touching HDF5 again (the writer process does).
"""
from __future__ import annotations

import ctypes
import errno
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from tango_dectris_live.receiver.framestack import (FrameStackHandle, attach_segment, dtype_of_tag, dtype_tag,
                                                    record_bytes)
from tango_dectris_live.stream import Algorithm

from .chunks import _FRAMING, ChunkFormat, ChunkRefused
from .errors import SeriesFileError
from .parts import PartLayout, part_frames_on_disk, virtual_frames

# Lowest and highest HDF5 file format: 1.10 is the first with SWMR; a file made with the newest
# format (HDF5 2.0) cannot be read by HDF5 1.10 to 1.14 (their h5ls shows its filtered datasets as
# *ERROR*), and the facility's readers have those.
LIBVER = ("v110", "v110")
PROGRAM = "tango-dectris-live"

#: (value, unit or None) per SIMPLON key, as the detector reported them at arm.
DetectorConfig = Mapping[str, Any]
#: analysis name -> result buffer name -> (shape, dtype)
ResultLayout = Mapping[str, Mapping[str, tuple[tuple[int, ...], Any]]]

_TIME_DTYPE = "S40"  # ISO 8601 with milliseconds and time zone: 29 characters
_STATUS_DTYPE = "S512"
_INDEX_BYTES_PER_FRAME = 64  # room for the chunk index per frame (estimate; measured ~25)
_CLOSE_ROOM = 1 << 20  # room kept for closing the file: chunk index, missing_frames, end_time
_SPACE_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}
_HDF5_ERRORS = (OSError, RuntimeError)  # how h5py raises what HDF5 reports
# encodings whose blob is the chunk as received (a v1 ``lz4`` blob needs a framing prefix: chunks.py)
_AS_RECEIVED = frozenset({Algorithm.BSLZ4, Algorithm.BSZSTD, Algorithm.LZ4H5, Algorithm.NONE})
#: A series of unknown length grows up to this many frames; higher frame numbers are refused (a
#: corrupt header must not make the writer allocate gigabytes for its map of frames written).
MAX_FRAMES_UNKNOWN_LENGTH = 1 << 26
_ATTRIBUTE_MAX_ELEMENTS = 1024  # larger parameters go to datasets (attributes are meant to be small)

# HDF5 cannot close a file after a failed write, and freeing the h5py object of such a file
# crashed the interpreter (h5py's dealloc): the objects of given-up files are kept here, never freed.
_GIVEN_UP: list[h5py.File] = []


@dataclass(frozen=True)
class SeriesFileSpec:
    """What a series file holds besides frames and results (picklable: sent to the writer process).

    ``frame_shape`` (height, width), ``dtype`` and ``encoding`` (a frame-stack encoding such as
    ``bslz4``, ``lz4h5``, or a stream v1 one such as ``bs16-lz4<``) may be None when the header
    did not say: the writer process then takes them from the first stack.
    ``n_frames`` None: the frames dataset grows with the highest frame number received.
    ``detector_config``: SIMPLON key -> (value, unit or None). ``result_layout``: analysis ->
    buffer -> (shape, dtype) of every result to be written (buffer names unique across analyses).
    ``channels``: the channel names of multi-channel frames (stream v2 thresholds); the first is
    ``/entry/data/data``, the others ``/entry/data/data_<name>``; empty: one channel.
    ``parts``: the frames go to part files (see :class:`PartLayout`; needs ``n_frames``); None:
    they are in the series file itself.
    """

    series_id: int
    frame_shape: tuple[int, int] | None = None
    dtype: str | None = None
    encoding: str | None = None
    n_frames: int | None = None
    scan_shape: tuple[int, ...] | None = None
    title: str = ""
    detector_config: DetectorConfig = field(default_factory=dict)
    result_layout: ResultLayout = field(default_factory=dict)
    analysis_parameters: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    channels: tuple[str, ...] = ()
    parts: PartLayout | None = None

    @property
    def complete(self) -> bool:
        """Whether the frame geometry is known (else the first stack tells)."""
        return None not in (self.frame_shape, self.dtype, self.encoding)

    def with_geometry_of(self, handle: FrameStackHandle) -> SeriesFileSpec:
        """This spec with the unknown frame shape, pixel type and encoding of ``handle``'s frames."""
        first = handle.index()[:1]
        dtype = self.dtype or (str(dtype_of_tag(int(first["dtype_tag"][0]))) if first.size else handle.dtype)
        return replace(self, frame_shape=self.frame_shape or tuple(handle.shape), dtype=dtype,
                       encoding=self.encoding or handle.encoding)


@dataclass(frozen=True)
class PartSaved:
    """What a closed part file holds (sent to the process that closes the series file).

    ``written``: ``np.packbits`` of the series' frames written to this part (a bool per frame of
    the series); ``stopped_reason``: why the part stopped taking frames (disk full), if it did."""

    path: str
    part: int
    written: np.ndarray
    n_frames: int
    frames_saved: int
    frames_refused: int
    bytes_written: int
    stopped_reason: str | None = None
    notes: tuple[str, ...] = ()

    def written_frames(self) -> np.ndarray:
        """The bool per frame of the series: whether this part holds it."""
        return np.unpackbits(self.written, count=self.n_frames).astype(bool)


@dataclass(frozen=True)
class SeriesSaved:
    """What a closed (or given-up) series file holds.

    ``frames_saved``: frames in the file (for a given-up file: those written before its last
    flush). ``stopped_reason``: why saving stopped before the series' end (disk full, a write
    error), None when it did not. ``file_closed`` False: the file was given up (see the module
    docstring), its write flags are still set. ``notes``: frames refused and why.
    """

    path: str
    series_id: int
    frames_saved: int
    frames_missing: int
    frames_refused: int
    bytes_written: int
    seconds: float
    complete: bool
    stopped_reason: str | None = None
    file_closed: bool = True
    notes: tuple[str, ...] = ()

    @property
    def megabytes_per_second(self) -> float:
        return self.bytes_written / self.seconds / 1e6 if self.seconds > 0 else 0.0


class NexusSeriesWriter:
    """Writes one series file at ``path``: a new file, or the empty one
    :meth:`~.paths.SavingLocation.reserve` made (a file with content is never overwritten).

    Creates every group and dataset at once (SWMR allows no new objects later), then takes
    frames (:meth:`write_frame`, :meth:`write_stack`) and results (:meth:`write_results`) in any
    order, any number of times; :meth:`flush` makes what was written safe from a crash of the
    writer; :meth:`close` writes ``missing_frames`` and ``end_time``. Not thread-safe.

    With ``spec.parts`` (frames written by several processes): ``part=None`` writes the series
    file, whose frames dataset is a virtual one over the part files (it takes no frames; its
    :meth:`close` gets the parts' :class:`PartSaved`); ``part=k`` writes part file ``k``: its
    frames only (:meth:`write_stack` skips the frames of other parts), :meth:`close_part`.
    """

    def __init__(self, path: str | os.PathLike, spec: SeriesFileSpec, *, flush_interval: float = 1.0,
                 check_space: bool = True, part: int | None = None) -> None:
        if not spec.complete:
            raise SeriesFileError(f"series {spec.series_id}: frame shape, pixel type and encoding must be "
                                  "known to create its file")
        if spec.parts is not None and not spec.n_frames:
            raise SeriesFileError(f"series {spec.series_id}: part files need the number of frames")
        if part is not None and (spec.parts is None or not 0 <= part < spec.parts.count):
            raise SeriesFileError(f"part {part} of series {spec.series_id}: the spec's part layout has "
                                  f"{spec.parts.count if spec.parts else 0} parts")
        self.part = part
        self.path = Path(path)
        self.spec = spec
        self.flush_interval = float(flush_interval)
        self.format = ChunkFormat.of(spec.encoding)
        self.frame_shape = (int(spec.frame_shape[0]), int(spec.frame_shape[1]))
        self.dtype = np.dtype(spec.dtype)
        self.frame_nbytes = self.frame_shape[0] * self.frame_shape[1] * self.dtype.itemsize
        self.frames_saved = 0
        self.frames_flushed = 0
        self.frames_refused = 0
        self.bytes_written = 0
        self.stopped_reason: str | None = None
        self.abandoned = False
        self._refusals: dict[str, list] = {}  # kind -> [count, first message]
        # frames of the series (the highest frame number + 1 when the series' length is unknown)
        self._length = spec.n_frames or 0
        # per position of this file's frames dataset: whether it was written
        self._written = np.zeros(spec.parts.frames_in(part, self._length) if part is not None else self._length,
                                 dtype=bool)
        self._started = time.monotonic()
        self._last_flush = self._started
        self._closed: SeriesSaved | None = None
        self._closed_part: PartSaved | None = None
        self._part_notes: list[str] = []
        try:
            if self.path.stat().st_size > 0:
                raise SeriesFileError(f"{self.path} exists and is not empty: not overwritten (reserve a name "
                                      "with SavingLocation.reserve)")
        except FileNotFoundError:
            pass
        try:
            self._file = h5py.File(self.path, "w", libver=LIBVER)
        except OSError as error:
            raise SeriesFileError(f"cannot create the series file {self.path}: {error}") from None
        self._space = _SpaceCheck(self.path) if check_space else None
        try:
            self._build() if part is None else self._build_part()
            self._file.swmr_mode = True
            self._file.flush()
        except BaseException:
            self._file.close()
            if self._space is not None:
                self._space.close()
            raise

    # ---- layout ----------------------------------------------------------------------------

    def _build(self) -> None:
        spec, f = self.spec, self._file
        f.attrs.update({"NX_class": "NXroot", "default": "entry", "creator": PROGRAM,
                        "file_name": self.path.name, "file_time": _now(),
                        "HDF5_Version": h5py.version.hdf5_version, "h5py_version": h5py.version.version})
        entry = _group(f, "entry", "NXentry", default="data")
        entry.create_dataset("start_time", data=np.bytes_(_now()), dtype=_TIME_DTYPE)
        self._end_time = entry.create_dataset("end_time", shape=(), dtype=_TIME_DTYPE)
        entry["series_id"] = np.int64(spec.series_id)
        entry["title"] = spec.title or f"series {spec.series_id}"
        entry["program_name"] = PROGRAM
        scan_shape = spec.scan_shape or ((spec.n_frames,) if spec.n_frames is not None else None)
        if scan_shape is not None:
            entry["scan_shape"] = np.asarray(scan_shape, dtype=np.int64)
        self._status = entry.create_dataset("saving_status", shape=(), dtype=_STATUS_DTYPE)
        self._status[()] = _status_bytes("writing (a file still saying this was not closed: its writer stopped; "
                                         "frames missing from it read as 0)")

        instrument = _group(entry, "instrument", "NXinstrument")
        detector = _group(instrument, "detector", "NXdetector")
        _write_detector_config(detector, spec.detector_config)

        data = _group(entry, "data", "NXdata", signal="data")
        n = spec.n_frames or 0
        if spec.parts is None:
            self._frames = self._frame_datasets(data, n)
            shown = self._frames
        else:  # the frames are in the part files: one virtual dataset per channel maps them
            self._frames = []
            shown = [virtual_frames(data, name, n, self.frame_shape, self.dtype, spec.parts)
                     for name in self._frame_dataset_names()]
            for dataset, channel in zip(shown, spec.channels or ("",)):
                dataset.attrs.update({"interpretation": "image", "stream_encoding": self.format.algorithm.value,
                                      "hdf5_filter": f"{self.format.filter_name}, in the part files",
                                      "part_files": list(spec.parts.files), "frames_per_block": spec.parts.block})
                if channel:
                    dataset.attrs["channel"] = channel
            data.attrs["part_files"] = list(spec.parts.files)
        if len(shown) > 1:
            data.attrs["auxiliary_signals"] = [d.name.rsplit("/", 1)[1] for d in shown[1:]]
        detector["data"] = shown[0]
        self._missing = data.create_dataset("missing_frames", shape=(0,), maxshape=(None,), dtype=np.int64,
                                            chunks=(512,))
        self._missing.attrs["description"] = "frame numbers whose data is not in the file (read as 0)"
        self._results: dict[str, h5py.Dataset] = {}
        self._frames_done: h5py.Dataset | None = None
        if spec.result_layout:
            self._build_results(entry, scan_shape)

    def _frame_dataset_names(self) -> list[str]:
        channels = self.spec.channels[1:] if len(self.spec.channels) > 1 else ()
        return ["data"] + [f"data_{_link_name(name, 'channel')}" for name in channels]

    def _frame_datasets(self, group: h5py.Group, n: int) -> list[h5py.Dataset]:
        """One chunked dataset per channel, a chunk per frame, with the stream's filter."""
        maxshape = (n if self.spec.n_frames and n else None, *self.frame_shape)  # (a part may get no frame)
        datasets = [group.create_dataset(name, shape=(n, *self.frame_shape), maxshape=maxshape, dtype=self.dtype,
                                         chunks=(1, *self.frame_shape), **self.format.dataset_filter())
                    for name in self._frame_dataset_names()]
        for dataset, channel in zip(datasets, self.spec.channels or ("",)):
            dataset.attrs.update({"interpretation": "image", "stream_encoding": self.format.algorithm.value,
                                  "hdf5_filter": self.format.filter_name})
            if channel:
                dataset.attrs["channel"] = channel
        return datasets

    def _build_part(self) -> None:
        """A part file: its frames only; the series file says what they are."""
        spec, parts, f = self.spec, self.spec.parts, self._file
        series_file = parts.series_file
        f.attrs.update({"NX_class": "NXroot", "default": "entry", "creator": PROGRAM, "file_name": self.path.name,
                        "file_time": _now(), "HDF5_Version": h5py.version.hdf5_version,
                        "h5py_version": h5py.version.version})
        entry = _group(f, "entry", "NXentry", default="data")
        entry.attrs.update({"series_file": series_file, "part": self.part, "parts": parts.count,
                            "frames_per_block": parts.block, "series_id": spec.series_id,
                            "description": f"part {self.part} of {parts.count} of the frames of {series_file}: "
                                           f"blocks of {parts.block} frames, block b in part b % {parts.count}; "
                                           "read them through the series file's /entry/data/data"})
        data = _group(entry, "data", "NXdata", signal="data")
        self._frames = self._frame_datasets(data, int(self._written.size))
        self._missing = self._end_time = self._status = None
        self._results, self._frames_done = {}, None

    def _build_results(self, entry: h5py.Group, scan_shape: tuple[int, ...] | None) -> None:
        results = _group(entry, "results", "NXcollection")
        for analysis, buffers in self.spec.result_layout.items():
            group = _group(results, _link_name(analysis, "analysis"), "NXprocess")
            _write_parameters(group, self.spec.analysis_parameters.get(analysis, {}))
            for buffer, (shape, dtype) in buffers.items():
                if buffer in self._results:
                    raise SeriesFileError(f"result {buffer!r} is in two analyses' layouts; names must be unique")
                shape = tuple(int(n) for n in shape)
                dt = np.dtype(dtype)
                fill = np.nan if dt.kind in "fc" else 0
                chunked = len(shape) > 0 and math.prod(shape) > 0
                dataset = group.create_dataset(_link_name(buffer, "result"), shape=shape, dtype=dt, fillvalue=fill,
                                               chunks=True if chunked else None)
                self._results[buffer] = dataset
                plot = f"{dataset.name.rsplit('/', 1)[1]}_plot"
                if chunked and plot not in group and plot not in buffers:
                    nxdata = _group(group, plot, "NXdata", signal=dataset.name.rsplit("/", 1)[1])
                    nxdata[dataset.name.rsplit("/", 1)[1]] = dataset
                    group.attrs.setdefault("default", plot)
        if scan_shape is not None:
            self._frames_done = results.create_dataset("frames_done", shape=tuple(scan_shape), dtype=np.uint8,
                                                       chunks=True if math.prod(scan_shape) else None)
            self._frames_done.attrs["description"] = "1 where the frame was processed, 0 where not"

    # ---- frames ----------------------------------------------------------------------------

    @property
    def stopped(self) -> bool:
        """No more frames are written (the disk was full, or a write failed)."""
        return self.stopped_reason is not None

    @property
    def takes_frames(self) -> bool:
        """False for a series file whose frames are in part files."""
        return self.spec.parts is None or self.part is not None

    def _check_takes_frames(self) -> None:
        if not self.takes_frames:
            raise SeriesFileError(f"{self.path.name}: the frames of series {self.spec.series_id} go to its part files "
                                  f"({', '.join(self.spec.parts.files)}), written with part=k")

    def _positions(self, numbers: np.ndarray) -> np.ndarray:
        """Where frames (numbers within the series) go in this file's frames datasets."""
        return numbers if self.part is None else self.spec.parts.position(numbers)

    def write_frame(self, frame_number: int, blob: Any, *, encoding: str | Algorithm | None = None,
                    channel: int = 0) -> bool:
        """Write one frame's compressed bytes as received; returns whether it was written
        (refusals are counted in :attr:`frames_refused` and listed in the closing notes)."""
        self._check_takes_frames()
        if self.stopped:
            return False
        if self.part is not None and int(self.spec.parts.owner(np.int64(frame_number))) != self.part:
            self._refuse("part", f"frame {frame_number} belongs to part "
                                 f"{int(self.spec.parts.owner(np.int64(frame_number)))}, not to this part {self.part}")
            return False
        if encoding is not None and ChunkFormat.of(encoding) != self.format:
            self._refuse("encoding", f"frame {frame_number} is {ChunkFormat.of(encoding).algorithm.value}, "
                                     f"the file's frames are {self.format.algorithm.value}")
            return False
        view = memoryview(blob).cast("B")
        if not self._room_for(view.nbytes + _INDEX_BYTES_PER_FRAME):
            return False
        if not self._grow_to(np.array([frame_number])):
            return False
        size = self._write_chunk(int(frame_number), view, channel)
        self.maybe_flush()
        return size is not None

    def write_stack(self, handle: FrameStackHandle) -> int:
        """Write every frame of a frame stack (read in place from the shared memory); returns
        how many were written. A part file takes the stack's frames of its part only."""
        self._check_takes_frames()
        if self.stopped or handle.frames == 0:
            return 0
        records = handle.index()
        numbers = records["frame"].astype(np.int64)
        if self.part is None:
            good = np.ones(numbers.size, dtype=bool)
        else:
            good = self.spec.parts.owner(numbers) == self.part
            if not good.any():
                return 0
        codes = records["encoding"]
        bad = good & (codes != self.format.algorithm.code)
        if bad.any():
            self._refuse("encoding", f"{int(bad.sum())} frame(s) of stack {handle.first_frame}.. are not "
                                     f"{self.format.algorithm.value}, as the file's frames are", int(bad.sum()))
            good &= ~bad
        tags = records["dtype_tag"]
        own_tag = dtype_tag(self.dtype)
        if (tags != own_tag).any():
            bad = good & (tags != own_tag)
            if bad.any():
                self._refuse("pixel type", f"{int(bad.sum())} frame(s) of stack {handle.first_frame}.. are not "
                                           f"{self.dtype}, as the file's frames are", int(bad.sum()))
                good &= ~bad
        total = int(records["size"][good].sum())
        if not self._room_for(total + _INDEX_BYTES_PER_FRAME * int(good.sum())):
            return 0
        if not self._grow_to(numbers[good]):
            return 0
        buffer = attach_segment(handle.segment)
        data_start = handle.slot * handle.layout.slot_bytes + handle.layout.index_bytes
        written = 0
        channels = records["channels"]
        if (channels[good] <= 1).all() and self.format.algorithm in _AS_RECEIVED:
            written = self._write_blobs(buffer, data_start, numbers[good], records["offset"][good],
                                        records["size"][good])
        elif (channels[good] <= 1).all():
            for number, offset, size in zip(numbers[good].tolist(), records["offset"][good].tolist(),
                                            records["size"][good].tolist()):
                begin = data_start + offset
                if self._write_chunk(number, buffer[begin:begin + size], 0) is None:
                    if self.stopped:
                        break
                    continue
                written += 1
        else:
            for position in np.flatnonzero(good).tolist():
                record = records[position]
                count = min(int(record["channels"]) or 1, len(self._frames))
                if int(record["channels"]) > len(self._frames):
                    self._refuse("channels", f"frames have {int(record['channels'])} channels, the file "
                                             f"keeps {len(self._frames)} (spec.channels)", frames=0)
                if all(self._write_chunk(int(numbers[position]), record_bytes(handle, record, c), c) is not None
                       for c in range(count)):
                    written += 1
                if self.stopped:
                    break
        self.maybe_flush()
        return written

    def _write_blobs(self, buffer: memoryview, data_start: int, numbers: np.ndarray, offsets: np.ndarray,
                     sizes: np.ndarray) -> int:
        """The frames of one stack whose chunks are the blobs as received (one channel): every
        check done on the whole stack at once, then one HDF5 call per frame and nothing else
        (what ``_write_chunk`` does frame by frame, ~3 times the cost at 96x96)."""
        keep = (numbers >= 0) & (numbers < self._length)
        if not keep.all():
            for number in numbers[~keep].tolist():
                self._refuse("frame number", f"frame {number} is outside the series' {self._length} frames")
        starts = data_start + offsets.astype(np.int64)
        if self.format.algorithm is Algorithm.NONE:
            wrong = keep & (sizes != self.frame_nbytes)
            for number, size in zip(numbers[wrong].tolist(), sizes[wrong].tolist()):
                self._refuse("size", f"frame {number}: {size} uncompressed bytes, the frame needs {self.frame_nbytes}")
        else:
            short = keep & (sizes < _FRAMING.size)
            for number, size in zip(numbers[short].tolist(), sizes[short].tolist()):
                self._refuse("size", f"frame {number}: {self.format.algorithm.value} data of {size} bytes is "
                                     f"shorter than its {_FRAMING.size}-byte header")
            keep &= ~short
            raw = np.frombuffer(buffer, dtype=np.uint8)
            declared = np.zeros(numbers.size, dtype=np.int64)
            if keep.any():  # each blob's header: its uncompressed size, big-endian (chunks.py)
                heads = raw[starts[keep, None] + np.arange(8)]
                declared[keep] = np.ascontiguousarray(heads).view(">u8").ravel().astype(np.int64)
            wrong = keep & (declared != self.frame_nbytes)
            for number, size in zip(numbers[wrong].tolist(), declared[wrong].tolist()):
                self._refuse("size", f"frame {number}: {self.format.algorithm.value} header declares {size} bytes, "
                                     f"the frame needs {self.frame_nbytes}")
        keep &= ~wrong
        positions, starts, sizes = self._positions(numbers[keep]), starts[keep], sizes[keep]
        write = self._frames[0].id.write_direct_chunk
        done = 0
        try:
            for position, begin, size in zip(positions.tolist(), starts.tolist(), sizes.tolist()):
                write((position, 0, 0), buffer[begin:begin + size])
                done += 1
        except _HDF5_ERRORS as error:
            self._give_up(error)
        self.bytes_written += int(sizes[:done].sum())
        fresh = np.unique(positions[:done])
        fresh = fresh[~self._written[fresh]]
        self.frames_saved += int(fresh.size)
        self._written[fresh] = True
        return done

    def _write_chunk(self, frame_number: int, blob: memoryview, channel: int) -> int | None:
        """Write one chunk; its size, or None when refused or when writing failed."""
        where = f"frame {frame_number}"
        if not 0 <= frame_number < self._length:  # cached: h5py's Dataset.shape asks HDF5 every time
            self._refuse("frame number", f"{where} is outside the series' {self._length} frames")
            return None
        try:
            chunk = self.format.chunk(blob, self.frame_nbytes, where)
        except ChunkRefused as error:
            self._refuse("size", str(error))
            return None
        position = int(self._positions(np.int64(frame_number)))
        try:
            self._frames[channel].id.write_direct_chunk((position, 0, 0), chunk)
        except _HDF5_ERRORS as error:
            self._give_up(error)
            return None
        size = chunk.nbytes if isinstance(chunk, memoryview) else len(chunk)
        self.bytes_written += size
        if channel == 0:
            if not self._written[position]:
                self.frames_saved += 1
            self._written[position] = True
        return size

    def _grow_to(self, numbers: np.ndarray) -> bool:
        """Extend the frames datasets of a series of unknown length to the highest frame number."""
        if self.spec.n_frames or numbers.size == 0:
            return True
        highest = int(numbers.max())
        if highest < self._length or highest < 0:
            return True
        if highest >= MAX_FRAMES_UNKNOWN_LENGTH:
            numbers = numbers[numbers < MAX_FRAMES_UNKNOWN_LENGTH]
            if numbers.size == 0 or int(numbers.max()) < self._length:
                return True  # the frames beyond are refused one by one as outside the series
            highest = int(numbers.max())
        try:
            for dataset in self._frames:
                dataset.resize(highest + 1, axis=0)
            self._length = highest + 1
        except _HDF5_ERRORS as error:
            self._give_up(error)
            return False
        grown = np.zeros(highest + 1, dtype=bool)
        grown[:self._written.size] = self._written
        self._written = grown
        return True

    # ---- results ---------------------------------------------------------------------------

    def write_results(self, buffers: Mapping[str, np.ndarray], frames_done: np.ndarray | None = None) -> None:
        """Overwrite the result datasets named in ``buffers`` (by buffer name, as in the layout
        given at the start; the caller blanks unprocessed float positions with NaN) and the map of
        processed frames. Raises :class:`SeriesFileError` for a name or shape not in the layout."""
        unknown = [name for name in buffers if name not in self._results]
        if unknown:
            raise SeriesFileError(f"results {unknown} are not in the series file's layout "
                                  f"({', '.join(self._results) or 'no results'}): give them at the start")
        for name, values in buffers.items():
            values = np.asarray(values)
            if values.shape != self._results[name].shape:
                raise SeriesFileError(f"result {name!r} has shape {values.shape}, the file's layout "
                                      f"{self._results[name].shape}")
        if self.abandoned:
            return
        nbytes = sum(np.asarray(v).nbytes for v in buffers.values())
        if not self._room_for(nbytes):
            return  # the disk is full: frames stop too, and the status says why
        try:
            for name, values in buffers.items():
                self._results[name][...] = np.asarray(values)
            if frames_done is not None and self._frames_done is not None:
                done = np.asarray(frames_done)
                if done.size == self._frames_done.size:
                    self._frames_done[...] = done.reshape(self._frames_done.shape).astype(np.uint8)
            self._flush()
        except _HDF5_ERRORS as error:
            self._give_up(error)

    # ---- flushing and closing --------------------------------------------------------------

    def flush(self) -> None:
        """Make everything written so far safe from a crash of this process."""
        if not self.abandoned and self._closed is None:
            try:
                self._flush()
            except _HDF5_ERRORS as error:
                self._give_up(error)

    def maybe_flush(self) -> None:
        """:meth:`flush` when ``flush_interval`` seconds passed since the last one."""
        if time.monotonic() - self._last_flush >= self.flush_interval:
            self.flush()

    def _flush(self) -> None:
        self._file.flush()
        self.frames_flushed = self.frames_saved
        self._last_flush = time.monotonic()

    def close(self, end_reason: str = "", parts: Sequence[PartSaved | None] = ()) -> SeriesSaved:
        """Write ``missing_frames``, ``end_time`` and ``saving_status`` and close the file
        (idempotent); what the file holds. ``end_reason``: how the series ended, for the status.
        ``parts`` (a series file over part files): what each part file holds, by part; None (or
        left out) for a part whose writer stopped without saying: its file's chunk index tells."""
        if self.part is not None:
            raise SeriesFileError(f"{self.path.name} is a part file: close it with close_part()")
        if self._closed is not None:
            return self._closed
        if self.spec.parts is not None and not self.abandoned:
            self._take_parts(parts)
        length = self._length
        missing = np.flatnonzero(~self._written[:length]).astype(np.int64)
        if not self.abandoned:
            self._room_for(missing.nbytes, stop_frames=False)  # try anyway: nothing to lose
            try:
                self._missing.resize((missing.size,))
                if missing.size:
                    self._missing[...] = missing
                self._end_time[()] = np.bytes_(_now())
                self._status[()] = _status_bytes(self._status_text(missing.size, end_reason))
                self._file.close()
                self.frames_flushed = self.frames_saved
            except _HDF5_ERRORS as error:
                self._give_up(error)
        if self._space is not None:
            self._space.close()
        saved = self.frames_saved if not self.abandoned else self.frames_flushed
        expected = self.spec.n_frames if self.spec.n_frames is not None else length
        self._closed = SeriesSaved(
            path=str(self.path), series_id=self.spec.series_id, frames_saved=saved,
            frames_missing=max(0, expected - saved), frames_refused=self.frames_refused,
            bytes_written=self.bytes_written, seconds=time.monotonic() - self._started,
            complete=saved == expected and not self.stopped, stopped_reason=self.stopped_reason,
            file_closed=not self.abandoned, notes=self.notes())
        return self._closed

    def _take_parts(self, parts: Sequence[PartSaved | None]) -> None:
        """The part files' frames and counts as this series file's (they are its frames)."""
        layout, n = self.spec.parts, self._length
        written = np.zeros(n, dtype=bool)
        for part in range(layout.count):
            saved = parts[part] if part < len(parts) else None
            if saved is None:
                frames, note = part_frames_on_disk(self.path.parent, layout, part, n)
                self._part_notes.append(note)
                if self.stopped_reason is None:
                    self.stopped_reason = f"the writer of part {part} stopped before closing it"
            else:
                frames = saved.written_frames()
                self.frames_refused += saved.frames_refused
                self.bytes_written += saved.bytes_written
                self._part_notes.extend(f"part {part}: {note}" for note in saved.notes)
                if saved.stopped_reason and self.stopped_reason is None:
                    self.stopped_reason = f"{saved.stopped_reason} (part {part})"
            written |= frames[:n]
        self._written = written
        self.frames_saved = self.frames_flushed = int(written.sum())

    def close_part(self) -> PartSaved:
        """Close a part file (idempotent); what it holds, for the series file's :meth:`close`."""
        if self.part is None:
            raise SeriesFileError(f"{self.path.name} is not a part file: close it with close()")
        if self._closed_part is not None:
            return self._closed_part
        if not self.abandoned:
            try:
                self._file.close()
                self.frames_flushed = self.frames_saved
            except _HDF5_ERRORS as error:
                self._give_up(error)
        if self._space is not None:
            self._space.close()
        frames = np.zeros(self._length, dtype=bool)
        frames[self.spec.parts.frame_numbers(self.part, np.flatnonzero(self._written))] = True
        self._closed_part = PartSaved(path=str(self.path), part=self.part, written=np.packbits(frames),
                                      n_frames=self._length, frames_saved=self.frames_saved,
                                      frames_refused=self.frames_refused, bytes_written=self.bytes_written,
                                      stopped_reason=self.stopped_reason, notes=self.notes())
        return self._closed_part

    def notes(self) -> tuple[str, ...]:
        """One line per kind of refused frame: how many, and the first one's reason (and, for a
        series file over part files, what its parts said)."""
        return tuple(f"{count} refused ({kind}): {message}" for kind, (count, message) in self._refusals.items()) \
            + tuple(self._part_notes)

    def _status_text(self, missing: int, end_reason: str) -> str:
        ended = f"; series ended: {end_reason}" if end_reason else ""
        if self.stopped_reason:
            return f"stopped: {self.stopped_reason}; {self.frames_saved} frames saved{ended}"
        if missing:
            return (f"incomplete: {self.frames_saved} frames saved, {missing} missing "
                    f"(/entry/data/missing_frames){ended}")
        return f"complete: {self.frames_saved} frames saved{ended}"

    def __enter__(self) -> NexusSeriesWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.part is None:
            self.close()
        else:
            self.close_part()

    # ---- failures --------------------------------------------------------------------------

    def _refuse(self, kind: str, message: str, count: int = 1, *, frames: int | None = None) -> None:
        """Count ``count`` refusals of ``kind`` (``frames``: how many frames they cost, default all)."""
        self.frames_refused += count if frames is None else frames
        entry = self._refusals.setdefault(kind, [0, message])
        entry[0] += count

    def _room_for(self, nbytes: int, *, stop_frames: bool = True) -> bool:
        """Whether the file can grow by ``nbytes`` and still close; when not, frames stop."""
        if self._space is None:
            return True
        reason = self._space.lacks(nbytes + _CLOSE_ROOM + 8 * self._written.size)
        if reason is None:
            return True
        if stop_frames and self.stopped_reason is None:
            self.stopped_reason = f"{reason} after {self.frames_saved} frames"
        return False

    def _give_up(self, error: Exception) -> None:
        """A write failed: HDF5 cannot go on with this file; keep it as the last flush left it."""
        if not self.abandoned:
            self.abandoned = True
            reason = _describe_os_error(error)
            self.stopped_reason = self.stopped_reason or f"{reason} after {self.frames_flushed} frames"
            _GIVEN_UP.append(self._file)


# ---- space ---------------------------------------------------------------------------------


class _SpaceCheck:
    """Whether a file can grow by n bytes: ``fallocate`` past its end and back (seeing the free
    space, quotas and the process's file-size limit), or the file system's free space where
    ``fallocate`` is not supported."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None
        self._fallocate = _linux_fallocate()

    def lacks(self, nbytes: int) -> str | None:
        """None when there is room for ``nbytes`` more bytes; else the reason in words."""
        if self._fallocate is not None:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_WRONLY | getattr(os, "O_CLOEXEC", 0))
            size = os.fstat(self._fd).st_size
            if self._fallocate(self._fd, 0, ctypes.c_int64(size), ctypes.c_int64(nbytes)) == 0:
                os.ftruncate(self._fd, size)
                return None
            code = ctypes.get_errno()
            os.ftruncate(self._fd, size)
            if code in _SPACE_ERRNOS:
                return _describe_errno(code, nbytes)
            self._fallocate = None  # not supported here: the free space is all we can see
        free = shutil.disk_usage(self.path.parent).free
        if free < nbytes:
            return _describe_errno(errno.ENOSPC, nbytes)
        return None

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _linux_fallocate():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        function = libc.fallocate
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    function.restype = ctypes.c_int
    return function


def _describe_errno(code: int, nbytes: int) -> str:
    what = {errno.ENOSPC: "disk full", errno.EFBIG: "file size limit reached",
            errno.EDQUOT: "disk quota exceeded"}.get(code, "cannot write")
    return f"{what} ({os.strerror(code)}; {nbytes} more bytes needed)"


def _describe_os_error(error: Exception) -> str:
    if getattr(error, "errno", None) in _SPACE_ERRNOS:
        return {errno.ENOSPC: "disk full", errno.EFBIG: "file size limit reached",
                errno.EDQUOT: "disk quota exceeded"}[error.errno] + f" ({os.strerror(error.errno)})"
    first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
    return f"write failed: {first_line}"


# ---- helpers -------------------------------------------------------------------------------


def _now() -> str:
    return datetime.now().astimezone().isoformat(timespec="milliseconds")


def _status_bytes(text: str) -> np.bytes_:
    raw = text.encode("utf-8", "replace")
    limit = int(_STATUS_DTYPE[1:])
    return np.bytes_(raw if len(raw) <= limit else raw[:limit - 3] + b"...")


def _group(parent: h5py.Group, name: str, nx_class: str, **attrs: str) -> h5py.Group:
    group = parent.create_group(name)
    group.attrs["NX_class"] = nx_class
    group.attrs.update(attrs)
    return group


def _link_name(name: str, what: str) -> str:
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise SeriesFileError(f"{what} name {name!r} cannot name an HDF5 object (empty, '.', or with '/')")
    return name


def _write_detector_config(detector: h5py.Group, config: DetectorConfig) -> None:
    """Each SIMPLON key as a dataset with its unit; keys with a '/' (``threshold/1/energy``) as
    ``threshold_1_energy`` with the key in ``simplon_key``; None values listed in
    ``unavailable_keys``; values HDF5 cannot hold as such (dicts, ...) as JSON text."""
    unavailable = []
    for key, item in config.items():
        value, unit = item if isinstance(item, tuple) and len(item) == 2 else (item, None)
        data = _hdf5_value(value)
        if data is None:
            unavailable.append(key)
            continue
        name = key.replace("/", "_")
        if not name or name in detector or name in (".", ".."):
            name = f"simplon_{name}"
        dataset = detector.create_dataset(name, data=data)
        if unit:
            dataset.attrs["units"] = str(unit)
        if name != key:
            dataset.attrs["simplon_key"] = key
        if isinstance(data, str) and not isinstance(value, str):
            dataset.attrs["stringified"] = True
    if unavailable:
        detector.attrs["unavailable_keys"] = unavailable


def _write_parameters(group: h5py.Group, parameters: Mapping[str, Any]) -> None:
    """Parameters as attributes; arrays larger than a few thousand bytes as datasets of a
    ``parameters`` group (an attribute names it)."""
    for key, value in parameters.items():
        data = _hdf5_value(value)
        if data is None:
            group.attrs[key] = "None"
        elif isinstance(data, np.ndarray) and data.size > _ATTRIBUTE_MAX_ELEMENTS:
            holder = group.require_group("parameters")
            holder.attrs["NX_class"] = "NXcollection"
            holder.create_dataset(_link_name(key, "parameter"), data=data, chunks=True, compression="gzip")
            group.attrs[key] = f"parameters/{key}"
        else:
            group.attrs[key] = data


def _hdf5_value(value: Any) -> Any:
    """``value`` as HDF5 can store it: numbers, bools, strings and numeric/string arrays as
    themselves, anything else as JSON text; None stays None (the caller decides)."""
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)):
        return np.bool_(value)
    if isinstance(value, (int, float, complex, np.number, str)):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, (list, tuple, np.ndarray)):
        try:
            array = np.asarray(value)
        except ValueError:  # ragged
            array = None
        if array is not None and array.dtype.kind in "biufc":
            return array
        if array is not None and array.dtype.kind == "U" and array.size:
            return np.array(array.ravel().tolist(), dtype=h5py.string_dtype()).reshape(array.shape)
    return json.dumps(value, default=str)
