"""Offline NumPy results of the built-in analyses, computed from the simulator's ground truth.

What the ``DectrisLive`` device publishes is compared with these. They are written from the
definitions (a disk / ring of detector pixels around the beam centre, the intensity-weighted mean
pixel position minus the beam centre), not with LiberTEM, so that a wrong mask, a transposed scan
or a swapped axis in the product shows up as a difference.
"""
from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import numpy as np

from sim.data import ScanDataGenerator
from sim.encode import dtype_for_bit_depth
from sim.server import SimulatorServer

#: Results that have one value per scan position (NaN where a frame is missing).
SCAN_SHAPED_RESULTS = ("sumsig_image", "bf_image", "adf_image", "com_x_image", "com_y_image")
#: Result attributes of each built-in analysis.
RESULTS_OF_ANALYSIS = {
    "sum": ("sum_image",),
    "sumsig": ("sumsig_image",),
    "bf": ("bf_image",),
    "adf": ("adf_image",),
    "com": ("com_x_image", "com_y_image"),
    "last_frame": ("last_frame",),
}


@dataclass(frozen=True)
class VirtualDetectors:
    """The bf/adf/com settings of the device, in detector pixels; the beam centre as [x, y] like
    the device's ``beam_center`` attribute."""

    beam_center_xy: tuple[float, float]
    bf_radius: float
    adf_inner_radius: float
    adf_outer_radius: float

    def _squared_distance(self, frame_shape: tuple[int, int]) -> np.ndarray:
        cx, cy = self.beam_center_xy
        yy, xx = np.ogrid[0:frame_shape[0], 0:frame_shape[1]]
        return (yy - cy) ** 2 + (xx - cx) ** 2

    def disk(self, frame_shape: tuple[int, int]) -> np.ndarray:
        """Pixels within ``bf_radius`` of the beam centre (the edge included)."""
        return self._squared_distance(frame_shape) <= self.bf_radius ** 2

    def ring(self, frame_shape: tuple[int, int]) -> np.ndarray:
        """Pixels farther than ``adf_inner_radius`` and at most ``adf_outer_radius`` from the centre."""
        d2 = self._squared_distance(frame_shape)
        return (d2 > self.adf_inner_radius ** 2) & (d2 <= self.adf_outer_radius ** 2)


def simulator_ground_truth(sim: SimulatorServer, nav_shape: tuple[int, int]) -> ScanDataGenerator:
    """The generator the simulator's stream used for a ``nav_shape`` scan with its current settings
    (the simulator's ``nav_shape`` setting must be ``nav_shape``)."""
    def config(key: str):
        return sim.detector.get_config("detector", key)["value"]

    settings = sim.sink.get_sim_config()
    return ScanDataGenerator(config("x_pixels_in_detector"), config("y_pixels_in_detector"),
                             dtype_for_bit_depth(config("bit_depth_image")), nav_shape=nav_shape,
                             seed=settings["seed"], dose=settings["dose"], pool_size=settings["pool_size"],
                             mask_to_zero=bool(config("mask_to_zero")))


def reference_results(truth: ScanDataGenerator, detectors: VirtualDetectors,
                      missing: Collection[int] = ()) -> dict[str, np.ndarray]:
    """Every built-in result for the scan of ``truth`` when the frames numbered in ``missing`` never
    arrived: their scan positions are NaN, the detector-shaped sum leaves them out and
    ``last_frame`` is the last frame that did arrive."""
    frame_shape = (truth.height, truth.width)
    disk = detectors.disk(frame_shape)
    ring = detectors.ring(frame_shape)
    yy, xx = np.mgrid[0:frame_shape[0], 0:frame_shape[1]]
    cx, cy = detectors.beam_center_xy
    per_position = {name: np.full(truth.scan_size, np.nan) for name in SCAN_SHAPED_RESULTS}
    present = [k for k in range(truth.scan_size) if k not in set(missing)]
    for k in present:
        frame = truth.frame(k).astype(np.float64)
        total = frame.sum()
        per_position["sumsig_image"][k] = total
        per_position["bf_image"][k] = frame[disk].sum()
        per_position["adf_image"][k] = frame[ring].sum()
        per_position["com_y_image"][k] = (frame * yy).sum() / total - cy
        per_position["com_x_image"][k] = (frame * xx).sum() / total - cx
    results = {name: values.reshape(truth.nav_shape) for name, values in per_position.items()}
    results["sum_image"] = truth.sum_frames(present).astype(np.float64)
    results["last_frame"] = truth.frame(present[-1]).astype(np.float64)
    return results


def assert_equals_truth(name: str, value: np.ndarray, expected: np.ndarray) -> None:
    """A published result against its reference: the integer sums exactly, the mask and CoM
    results to LiberTEM's float32 precision."""
    value = np.asarray(value)
    assert value.shape == expected.shape, f"{name}: {value.shape} != {expected.shape}"
    if name in ("sum_image", "sumsig_image"):
        np.testing.assert_array_equal(value, expected, err_msg=name)  # exact integer sums
    else:
        np.testing.assert_allclose(value, expected, rtol=2e-5, err_msg=name)  # LiberTEM's float32 masks
