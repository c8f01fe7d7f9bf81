"""The analyses registry and scan-shape resolution (no worker processes)."""
from __future__ import annotations

import numpy as np
import pytest
from libertem.udf.com import CoMUDF
from libertem.udf.masks import ApplyMasksUDF

from tango_dectris_live.processing.udfs import ExactSumUDF
from tango_dectris_live.processing import analyses
from tango_dectris_live.processing.analyses import (AnalysisParameters, AnalysisRegistry,
                                                    InvalidAnalysisParameters, UnknownAnalysisError)
from tango_dectris_live.processing.live_dataset import ScanShapeError, resolve_scan_shape
from tests.processing_fakes import FrameMaxUDF, make_frame_max_udf

BUILT_IN = ["sum", "sumsig", "bf", "adf", "com", "last_frame"]


def test_built_in_analyses_are_listed():
    assert AnalysisRegistry.discover().available()[:6] == BUILT_IN


def test_unknown_names_are_refused_with_the_available_ones():
    registry = AnalysisRegistry.discover()
    with pytest.raises(UnknownAnalysisError) as caught:
        registry.validate(["sum", "dpc", "os.system"])
    assert caught.value.unknown == ("dpc", "os.system")
    assert set(BUILT_IN) <= set(caught.value.available)
    assert "'dpc'" in str(caught.value) and "sumsig" in str(caught.value)


def test_empty_selection_is_refused():
    with pytest.raises(ValueError, match="at least one"):
        AnalysisRegistry.discover().validate([])


def test_build_uses_libertem_udfs_with_the_parameters():
    built = AnalysisRegistry.discover().build(["sum", "bf", "com", "sum"], AnalysisParameters(bf_radius=3),
                                              (32, 32))
    assert [b.name for b in built] == ["sum", "bf", "com"]
    assert isinstance(built[0].udf, ExactSumUDF)
    assert isinstance(built[1].udf, ApplyMasksUDF)
    assert isinstance(built[2].udf, CoMUDF)
    assert built[2].udf.params.com_params.cy == 16.0


@pytest.mark.parametrize("kwargs", [dict(bf_radius=-1), dict(adf_inner_radius=10, adf_outer_radius=5),
                                    dict(beam_centre=(float("nan"), 3.0))])
def test_bad_parameters_are_refused(kwargs):
    with pytest.raises(InvalidAnalysisParameters):
        AnalysisParameters(**kwargs)


def test_entry_point_analysis_is_registered(monkeypatch):
    monkeypatch.setattr(analyses, "entry_point_factories", lambda: {"framemax": make_frame_max_udf})
    registry = AnalysisRegistry.discover()
    assert registry.available() == [*BUILT_IN, "framemax"]
    (built,) = registry.build(["framemax"], AnalysisParameters(), (8, 8))
    assert isinstance(built.udf, FrameMaxUDF)


def test_entry_point_may_not_shadow_a_built_in(monkeypatch):
    monkeypatch.setattr(analyses, "entry_point_factories", lambda: {"sum": make_frame_max_udf})
    with pytest.raises(ValueError, match="built-in"):
        AnalysisRegistry.discover()


def test_factory_must_return_a_udf(monkeypatch):
    monkeypatch.setattr(analyses, "entry_point_factories", lambda: {"broken": lambda p: "not a udf"})
    with pytest.raises(analyses.AnalysisFactoryError, match="broken"):
        AnalysisRegistry.discover().build(["broken"], AnalysisParameters(), (8, 8))


@pytest.mark.parametrize("count, nav_shape, expected", [
    (256, (16, 16), (16, 16)),
    (256, (8, 32), (8, 32)),
    (256, (10, 10), (16, 16)),  # does not fit: inferred square
    (256, None, (16, 16)),
    (250, None, (1, 250)),  # not a square: one line
    (None, (4, 4), (4, 4)),
])
def test_scan_shape(count, nav_shape, expected):
    assert resolve_scan_shape(count, nav_shape).shape == expected


def test_scan_shape_reports_a_mismatch():
    assert "does not hold" in resolve_scan_shape(256, (10, 10)).note


def test_scan_shape_needs_a_count_or_a_shape():
    with pytest.raises(ScanShapeError, match="nav_shape"):
        resolve_scan_shape(None, None)


def test_sums_are_exact_beyond_float32_precision():
    """float32 accumulation would round 2**24 + 1; the built-in sum and sumsig must not."""
    from libertem.api import Context

    frames = np.zeros((1, 3, 4, 4), np.uint32)
    frames[0, :, 0, 0] = [2**24, 1, 1]
    frames[0, 0, 1, 1] = 1
    ctx = Context.make_with("inline")
    dataset = ctx.load("memory", data=frames, sig_dims=2)
    built = AnalysisRegistry.discover().build(["sum", "sumsig"], AnalysisParameters(), (4, 4))
    results = ctx.run_udf(dataset=dataset, udf=[b.udf for b in built])
    assert results[0]["intensity"].data[0, 0] == 2**24 + 2
    assert list(results[1]["intensity"].data.ravel()) == [2**24 + 1, 1, 1]


def test_exact_accumulator_never_overflows():
    from tango_dectris_live.processing.udfs import exact_accumulator

    assert exact_accumulator(np.uint16, 512) == np.uint32
    assert exact_accumulator(np.uint16, 512 * 512) == np.uint64  # a 512x512 frame's total
    assert exact_accumulator(np.uint32, 2) == np.uint64
    assert exact_accumulator(np.int16, 4) == np.int32
    assert exact_accumulator(np.float32, 4) == np.float64
    worst = np.full((2, 65536), 65535, np.uint16)
    assert np.sum(worst, axis=1, dtype=exact_accumulator(np.uint16, 65536))[0] == 65535 * 65536
