"""Every use of LiberTEM's private API, in one place.

LiberTEM's public interface is the UDF (``get_result_buffers``, ``process_tile``, ``merge``,
``get_results``, ``meta``) and the ``Context`` that runs it over a whole DataSet. Live processing
runs UDFs over partitions that exist only once their frames have arrived, and merges the partial
results in the main process as they come: the steps LiberTEM's own ``UDFRunner`` takes, which
are not public and change between LiberTEM releases. Each function here is one such step, so that
a LiberTEM upgrade has one module to check; setup.cfg admits only the LiberTEM releases this was
tested with, and ``tests/test_libertem_internals.py`` has one test per function, run against the
installed LiberTEM, that names the internal which changed.

(The DataSet and Partition subclasses of ``live_dataset.py`` use LiberTEM's interface for data
formats, which LiberTEM's own formats and LiberTEM-live implement too; they are tested here
through :func:`run_udfs_on_partition`.)
"""
from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import libertem
import numpy as np
from libertem.common import Shape
from libertem.common.buffers import BufferWrapper
from libertem.common.executor import Environment
from libertem.io.dataset.base import DataSet, Partition, TilingScheme
from libertem.udf.base import MergeAttrMapping, UDF, UDFMeta, UDFParams, UDFPartRunner

LIBERTEM_VERSION: str = libertem.__version__

# CoMUDF's private result buffer: per frame, its sums under the three CoM masks (total, y-weighted,
# x-weighted), from which CoMUDF.get_results computes the centre of mass
COM_MASK_SUMS_BUFFER = "raw_mask_result"


def udf_constructor_kwargs(udf: UDF) -> dict[str, Any]:
    """The keyword arguments ``udf`` was made with: what re-creates it in a worker process
    (``UDF._kwargs``, which LiberTEM's UDFRunner sends to its workers)."""
    return udf._kwargs


def udf_input_dtype(udf: UDF, raw_dtype: np.dtype) -> np.dtype:
    """The pixel type ``udf`` gets its frames in: LiberTEM's rule (``libertem.udf.base._get_dtype``
    for one UDF, NumPy arrays, no corrections), so that a run with several UDFs can give each the
    type it would get alone (an exact sum is not degraded to float32 by a mask analysis)."""
    preferred = udf.get_preferred_input_dtype()
    return np.dtype(raw_dtype) if preferred is UDF.USE_NATIVE_DTYPE else np.result_type(preferred, raw_dtype)


def single_thread_environment() -> Environment:
    """The environment a worker process runs UDFs in: one thread for the numeric libraries
    (``libertem.common.executor.Environment``, entered with ``.enter()``)."""
    return Environment(threads_per_worker=1, threaded_executor=False)


def whole_frame_tiling(tile_depth: int, dataset_shape: Shape) -> TilingScheme:
    """Tiles of ``tile_depth`` whole frames of a dataset of ``dataset_shape`` (LiberTEM negotiates
    its tiling scheme with the UDFs when it runs them; here the runner chooses the depth itself)."""
    sig = dataset_shape.sig
    return TilingScheme.make_for_shape(tileshape=Shape((tile_depth, *sig), sig_dims=sig.dims),
                                       dataset_shape=dataset_shape)


def run_udfs_on_partition(udf_classes: Sequence[type[UDF]], udf_kwargs: Sequence[dict[str, Any]],
                          partition: Partition, tiling_scheme: TilingScheme,
                          env: Environment) -> list[dict[str, np.ndarray]]:
    """New instances of ``udf_classes`` (made with ``udf_kwargs``) run over ``partition`` by
    LiberTEM's ``UDFPartRunner``; per UDF, its partition-sized buffers that hold data, by name."""
    udfs = [cls.new_for_partition(kwargs, partition, None) for cls, kwargs in zip(udf_classes, udf_kwargs)]
    params = UDFParams(kwargs=list(udf_kwargs), roi=None, corrections=None, tiling_scheme=tiling_scheme)
    results = UDFPartRunner(udfs).run_for_partition(partition, params, env, None)
    return [{name: buf.raw_data for name, buf in result.items() if buf.has_data()} for result in results]


def allocate_full_results(udf: UDF, dataset: DataSet, input_dtype: np.dtype) -> None:
    """Give ``udf`` its result buffers for the whole of ``dataset`` (the main process' side,
    into which partial results are merged): LiberTEM's ``UDFMeta``, ``init_result_buffers`` and
    ``allocate_for_full``."""
    udf.set_meta(UDFMeta(partition_slice=None, dataset_shape=dataset.shape, roi=None,
                         dataset_dtype=dataset.dtype, input_dtype=input_dtype, corrections=None))
    udf.init_result_buffers()
    udf.allocate_for_full(dataset, None)


def merge_partial(udf: UDF, partition: Partition, buffers: dict[str, np.ndarray]) -> None:
    """Merge the partial result ``buffers`` (from :func:`run_udfs_on_partition`) of
    ``partition`` into ``udf``'s whole-dataset buffers with the UDF's own ``merge``, as LiberTEM's
    UDFRunner does (``set_views_for_partition``, ``results.get_proxy()``, ``MergeAttrMapping``)."""
    udf.set_views_for_partition(partition)
    try:
        udf.merge(dest=udf.results.get_proxy(), src=MergeAttrMapping(buffers))
    finally:
        udf.clear_views()


def full_buffers(udf: UDF) -> dict[str, tuple[str, np.ndarray]]:
    """``udf``'s whole-dataset buffers that hold data, by name: (kind, the raw array -- scan-shaped
    buffers flat over the scan), views, not copies (``BufferWrapper.raw_data``)."""
    udf.clear_views()
    return {name: (buf.kind, buf.raw_data) for name, buf in udf.results.items() if buf.has_data()}


def results_of(udf: UDF, valid_nav_mask: np.ndarray) -> Mapping[str, BufferWrapper]:
    """``udf``'s results from its merged buffers, as ``Context.run_udf`` returns them (by name,
    each with ``.data`` and ``.kind``); ``valid_nav_mask`` (flat, bool) marks the scan positions
    merged so far. LiberTEM's ``meta.set_valid_nav_mask`` and ``UDF._do_get_results``."""
    udf.meta.set_valid_nav_mask(valid_nav_mask)
    udf.clear_views()
    with warnings.catch_warnings():
        # LiberTEM 0.16's CoMUDF.get_results divides with where= and no out= under NumPy 2; it
        # overwrites the positions concerned right after, so the warning is noise
        warnings.filterwarnings("ignore", message="'where' used without 'out'")
        return udf._do_get_results()


def partition_frame_count(udf: UDF) -> int | None:
    """How many frames the partition ``udf`` works on holds; None for the main process'
    whole-dataset buffers (LiberTEM's ``meta.partition_shape`` raises ValueError there)."""
    try:
        return int(udf.meta.partition_shape.nav.size)
    except ValueError:
        return None


def dense_float32_masks(udf: UDF) -> np.ndarray | None:
    """The (masks, height, width) float32 masks of a LiberTEM mask UDF (ApplyMasksUDF, CoMUDF);
    None when they are sparse or of another type. From the UDF's task data: its
    ``ApplyMasksEngine``'s ``MaskContainer``."""
    container = udf.task_data.engine.masks
    if container.dtype != np.float32 or container.use_sparse:
        return None
    return np.asarray(container.computed_masks)
