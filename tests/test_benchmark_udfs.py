"""The LiberTEM-live side of the benchmarks runs LiberTEM's own UDFs, never our compiled ones:
a side-by-side ratio is only fair if the other side is what a LiberTEM-live user runs."""
from __future__ import annotations

import numpy as np

from benchmarks.bench_libertem_live import libertem_udfs
from tango_dectris_live.processing.analyses import AnalysisParameters, AnalysisRegistry


def test_libertem_live_depth_uses_libertems_classes_with_our_masks():
    analyses = ("sum", "sumsig", "bf", "adf", "com")
    theirs = [udf for udf, _ in libertem_udfs(analyses, (64, 64))]
    assert [type(u).__name__ for u in theirs] == ["SumUDF", "SumSigUDF", "ApplyMasksUDF", "ApplyMasksUDF", "CoMUDF"]
    assert all(type(u).__module__.startswith("libertem.") for u in theirs)
    ours = AnalysisRegistry.discover().build(list(analyses), AnalysisParameters(), (64, 64))
    for mine, other in zip(ours[2:4], theirs[2:4]):  # the same masks
        assert np.array_equal(mine.udf.params.mask_factories[0](), other.params.mask_factories[0]())
    assert theirs[4].params.com_params == ours[4].udf.params.com_params
