"""Detector model presets: geometry, frame-rate table, energies and the key set each one exposes.

The frame-rate table is the single source of the timing figures: the minimum frame_time, the
image bit depth at a given frame_time and the sub-frame length of auto-summation are all derived
from it, so a model with other figures only needs another table.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from sim.parameters import READ_ONLY, Parameter, ParameterStore

# λ[Å] = HC_EV_ANGSTROM / E[eV]
HC_EV_ANGSTROM = 12398.4

MAX_EXPOSURE_S = 3600.0
# Since firmware 2022.1.2 a series may hold up to 2^48 images (SIMPLON.md §2.1).
MAX_IMAGES = 2 ** 48

# Kα1 energies (eV) for the `element` parameter.
K_ALPHA1_EV = MappingProxyType({
    "Ti": 4510.84, "Cr": 5414.72, "Fe": 6403.84, "Co": 6930.32, "Ni": 7478.15, "Cu": 8047.78,
    "Zn": 8638.86, "Ga": 9251.74, "Se": 11222.4, "Zr": 15775.1, "Mo": 17479.34, "Ag": 22162.92,
    "In": 24209.7,
})


@dataclass(frozen=True)
class FrameRateTable:
    """The highest frame rate (Hz) at which each image bit depth is available, for one readout
    geometry. Faster than the 32-bit rate, a frame is one sub-frame of the 16- (or 8-) bit
    counter; slower, auto-summation adds sub-frames into a 32-bit image."""

    max_rate_hz: Mapping[int, float]

    @property
    def min_frame_time(self) -> float:
        return 1.0 / max(self.max_rate_hz.values())

    @property
    def max_subframe_time(self) -> float:
        """Longest single exposure of the counter before auto-summation splits it."""
        return 1.0 / self.max_rate_hz[32] if 32 in self.max_rate_hz else math.inf

    def bit_depth(self, frame_time: float, auto_summation: bool) -> int:
        """Deepest bit depth the detector can deliver at this frame_time (no 32 bit without
        auto-summation, since then nothing is summed)."""
        rate = 1.0 / frame_time
        # relative tolerance: frame_time = 1/4500 must still count as 4500 Hz
        usable = [depth for depth, max_rate in self.max_rate_hz.items()
                  if max_rate * (1 + 1e-9) >= rate and (auto_summation or depth <= 16)]
        if not usable:
            return min(self.max_rate_hz)
        return max(usable)


@dataclass(frozen=True)
class Geometry:
    """Image size and timing of one readout configuration (full frame, ROI, binned)."""

    width: int
    height: int
    rates: FrameRateTable


@dataclass(frozen=True)
class DetectorModel:
    """A detector preset. `roi_geometries` maps each roi_mode value to its geometry; a height of
    0 there means "the roi_y_size parameter" (QUADRO lines ROI)."""

    name: str
    description: str
    detector_number: str
    full: Geometry
    roi_geometries: Mapping[str, Geometry]
    binned: Geometry | None = None  # ARINA: binning_mode 2x2 (or the older roi_mode merge2x2)
    pixel_size_m: float = 75e-6
    sensor_material: str = "Si"
    sensor_thickness_m: float = 450e-6
    # EIGER2-generation readout is continuous; the dead time between frames is ~100 ns
    readout_time_s: float = 1e-7
    bit_depth_readout: int = 16
    energy_range_ev: tuple[float, float] = (5000.0, 40000.0)
    default_energy_ev: float = 8047.78
    default_frame_time_s: float = 0.1
    max_count_rate_cps: float = 1e7
    number_of_excluded_pixels: int = 0
    extra_keys: tuple[str, ...] = field(default_factory=tuple)  # ARINA: binning_mode, pixel_format

    @property
    def roi_modes(self) -> list[str]:
        return ["disabled", *self.roi_geometries]

    def geometry(self, roi_mode: str, binning_mode: str = "disabled", roi_y_size: int = 0) -> Geometry:
        """The readout geometry for these settings."""
        if self.binned is not None and (binning_mode == "2x2" or roi_mode == "merge2x2"):
            return self.binned
        if roi_mode in self.roi_geometries:
            geometry = self.roi_geometries[roi_mode]
            if geometry.height == 0:
                return Geometry(geometry.width, roi_y_size, geometry.rates)
            return geometry
        return self.full


_QUADRO = DetectorModel(
    name="QUADRO",
    description="Dectris QUADRO Si 250K",
    detector_number="E-01-0250",
    # ~4.5 kHz at 16 bit full frame, faster with the lines ROI and 8 bit (SIMPLON.md §6; the
    # lines figures are estimates)
    full=Geometry(512, 512, FrameRateTable({32: 1000.0, 16: 4500.0})),
    roi_geometries={"lines": Geometry(512, 0, FrameRateTable({32: 1000.0, 16: 9000.0, 8: 18000.0}))},
    energy_range_ev=(30000.0, 300000.0),
    default_energy_ev=200000.0,
    default_frame_time_s=0.001,
    extra_keys=("roi_y_size",),
)

_ARINA = DetectorModel(
    name="ARINA",
    description="Dectris ARINA Si 36K",
    detector_number="E-01-0036",
    # 120 kHz binned 2x2 at 96x96 is the quoted figure; 30 kHz unbinned is our estimate (four
    # times the pixels per frame through the same readout), not from a data sheet.
    full=Geometry(192, 192, FrameRateTable({32: 1000.0, 16: 15000.0, 8: 30000.0})),
    roi_geometries={"merge2x2": Geometry(96, 96, FrameRateTable({32: 1000.0, 16: 60000.0, 8: 120000.0}))},
    binned=Geometry(96, 96, FrameRateTable({32: 1000.0, 16: 60000.0, 8: 120000.0})),
    energy_range_ev=(30000.0, 300000.0),
    default_energy_ev=200000.0,
    default_frame_time_s=0.001,
    extra_keys=("binning_mode", "pixel_format"),
)

# ADEiger's documentation: long exposures 32 bit, above ~2200 fps 8 bit, otherwise 16 bit
_EIGER2_MODULE_RATES = FrameRateTable({32: 500.0, 16: 2200.0, 8: 2250.0})

_EIGER2_500K = DetectorModel(
    name="EIGER2_500K",
    description="Dectris EIGER2 Si 500K",
    detector_number="E-01-0500",
    full=Geometry(1028, 512, _EIGER2_MODULE_RATES),
    roi_geometries={},
    default_frame_time_s=0.01,
)

_EIGER2_1M = DetectorModel(
    name="EIGER2_1M",
    description="Dectris EIGER2 Si 1M",
    detector_number="E-08-0107",
    # Two 500K modules stacked (1028 x 1062 with the gap rows, SIMPLON.md §6); the rates are the
    # 500K's, as both read out a module at a time [UNVERIFIED against a data sheet]
    full=Geometry(1028, 1062, _EIGER2_MODULE_RATES),
    roi_geometries={},
    default_frame_time_s=0.01,
)

_EIGER2_16M = DetectorModel(
    name="EIGER2_16M",
    description="Dectris EIGER2 Si 16M",
    detector_number="E-32-0117",
    full=Geometry(4148, 4362, FrameRateTable({32: 50.0, 16: 133.0})),
    roi_geometries={"4M": Geometry(2068, 2162, FrameRateTable({32: 50.0, 16: 560.0}))},
    number_of_excluded_pixels=1_240_000,
)

MODELS: Mapping[str, DetectorModel] = MappingProxyType(
    {model.name: model for model in (_QUADRO, _ARINA, _EIGER2_500K, _EIGER2_1M, _EIGER2_16M)})


def model_by_name(name: str) -> DetectorModel:
    """The preset called ``name`` (QUADRO, ARINA, EIGER2_500K, EIGER2_1M, EIGER2_16M)."""
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown detector model {name!r}; choose one of {', '.join(MODELS)}") from None


def _float(key: str, value: float, unit: str, low: float | None = None, high: float | None = None,
           access: str = "rw", listed: bool = True) -> Parameter:
    return Parameter(key, float(value), "float", access, unit, low, high, listed=listed)


def _flag(key: str, value: bool) -> Parameter:
    return Parameter(key, value, "bool")


def _choice(key: str, value: str, allowed: list[str]) -> Parameter:
    return Parameter(key, value, "string", allowed_values=allowed)


def _uint(key: str, value: int, low: int | None = None, high: int | None = None,
          access: str = "rw", unit: str | None = None) -> Parameter:
    return Parameter(key, value, "uint", access, unit, low, high)


def _text(key: str, value: str, access: str = READ_ONLY) -> Parameter:
    return Parameter(key, value, "string", access)


def detector_config(model: DetectorModel, firmware: str = "release-2023.1.0") -> ParameterStore:
    """The detector config parameters of ``model`` at their power-on values. Derived values
    (bit depth, frame_count_time, ...) are filled in by the detector's timing rules."""
    geometry = model.full
    frame_time = max(model.default_frame_time_s, geometry.rates.min_frame_time)
    readout = model.readout_time_s
    e_min, e_max = model.energy_range_ev
    energy = model.default_energy_ev
    elements = ["", *(name for name, ev in K_ALPHA1_EV.items() if e_min <= ev <= e_max)]
    thresholds = (0.5 * e_min, 1.4 * e_max)
    parameters = [
        _flag("auto_summation", True),
        _float("beam_center_x", geometry.width / 2, "pixel"),
        _float("beam_center_y", geometry.height / 2, "pixel"),
        _uint("bit_depth_image", 16, access=READ_ONLY),
        _uint("bit_depth_readout", model.bit_depth_readout, access=READ_ONLY),
        _choice("compression", "bslz4", ["lz4", "bslz4", "none"]),
        _float("count_time", frame_time - readout, "s", geometry.rates.min_frame_time - readout,
               MAX_EXPOSURE_S),
        _flag("countrate_correction_applied", True),
        _uint("countrate_correction_count_cutoff", 0, access=READ_ONLY, unit="counts"),
        _text("data_collection_date", ""),
        _text("description", model.description),
        _float("detector_distance", 0.1, "m", 0.0),
        _text("detector_number", model.detector_number),
        _float("detector_readout_time", readout, "s", access=READ_ONLY),
        _text("eiger_fw_version", firmware),
        _choice("element", "", elements),
        _flag("flatfield_correction_applied", True),
        _float("frame_count_time", frame_time - readout, "s", access=READ_ONLY),
        _float("frame_time", frame_time, "s", geometry.rates.min_frame_time, MAX_EXPOSURE_S + readout),
        _float("incident_energy", energy, "eV", e_min, e_max),
        _flag("mask_to_zero", False),
        _uint("nimages", 1, 1, MAX_IMAGES),
        _uint("ntrigger", 1, 1, MAX_IMAGES),
        _uint("number_of_excluded_pixels", model.number_of_excluded_pixels, access=READ_ONLY),
        _float("photon_energy", energy, "eV", e_min, e_max),
        _flag("pixel_mask_applied", True),
        _choice("roi_mode", "disabled", model.roi_modes),
        _text("sensor_material", model.sensor_material),
        _float("sensor_thickness", model.sensor_thickness_m, "m", access=READ_ONLY),
        _text("software_version", "1.8.0"),
        _float("threshold_energy", 0.5 * energy, "eV", *thresholds),
        _float("threshold/1/energy", 0.5 * energy, "eV", *thresholds),
        _choice("threshold/1/mode", "enabled", ["enabled", "disabled"]),
        _float("threshold/2/energy", 1.4 * energy, "eV", *thresholds),
        _choice("threshold/2/mode", "disabled", ["enabled", "disabled"]),
        _choice("threshold/difference/mode", "disabled", ["enabled", "disabled"]),
        _choice("trigger_mode", "ints", ["ints", "inte", "exts", "exte"]),
        _float("trigger_start_delay", 0.0, "s", 0.0, MAX_EXPOSURE_S),
        _flag("virtual_pixel_correction_applied", True),
        _float("wavelength", HC_EV_ANGSTROM / energy, "angstrom", HC_EV_ANGSTROM / e_max,
               HC_EV_ANGSTROM / e_min, listed=False),
        _float("x_pixel_size", model.pixel_size_m, "m", access=READ_ONLY),
        _float("y_pixel_size", model.pixel_size_m, "m", access=READ_ONLY),
        _uint("x_pixels_in_detector", geometry.width, access=READ_ONLY, unit="pixel"),
        _uint("y_pixels_in_detector", geometry.height, access=READ_ONLY, unit="pixel"),
    ]
    if "binning_mode" in model.extra_keys:
        parameters.append(_choice("binning_mode", "disabled", ["disabled", "2x2"]))
    if "pixel_format" in model.extra_keys:
        # [UNVERIFIED] value set: "auto" follows bit_depth_image, the others force the image type
        parameters.append(_choice("pixel_format", "auto", ["auto", "uint8", "uint16", "uint32"]))
    if "roi_y_size" in model.extra_keys:
        # total height of the lines ROI (even, firmware >= 2022.1)
        parameters.append(_uint("roi_y_size", geometry.height // 2, 4, geometry.height, unit="pixel"))
    return ParameterStore(parameters)


def _status(key: str, value: object, value_type: str, unit: str | None = None, *,
            listed: bool = True, limits: tuple[float | None, float | None] | None = None,
            critical: list[object] | None = None, allowed: list[object] | None = None) -> Parameter:
    return Parameter(key, value, value_type, READ_ONLY, unit, allowed_values=allowed, listed=listed,
                     critical_limits=limits, critical_values=critical)


DETECTOR_STATES = ["na", "initialize", "configure", "ready", "acquire", "idle", "test", "error"]


def detector_status() -> ParameterStore:
    """Detector status at power-on (state `na`)."""
    return ParameterStore([
        _status("state", "na", "string", "", critical=["na", "error"], allowed=DETECTOR_STATES),
        _status("error", [], "list", listed=False),
        _status("time", "", "string"),
        _status("temperature", 24.5, "float", "degC", limits=(10.0, 40.0)),
        _status("humidity", 4.8, "float", "%", limits=(0.0, 20.0)),
        _status("high_voltage/state", "READY", "string", critical=["NA", "OFF"],
                allowed=["NA", "OFF", "RAMPING", "READY"]),
        _status("series_unique_id", "", "string"),
    ])


def stream_config() -> ParameterStore:
    return ParameterStore([
        _choice("mode", "enabled", ["enabled", "disabled"]),
        _choice("format", "legacy", ["legacy", "cbor"]),
        _choice("header_detail", "basic", ["all", "basic", "none"]),
        _text("header_appendix", "", access="rw"),
        _text("image_appendix", "", access="rw"),
    ])


def stream_status() -> ParameterStore:
    return ParameterStore([
        _status("state", "ready", "string", critical=["error"],
                allowed=["disabled", "ready", "acquire", "error"]),
        _status("dropped", 0, "uint"),
        _status("error", [], "list", listed=False),
    ])


def filewriter_config() -> ParameterStore:
    return ParameterStore([
        _choice("mode", "disabled", ["enabled", "disabled"]),
        _flag("compression_enabled", True),
        _text("name_pattern", "series_$id", access="rw"),
        _uint("nimages_per_file", 1000, 0, 2 ** 32 - 1),
        _uint("image_nr_start", 1, 0, 2 ** 32 - 1),
        _choice("format", "hdf5 nexus legacy nxmx", ["hdf5 nexus legacy nxmx", "hdf5 nexus v2024.2 nxmx"]),
    ])


def filewriter_status() -> ParameterStore:
    return ParameterStore([
        _status("state", "disabled", "string", critical=["error"],
                allowed=["disabled", "ready", "acquire", "error"]),
        _status("buffer_free", 100, "uint", "%", limits=(10, None)),
        _status("files", [], "list"),
        _status("error", [], "list"),
    ])


def monitor_config() -> ParameterStore:
    return ParameterStore([
        _choice("mode", "disabled", ["enabled", "disabled"]),
        _uint("buffer_size", 100, 1, 10000),
        _flag("discard_new", True),
    ])


def monitor_status() -> ParameterStore:
    return ParameterStore([
        _status("state", "normal", "string", critical=["overflow"], allowed=["normal", "overflow"]),
        _status("buffer_free", 100, "uint"),
        _status("dropped", 0, "uint"),
        _status("error", [], "list"),
    ])


def system_status() -> ParameterStore:
    return ParameterStore([
        _status("time", "", "string"),
        _status("uptime", 0.0, "float", "s"),
    ])
