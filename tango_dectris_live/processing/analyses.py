"""The analyses registry: analyses are chosen by registered NAME, each one a LiberTEM UDF.

Built in: ``sum``, ``sumsig``, ``bf``, ``adf``, ``com``, ``last_frame``. Facilities add their own
through the entry-point group :data:`ENTRY_POINT_GROUP`: the entry point's name is the analysis
name, its object a factory ``factory(parameters: AnalysisParameters) -> libertem.udf.UDF``; every
non-private result buffer ``b`` of that UDF becomes the result ``<name>_<b>``.
"""
from __future__ import annotations

import dataclasses
import functools
import warnings
from dataclasses import dataclass
from importlib import metadata
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
from libertem import masks
from libertem.udf.base import UDF

from .limits import SettingRefused, check_beam_center, check_radii
from .udfs import CompiledCoMUDF, CompiledMasksUDF, ExactSumSigUDF, ExactSumUDF, LastFrameUDF

ENTRY_POINT_GROUP = "tango_dectris_live.analyses"


class UnknownAnalysisError(ValueError):
    """A selection names analyses that are not registered."""

    def __init__(self, unknown: Sequence[str], available: Sequence[str]):
        self.unknown = tuple(unknown)
        self.available = tuple(available)
        super().__init__(
            f"unknown analysis name(s) {', '.join(map(repr, self.unknown))}; "
            f"available: {', '.join(self.available)}")


# Analysis parameters that cannot describe a detector region (negative radius, ...): the limits'
# own error, so that each rule has one definition (processing/limits.py).
InvalidAnalysisParameters = SettingRefused


class AnalysisFactoryError(RuntimeError):
    """A facility's analysis factory failed or did not return a LiberTEM UDF."""


@dataclass(frozen=True)
class AnalysisParameters:
    """Parameters shared by the analyses; radii and beam centre in detector pixels.

    ``beam_centre`` is (y, x); None means the centre of the frame. ``frame_shape`` is filled in
    by :meth:`resolved` once the series' frame shape is known.
    """

    beam_centre: tuple[float, float] | None = None
    bf_radius: float = 4.0
    adf_inner_radius: float = 6.0
    adf_outer_radius: float = 12.0
    frame_shape: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        # the rules that need no frame; against the frame they are checked before a series starts
        check_radii(self.bf_radius, self.adf_inner_radius, self.adf_outer_radius)
        if self.beam_centre is not None:
            check_beam_center((self.beam_centre[1], self.beam_centre[0]))

    def with_beam_center_xy(self, center_xy: tuple[float, float] | None) -> AnalysisParameters:
        """These parameters with the beam centre given as [x, y] (the detector's and the device's
        convention); the analyses work in (y, x), array order."""
        if center_xy is None:
            return dataclasses.replace(self, beam_centre=None)
        return dataclasses.replace(self, beam_centre=(float(center_xy[1]), float(center_xy[0])))

    def resolved(self, frame_shape: tuple[int, int]) -> AnalysisParameters:
        """These parameters for frames of ``frame_shape``: the beam centre defaults to the frame's centre."""
        height, width = (int(n) for n in frame_shape)
        centre = self.beam_centre if self.beam_centre is not None else (height / 2, width / 2)
        return dataclasses.replace(self, beam_centre=(float(centre[0]), float(centre[1])),
                                   frame_shape=(height, width))


ResultExtractor = Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]


@dataclass(frozen=True)
class Analysis:
    """A registered analysis: how to make its UDF and how to name its results."""

    name: str
    make_udf: Callable[[AnalysisParameters], UDF]
    # UDF result buffers (by the UDF's own names, nav buffers scan-shaped) -> published results
    extract_results: ResultExtractor


@dataclass(frozen=True)
class SelectedAnalysis:
    """One analysis of a run: its UDF instance (on the main process side) and result naming."""

    name: str
    udf: UDF
    extract_results: ResultExtractor


def _disk(parameters: AnalysisParameters) -> np.ndarray:
    height, width = parameters.frame_shape
    cy, cx = parameters.beam_centre
    return masks.circular(centerX=cx, centerY=cy, imageSizeX=width, imageSizeY=height,
                          radius=parameters.bf_radius).astype(np.float32)


def _ring(parameters: AnalysisParameters) -> np.ndarray:
    height, width = parameters.frame_shape
    cy, cx = parameters.beam_centre
    return masks.ring(centerX=cx, centerY=cy, imageSizeX=width, imageSizeY=height,
                      radius=parameters.adf_outer_radius,
                      radius_inner=parameters.adf_inner_radius).astype(np.float32)


def _single_mask_udf(mask_function: Callable[[AnalysisParameters], np.ndarray],
                     parameters: AnalysisParameters) -> UDF:
    # functools.partial (not a lambda): the UDF's parameters travel to the worker processes
    return CompiledMasksUDF(mask_factories=[functools.partial(mask_function, parameters)],
                            use_sparse=False, mask_count=1, mask_dtype=np.float32)


def _com_udf(parameters: AnalysisParameters) -> UDF:
    cy, cx = parameters.beam_centre
    return CompiledCoMUDF.with_params(cy=cy, cx=cx)


