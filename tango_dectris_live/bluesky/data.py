"""Where the detector's data come from.

* :class:`LiveReadings`: read over Tango after each acquisition (step scans): ``series_id``,
  ``frames_processed``, ``frames_missing``, and the result images when they are not taken from a
  file.
* :class:`SeriesFilesProvider`: the series' NeXus file, when the device saves it: one StreamResource per
  dataset per file (the frames ``/entry/data/data`` and each result
  ``/entry/results/<analysis>/<attribute>``) and a StreamDatum for each, index 0..1: one event
  is one series, so a file holds one event's data. Consumers that join a data key's resources
  (Tiled) see the frames of all series one after the other.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import PurePath

import h5py
import numpy as np
import numpy.typing as npt
from bluesky.protocols import Reading, StreamAsset
from event_model import ComposeStreamResource, DataKey
from ophyd_async.core import (DetectorDataLogic, ReadableDataProvider, SignalR, StreamableDataProvider,
                              generate_directory_uri, merge_gathered_dicts)
from ophyd_async.tango.core import TangoSignalBackend, get_full_attr_trl

from .driver import DectrisLiveDriver
from .series import SeriesLayout, SeriesRecord

FRAMES_DATASET = "/entry/data/data"
HDF5_MIMETYPE = "application/x-hdf5"
#: scalars read after every acquisition
SERIES_SCALARS = ("series_id", "frames_processed", "frames_missing")


def results_dataset(analysis: str, attribute: str) -> str:
    return f"/entry/results/{analysis}/{attribute}"


def results_inline(layout: SeriesLayout, results_from_file: bool) -> bool:
    """Result images go into the events when the series is not saved, or when asked for."""
    return not (layout.saved and results_from_file)


class _AttributeSignals:
    """Signals of device attributes made on demand (the result attributes depend on the analyses),
    named ``<data key>-<attribute>``, sharing the driver's DeviceProxy."""

    def __init__(self, driver: DectrisLiveDriver) -> None:
        self._driver = driver
        self._signals: dict[str, SignalR] = {}

    async def get(self, datakey_name: str, attributes: Sequence[str], datatype: type) -> list[SignalR]:
        wanted = []
        for attribute in attributes:
            name = f"{datakey_name}-{attribute}"
            if name not in self._signals:
                trl = get_full_attr_trl(self._driver.get_trl(), attribute)
                backend = TangoSignalBackend(datatype, trl, trl, device_proxy=self._driver.get_proxy())
                signal = SignalR(backend, name=name)
                await signal.connect()
                self._signals[name] = signal
            wanted.append(self._signals[name])
        return wanted


@dataclass
class LiveReadings(ReadableDataProvider):
    """The readings of one acquisition, read fresh from the device once it ended."""

    signals: Sequence[SignalR]

    async def make_datakeys(self) -> dict[str, DataKey]:
        return await merge_gathered_dicts(signal.describe() for signal in self.signals)

    async def make_readings(self) -> dict[str, Reading]:
        return await merge_gathered_dicts(signal.read(cached=False) for signal in self.signals)


class LiveReadingLogic(DetectorDataLogic):
    """Step scans: the series' scalars and (see :func:`results_inline`) its result images."""

    def __init__(self, driver: DectrisLiveDriver, record: SeriesRecord, results_from_file: bool) -> None:
        self._record = record
        self._results_from_file = results_from_file
        self._signals = _AttributeSignals(driver)

    async def prepare_single(self, datakey_name: str) -> ReadableDataProvider:
        layout = self._record.require_layout()
        signals = await self._signals.get(datakey_name, SERIES_SCALARS, int)
        if results_inline(layout, self._results_from_file):
            signals += await self._signals.get(datakey_name, list(layout.results), npt.NDArray[np.float64])
        return LiveReadings(signals)


@dataclass(frozen=True)
class _Dataset:
    """One dataset of a series file as the descriptor declares it."""

    data_key: str
    path: str  # in the file
    shape: tuple[int, ...]
    dtype_numpy: str
    chunk_shape: tuple[int, ...]

    def datakey(self, source: str) -> DataKey:
        return DataKey(source=source, shape=list(self.shape), dtype="array" if self.shape else "number",
                       dtype_numpy=self.dtype_numpy, external="STREAM:")


class SeriesFileError(RuntimeError):
    """A series file does not hold what the detector described (or cannot be read)."""


def _read_dataset(file: h5py.File, data_key: str, path: str) -> _Dataset:
    dataset = file.get(path)
    if not isinstance(dataset, h5py.Dataset):
        raise SeriesFileError(f"{file.filename} has no dataset {path}")
    return _Dataset(data_key, path, tuple(dataset.shape), dataset.dtype.str,
                    tuple(dataset.chunks) if dataset.chunks else tuple(dataset.shape))


