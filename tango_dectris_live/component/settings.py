"""The live-processing settings of a detector: one immutable value, checked as a whole.

Every change makes a new :class:`LiveSettings` through :meth:`LiveSettings.changed`, which checks
the rules the change touches (the rules themselves live in :mod:`tango_dectris_live.processing.limits`,
one definition each) and refuses with :class:`~tango_dectris_live.processing.limits.SettingRefused`
naming the limit.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from tango_dectris_live.processing.acquisition import AcquisitionRequest, PipelineSettings
from tango_dectris_live.processing.analyses import AnalysisParameters
from tango_dectris_live.processing.limits import (MachineLimits, SettingRefused, check_beam_center, check_choice,
                                                  check_event_rate, check_images_per_trigger, check_nav_shape, check_radii,
                                                  check_config_reuse, check_series_timeout, check_tuning,
                                                  check_workers)
from tango_dectris_live.processing.series_saving import SavingSettings, SeriesSaving
from tango_dectris_live.receiver import CONNECTIONS, TRANSPORTS
from tango_dectris_live.saving import DEFAULT_PATTERN, SavingError

TUNING = ("workers", "num_slots", "bytes_per_frame", "frame_stack_size", "frames_per_partition")
RADII = ("bf_radius", "adf_inner_radius", "adf_outer_radius")


@dataclass(frozen=True)
class LiveSettings:
    """What to compute and how. ``beam_center`` is [x, y] in pixels (the detector's convention),
    None: the detector's own beam centre; ``nav_shape`` None: from the detector (active) or
    inferred (passive); tuning 0: automatic."""

    analyses: tuple[str, ...] = ("sum", "sumsig")
    nav_shape: tuple[int, ...] | None = None
    beam_center: tuple[float, float] | None = None
    bf_radius: float = AnalysisParameters.bf_radius
    adf_inner_radius: float = AnalysisParameters.adf_inner_radius
    adf_outer_radius: float = AnalysisParameters.adf_outer_radius
    tuning: PipelineSettings = PipelineSettings()  # changed by its fields' names (TUNING)
    event_rate: float = 10.0
    series_timeout: float = 0.0
    config_reuse: float = 0.0
    images_per_trigger: int = 0
    saving_mode: str = "off"
    saving_directory: str = ""
    saving_name_pattern: str = DEFAULT_PATTERN
    transport: str = "auto"
    connection: str = "per_series"

    @property
    def radii(self) -> tuple[float, float, float]:
        return self.bf_radius, self.adf_inner_radius, self.adf_outer_radius

    def pipeline(self) -> PipelineSettings:
        return self.tuning

    def value(self, name: str) -> Any:
        """A setting by the name :meth:`changed` takes (a tuning one as well as the others)."""
        return getattr(self.tuning if name in TUNING else self, name)

    def analysis_parameters(self) -> AnalysisParameters:
        return AnalysisParameters(bf_radius=self.bf_radius, adf_inner_radius=self.adf_inner_radius,
                                  adf_outer_radius=self.adf_outer_radius).with_beam_center_xy(self.beam_center)

    def saving(self) -> SavingSettings:
        return SavingSettings(self.saving_mode, self.saving_directory, self.saving_name_pattern)

    def request(self) -> AcquisitionRequest:
        return AcquisitionRequest(self.analyses, self.analysis_parameters(), self.nav_shape, self.images_per_trigger)

    def changed(self, context: SettingsContext, **changes: Any) -> LiveSettings:
        """A new value with ``changes``, each rule they touch checked; unknown names are refused."""
        unknown = sorted(set(changes) - _NAMES)
        if unknown:
            raise SettingRefused(f"no live setting named {', '.join(unknown)}")
        normalised = _normalised(changes)
        tuning = {name: normalised.pop(name) for name in TUNING if name in normalised}
        if tuning:
            normalised["tuning"] = dataclasses.replace(self.tuning, **tuning)
        new = dataclasses.replace(self, **normalised)
        new.check(context, touched=set(changes))
        return new

    def check(self, context: SettingsContext, touched: set[str] | None = None) -> None:
        """Check the rules of the ``touched`` settings (all by default) against this machine and,
        when the context knows it, the detector's frame."""
        touched = set(_NAMES) if touched is None else touched
        machine = context.machine() if touched & {"workers", "nav_shape", "analyses", *TUNING} else None
        frame = context.frame_shape() if touched & {"beam_center", *RADII} else None
        if "analyses" in touched:
            context.check_analyses(self.analyses)
        if touched & {"nav_shape", "analyses"}:
            check_nav_shape(self.nav_shape, context.result_count(self.analyses), machine)
        if touched & set(RADII):
            try:
                check_radii(*self.radii, frame)
            except SettingRefused as refused:
                if "must be smaller than" not in str(refused):
                    raise
                raise SettingRefused(f"{refused}: to move the annulus outwards write adf_outer_radius first, "
                                     f"inwards adf_inner_radius first") from refused
        if "beam_center" in touched:
            check_beam_center(self.beam_center, frame)
        tuning = self.tuning
        if "workers" in touched:
            check_workers(tuning.workers, machine)
        if touched & set(TUNING):
            check_tuning(tuning.num_slots, tuning.bytes_per_frame, tuning.frame_stack_size,
                         tuning.frames_per_partition, limits=machine)
        if "event_rate" in touched:
            check_event_rate(self.event_rate)
        if "series_timeout" in touched:
            check_series_timeout(self.series_timeout)
        if "config_reuse" in touched:
            check_config_reuse(self.config_reuse)
        if touched & {"images_per_trigger", "nav_shape"}:
            check_images_per_trigger(self.images_per_trigger, self.nav_shape)
        if touched & {"saving_mode", "saving_directory", "saving_name_pattern"}:
            try:
                context.check_saving(self.saving())
            except SavingError as refused:
                raise SettingRefused(str(refused)) from refused
        if "transport" in touched:
            check_choice("StreamTransport", self.transport, TRANSPORTS)
        if "connection" in touched:
            check_choice("stream_connection", self.connection, CONNECTIONS)


_NAMES = frozenset({field.name for field in dataclasses.fields(LiveSettings)} - {"tuning"} | set(TUNING))


@dataclass(frozen=True)
class SettingsContext:
    """What the checks need from outside the settings: the analyses registry's answers, this
    machine's resources, the detector's frame (None when the DCU cannot tell now: then the
    frame rules are checked at Start)."""

    check_analyses: Callable[[tuple[str, ...]], None]
    result_count: Callable[[tuple[str, ...]], int]
    frame_shape: Callable[[], tuple[int, int] | None] = lambda: None
    check_saving: Callable[[SavingSettings], object] = SeriesSaving().check
    machine: Callable[[], MachineLimits] = MachineLimits.of_this_machine


def _normalised(changes: Mapping[str, Any]) -> dict[str, Any]:
    """Client values (lists, numpy scalars, empty for 'none') in the types LiveSettings holds."""
    out: dict[str, Any] = {}
    for name, value in changes.items():
        if name == "analyses":
            value = tuple(str(v) for v in value)
        elif name == "nav_shape":
            value = tuple(int(v) for v in value) if value is not None and len(value) else None
        elif name == "beam_center":
            value = tuple(float(v) for v in value) if value is not None and len(value) else None
        elif name in RADII or name in ("event_rate", "series_timeout", "config_reuse"):
            value = float(value)
        elif name in TUNING or name == "images_per_trigger":
            value = int(value)
        elif name in ("transport", "connection", "saving_mode", "saving_directory", "saving_name_pattern"):
            value = str(value)
        out[name] = value
    return out