def _renamed(mapping: Mapping[str, str]) -> ResultExtractor:
    def extract(buffers: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {public: buffers[own] for own, public in mapping.items()}
    return extract


def _first_mask(public: str) -> ResultExtractor:
    def extract(buffers: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {public: buffers["intensity"][..., 0]}
    return extract


def _com_components(buffers: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    shifts = buffers["raw_shifts"]  # (..., 2): (dy, dx) relative to the beam centre
    return {"com_x_image": shifts[..., 1], "com_y_image": shifts[..., 0]}


def _prefixed(name: str) -> ResultExtractor:
    def extract(buffers: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {f"{name}_{buffer}": value for buffer, value in buffers.items()}
    return extract


BUILT_IN_ANALYSES: tuple[Analysis, ...] = (
    # LiberTEM's SumUDF/SumSigUDF would convert to float32 first: exact only up to 2**24 counts
    Analysis("sum", lambda p: ExactSumUDF(), _renamed({"intensity": "sum_image"})),
    Analysis("sumsig", lambda p: ExactSumSigUDF(), _renamed({"intensity": "sumsig_image"})),
    Analysis("bf", functools.partial(_single_mask_udf, _disk), _first_mask("bf_image")),
    Analysis("adf", functools.partial(_single_mask_udf, _ring), _first_mask("adf_image")),
    Analysis("com", _com_udf, _com_components),
    Analysis("last_frame", lambda p: LastFrameUDF(), _renamed({"frame": "last_frame"})),
)


def entry_point_factories() -> dict[str, Callable[[AnalysisParameters], UDF]]:
    """The analysis factories facilities registered under :data:`ENTRY_POINT_GROUP`, by name."""
    return {entry.name: entry.load() for entry in metadata.entry_points(group=ENTRY_POINT_GROUP)}


class AnalysisRegistry:
    """The analyses that can be selected by name: the built-in ones plus the entry points."""

    def __init__(self, analyses: Iterable[Analysis]):
        self._analyses: dict[str, Analysis] = {}
        for analysis in analyses:
            if analysis.name in self._analyses:
                raise ValueError(f"analysis {analysis.name!r} is registered twice")
            self._analyses[analysis.name] = analysis

    @classmethod
    def discover(cls) -> AnalysisRegistry:
        """Built-in analyses plus those installed under the entry-point group.

        A facility analysis may not reuse a built-in name (its results would be ambiguous)."""
        custom = []
        built_in = {a.name for a in BUILT_IN_ANALYSES}
        for name, factory in sorted(entry_point_factories().items()):
            if name in built_in:
                raise ValueError(f"entry point {name!r} in group {ENTRY_POINT_GROUP!r} "
                                 f"reuses a built-in analysis name; rename it")
            custom.append(Analysis(name, _checked_factory(name, factory), _prefixed(name)))
        return cls([*BUILT_IN_ANALYSES, *custom])

    def available(self) -> list[str]:
        """Names of every selectable analysis."""
        return list(self._analyses)

    def validate(self, names: Iterable[str]) -> list[str]:
        """The selection without duplicates, in order; unknown names -> :class:`UnknownAnalysisError`."""
        selection = list(dict.fromkeys(names))
        unknown = [n for n in selection if n not in self._analyses]
        if unknown:
            raise UnknownAnalysisError(unknown, self.available())
        if not selection:
            raise ValueError(f"select at least one analysis; available: {', '.join(self.available())}")
        return selection

    def result_names(self, name: str, frame_shape: tuple[int, int] = (16, 16)) -> list[str]:
        """The names of the results analysis ``name`` publishes (e.g. ``bf`` -> ``bf_image``).

        Found by running the analysis on a tiny blank scan with LiberTEM's inline executor: the
        only way that holds for any facility UDF (its results may be computed in get_results)."""
        from libertem.api import Context

        self.validate([name])
        selected = self.build([name], AnalysisParameters(), frame_shape)[0]
        context = Context.make_with("inline")
        try:
            dataset = context.load("memory", data=np.zeros((2, 2, *frame_shape), np.uint16), sig_dims=2)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # blank frames: divisions by zero are expected
                results = context.run_udf(dataset=dataset, udf=selected.udf)
        finally:
            context.close()
        return list(selected.extract_results({k: np.asarray(v.data) for k, v in results.items()}))

    def build(self, names: Iterable[str], parameters: AnalysisParameters,
              frame_shape: tuple[int, int]) -> list[SelectedAnalysis]:
        """Fresh UDF instances for the selected analyses, parametrised for ``frame_shape`` frames."""
        resolved = parameters.resolved(frame_shape)
        return [SelectedAnalysis(name, self._analyses[name].make_udf(resolved),
                                 self._analyses[name].extract_results)
                for name in self.validate(names)]


def _checked_factory(name: str, factory: Callable[[AnalysisParameters], UDF]) -> Callable[[AnalysisParameters], UDF]:
    def make_udf(parameters: AnalysisParameters) -> UDF:
        udf = factory(parameters)
        if not isinstance(udf, UDF):
            raise AnalysisFactoryError(f"analysis {name!r}: its factory returned {type(udf).__name__}, "
                                       f"not a LiberTEM UDF")
        return udf
    return make_udf
