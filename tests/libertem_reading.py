"""Saved series read back by LiberTEM itself (its HDF5 dataset, its SumUDF and SumSigUDF): the
check that a user's offline LiberTEM analysis of a file gives what the device computed live."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from libertem.api import Context
from libertem.udf.sum import SumUDF
from libertem.udf.sumsigudf import SumSigUDF


def libertem_sums(path: str | Path, ds_path: str = "/entry/data/data") -> tuple[np.ndarray, np.ndarray]:
    """(sum over the scan, per-frame sum) of the frames in ``path`` at ``ds_path``, by LiberTEM."""
    context = Context.make_with("inline")
    try:
        dataset = context.load("hdf5", path=str(path), ds_path=ds_path)
        sums = context.run_udf(dataset=dataset, udf=[SumUDF(), SumSigUDF()])
    finally:
        context.close()
    return np.asarray(sums[0]["intensity"].data), np.asarray(sums[1]["intensity"].data)