class SeriesFilesProvider(StreamableDataProvider):
    """The files of the series acquired since the detector was prepared, as stream documents.

    The datasets are fixed when first described: the frames from the layout (verified against
    every file), the results from the first series file (their shapes and types are the live
    analyses', known once a series has been saved)."""

    def __init__(self, datakey_name: str, record: SeriesRecord, source: str, results_from_file: bool) -> None:
        self.collections_written_signal = record.done
        self._name = datakey_name
        self._record = record
        self._source = source
        self._results_from_file = results_from_file
        self._first = len(record.series)  # series before this provider are not its own
        self._emitted = 0
        self._datasets: list[_Dataset] | None = None

    async def make_datakeys(self, collections_per_event: int) -> dict[str, DataKey]:
        if collections_per_event != 1:
            raise ValueError(f"{self._name}: one event is one series; collections_per_event must be 1")
        datasets = await self._describe()
        return {dataset.data_key: dataset.datakey(self._source) for dataset in datasets}

    async def make_stream_docs(self, collections_written: int, collections_per_event: int
                               ) -> AsyncIterator[StreamAsset]:
        datasets = await self._describe()
        if not datasets:
            return
        written = collections_written // collections_per_event - self._first
        while self._emitted < written:
            series = self._record.series[self._first + self._emitted]
            if series.error or not series.path:
                raise SeriesFileError(f"{self._name}: series {series.series_id} has no file "
                                      f"({series.error or 'not saved'})")
            await asyncio.to_thread(_check_file, series.path, datasets)
            compose = ComposeStreamResource()
            path = PurePath(series.path)
            uri = f"{generate_directory_uri(path.parent)}{path.name}"
            bundles = [compose(mimetype=HDF5_MIMETYPE, uri=uri, data_key=dataset.data_key,
                               parameters={"dataset": dataset.path, "chunk_shape": dataset.chunk_shape})
                       for dataset in datasets]
            for bundle in bundles:
                yield "stream_resource", bundle.stream_resource_doc
            for bundle in bundles:
                yield "stream_datum", bundle.compose_stream_datum({"start": 0, "stop": 1})
            self._emitted += 1

    async def _describe(self) -> list[_Dataset]:
        if self._datasets is None:
            self._datasets = await self._datasets_of(self._record.require_layout())
        return self._datasets

    async def _datasets_of(self, layout: SeriesLayout) -> list[_Dataset]:
        datasets = []
        if layout.saves_frames:
            datasets.append(_Dataset(f"{self._name}-frames", FRAMES_DATASET, (layout.frames, *layout.frame_shape),
                                     layout.pixel_dtype, (1, *layout.frame_shape)))
        if layout.saved and self._results_from_file:
            saved = [series.path for series in self._record.series[self._first:] if series.path]
            if not saved:
                raise SeriesFileError(
                    f"{self._name}: the results' shapes and types are read from a series file, and none has "
                    f"been saved since the detector was prepared: describe it after its first acquisition "
                    f"(declare a fly scan's stream after complete()), or make the detector with "
                    f"results_from_file=False")
            wanted = [(f"{self._name}-{attribute}", results_dataset(analysis, attribute))
                      for attribute, analysis in layout.results.items()]
            datasets += await asyncio.to_thread(_read_datasets, saved[0], wanted)
        return datasets


def _read_datasets(path: str, wanted: list[tuple[str, str]]) -> list[_Dataset]:
    try:
        with h5py.File(path, "r") as file:
            return [_read_dataset(file, data_key, dataset) for data_key, dataset in wanted]
    except OSError as error:
        raise SeriesFileError(f"cannot read the series file {path}: {error}") from error


def _check_file(path: str, datasets: list[_Dataset]) -> None:
    """The file holds every described dataset with the described shape and type."""
    found = _read_datasets(path, [(dataset.data_key, dataset.path) for dataset in datasets])
    for described, actual in zip(datasets, found, strict=True):
        if (described.shape, described.dtype_numpy) != (actual.shape, actual.dtype_numpy):
            raise SeriesFileError(f"{path}: {described.path} is {actual.shape} {actual.dtype_numpy}, the detector "
                                  f"described {described.shape} {described.dtype_numpy} (were the device's settings "
                                  f"changed during the run?)")


class SeriesFileLogic(DetectorDataLogic):
    """The series files as stream resources (nothing when ``saving_mode`` is ``off``)."""

    def __init__(self, driver: DectrisLiveDriver, record: SeriesRecord, results_from_file: bool) -> None:
        self._driver = driver
        self._record = record
        self._results_from_file = results_from_file

    async def prepare_unbounded(self, datakey_name: str) -> StreamableDataProvider:
        source = get_full_attr_trl(self._driver.get_trl(), "last_saved_file")
        return SeriesFilesProvider(datakey_name, self._record, source, self._results_from_file)
