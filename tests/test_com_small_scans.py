"""The centre of mass of scans too small for a gradient: a single point (a step scan's point,
Sardana's ``ct``) or a line. LiberTEM's CoMUDF computes divergence and curl with np.gradient
along both scan axes, which NumPy refuses for fewer than 2 positions; ours gives NaN there and
the same centre of mass."""
from __future__ import annotations

import numpy as np
import pytest
from libertem.api import Context

from tango_dectris_live.processing.udfs import CompiledCoMUDF


@pytest.mark.parametrize("nav_shape", [(1, 1), (1, 5), (4, 1)])
def test_centre_of_mass_of_a_point_or_a_line(nav_shape):
    rng = np.random.default_rng(7)
    data = rng.integers(0, 1000, size=(*nav_shape, 16, 16), dtype=np.uint16)
    ctx = Context.make_with("inline")
    dataset = ctx.load("memory", data=data, sig_dims=2)
    result = ctx.run_udf(dataset=dataset, udf=CompiledCoMUDF.with_params(cy=7.5, cx=8.25, r=100.0))
    yy, xx = np.mgrid[0:16, 0:16]
    frames = data.reshape(-1, 16, 16).astype(np.float64)
    totals = frames.sum(axis=(1, 2))
    expected_y = (frames * yy).sum(axis=(1, 2)) / totals - 7.5
    expected_x = (frames * xx).sum(axis=(1, 2)) / totals - 8.25
    field = result["field"].data.reshape(-1, 2)
    np.testing.assert_allclose(field[:, 0], expected_y, rtol=1e-5)
    np.testing.assert_allclose(field[:, 1], expected_x, rtol=1e-5)
    assert np.isnan(result["divergence"].data).all() and np.isnan(result["curl"].data).all()
    np.testing.assert_allclose(result["magnitude"].data.ravel(), np.hypot(expected_y, expected_x), rtol=1e-5)


def test_a_scan_of_at_least_two_by_two_keeps_libertems_divergence():
    data = np.random.default_rng(3).integers(0, 1000, size=(3, 4, 16, 16), dtype=np.uint16)
    ctx = Context.make_with("inline")
    result = ctx.run_udf(dataset=ctx.load("memory", data=data, sig_dims=2),
                         udf=CompiledCoMUDF.with_params(cy=7.5, cx=8.25, r=100.0))
    assert np.isfinite(result["divergence"].data).all() and result["divergence"].data.shape == (3, 4)
