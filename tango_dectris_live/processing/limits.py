"""What this machine and this detector allow: every live-processing setting is checked here
before it is taken, with an error that names the limit.

A setting that passes these checks is one the pipeline can run with; one that does not would
have failed later and worse (a worker pool that cannot start for lack of file descriptors,
result buffers larger than the memory, masks outside the frame), often leaving the device
unusable until a restart.
"""
from __future__ import annotations

import math
import os
import resource
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import psutil

from tango_dectris_live.receiver import FrameStackLayout

# A Tango IMAGE attribute of the device is at most this many pixels on a side; a scan-shaped
# result is published as such an image (a line scan as one row).
MAX_IMAGE_SIDE = 16384
# File descriptors a worker process costs the device process (its task queue's pipe, the
# process sentinel, the results pipe share, with room to spare), and what the rest needs.
FDS_PER_WORKER = 8
FDS_RESERVED = 64
# More workers than this many per core only add context switches.
WORKERS_PER_CORE = 4
# Share of the available memory that scan-shaped results, or the frame stacks, may take.
MEMORY_SHARE = 0.5
# Copies of each scan-shaped result held at once: the merge buffer, a snapshot, the published
# image (float64 each).
RESULT_COPIES = 3
MIN_BYTES_PER_FRAME = 64
MAX_FRAME_STACK_SIZE = 65536
MAX_NUM_SLOTS = 1024


class SettingRefused(ValueError):
    """A live-processing setting outside what this machine or this detector allows; the message
    names the setting, the value and the limit."""


@dataclass(frozen=True)
class MachineLimits:
    """The resources the settings are checked against."""

    cores: int
    open_files_limit: int  # RLIMIT_NOFILE, soft
    open_files: int  # descriptors this process holds now
    available_memory: int  # bytes
    shared_memory_free: int  # bytes free in /dev/shm

    @classmethod
    def of_this_machine(cls) -> MachineLimits:
        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        try:
            shm = os.statvfs("/dev/shm")
            shm_free = shm.f_bavail * shm.f_frsize
        except OSError:
            shm_free = psutil.virtual_memory().available
        return cls(cores=os.cpu_count() or 1,
                   open_files_limit=soft if soft != resource.RLIM_INFINITY else 1 << 20,
                   open_files=psutil.Process().num_fds(),
                   available_memory=int(psutil.virtual_memory().available),
                   shared_memory_free=int(shm_free))


def _mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def check_whole_numbers(**values: int) -> None:
    """Tuning values: whole numbers >= 0, where 0 means automatic."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise SettingRefused(f"{name} must be a whole number >= 0 (0: automatic), got {value!r}")


def check_workers(workers: int, limits: MachineLimits) -> int:
    """``workers`` (0: automatic) against the cores and the file descriptors left."""
    check_whole_numbers(workers=workers)
    workers = int(workers)
    most = WORKERS_PER_CORE * limits.cores
    if workers > most:
        raise SettingRefused(f"workers = {workers} refused: at most {most} on this machine "
                             f"({WORKERS_PER_CORE} per core, {limits.cores} cores); 0 chooses for you")
    left = limits.open_files_limit - limits.open_files - FDS_RESERVED
    if workers * FDS_PER_WORKER > left:
        raise SettingRefused(
            f"workers = {workers} refused: {workers} worker processes need about "
            f"{workers * FDS_PER_WORKER} file descriptors, {max(0, left)} are left under this "
            f"process's limit of {limits.open_files_limit} (ulimit -n)")
    return workers


def check_nav_shape(nav_shape: Sequence[int] | None, result_buffers: int, limits: MachineLimits) -> tuple[int, ...] | None:
    """A scan shape (None or empty: from the detector) against the image size Tango publishes
    and the memory its scan-shaped results take (``result_buffers``: how many there are)."""
    if nav_shape is None or len(nav_shape) == 0:
        return None
    shape = tuple(int(n) for n in nav_shape)
    if len(shape) > 3 or min(shape) < 1:
        raise SettingRefused(f"nav_shape must be 1 to 3 positive sizes, e.g. [128, 128]; got {list(shape)}")
    rows = 1 if len(shape) == 1 else math.prod(shape[:-1])
    if shape[-1] > MAX_IMAGE_SIDE or rows > MAX_IMAGE_SIDE:
        raise SettingRefused(
            f"nav_shape {list(shape)} refused: scan-shaped results are published as images of at most "
            f"{MAX_IMAGE_SIDE} x {MAX_IMAGE_SIDE} positions (a line scan as one row), this one would be "
            f"{rows} x {shape[-1]}")
    positions = math.prod(shape)
    need = positions * (8 * RESULT_COPIES * max(1, result_buffers) + 2)
    allowed = MEMORY_SHARE * limits.available_memory
    if need > allowed:
        raise SettingRefused(
            f"nav_shape {list(shape)} refused: {positions:,} positions with {max(1, result_buffers)} "
            f"scan-shaped result(s) need about {_mib(need)}, more than half the memory available "
            f"now ({_mib(limits.available_memory)})")
    return shape


def check_radii(bf_radius: float, adf_inner_radius: float, adf_outer_radius: float,
                frame_shape: tuple[int, int] | None = None) -> None:
    """Radii are finite, >= 0, the annulus' inner below its outer, and (when the frame is known)
    no larger than the frame's diagonal."""
    radii = {"bf_radius": bf_radius, "adf_inner_radius": adf_inner_radius, "adf_outer_radius": adf_outer_radius}
    for name, value in radii.items():
        if not (isinstance(value, (int, float, np.floating, np.integer)) and math.isfinite(value) and value >= 0):
            raise SettingRefused(f"{name} must be a finite radius >= 0 pixels, got {value}")
    if adf_inner_radius >= adf_outer_radius:
        raise SettingRefused(f"adf_inner_radius ({adf_inner_radius:g}) must be smaller than "
                             f"adf_outer_radius ({adf_outer_radius:g})")
    if frame_shape is not None:
        diagonal = math.hypot(*frame_shape)
        for name, value in radii.items():
            if value > diagonal:
                raise SettingRefused(f"{name} = {value:g} px refused: larger than the frame's diagonal "
                                     f"({diagonal:.0f} px for {frame_shape[1]} x {frame_shape[0]} pixels)")


def check_beam_center(beam_center: Sequence[float] | None, frame_shape: tuple[int, int] | None = None) -> tuple[float, float] | None:
    """``[x, y]`` in pixels (empty or None: the detector's); finite, and inside the frame when
    the frame is known. Returns (x, y) or None."""
    if beam_center is None or len(beam_center) == 0:
        return None
    centre = [float(v) for v in beam_center]
    if len(centre) != 2 or not all(math.isfinite(v) for v in centre):
        raise SettingRefused(f"beam_center is [x, y] in pixels (or empty for the detector's); got {centre}")
    x, y = centre
    if frame_shape is not None:
        height, width = frame_shape
        if not (0 <= x <= width and 0 <= y <= height):
            raise SettingRefused(f"beam_center [{x:g}, {y:g}] refused: outside the frame "
                                 f"(x 0..{width}, y 0..{height} pixels)")
    return x, y


def check_tuning(num_slots: int, bytes_per_frame: int, frame_stack_size: int, frames_per_partition: int,
                 frame_shape: tuple[int, int] | None = None, dtype: str = "uint16",
                 limits: MachineLimits | None = None) -> None:
    """The frame-stack tuning (0: automatic) against its own bounds and, when the frame is known,
    against the frame's size and the shared memory."""
    check_whole_numbers(num_slots=num_slots, bytes_per_frame=bytes_per_frame, frame_stack_size=frame_stack_size,
                        frames_per_partition=frames_per_partition)
    if num_slots and not 2 <= num_slots <= MAX_NUM_SLOTS:
        raise SettingRefused(f"num_slots = {num_slots} refused: 2 to {MAX_NUM_SLOTS} (one slot fills while "
                             f"another is processed); 0 chooses for you")
    if bytes_per_frame and bytes_per_frame < MIN_BYTES_PER_FRAME:
        raise SettingRefused(f"bytes_per_frame = {bytes_per_frame} refused: at least {MIN_BYTES_PER_FRAME} "
                             f"bytes; 0 chooses a quarter of the uncompressed frame")
    if frame_stack_size > MAX_FRAME_STACK_SIZE:
        raise SettingRefused(f"frame_stack_size = {frame_stack_size} refused: at most {MAX_FRAME_STACK_SIZE}")
    if frame_shape is None:
        return
    raw = int(frame_shape[0]) * int(frame_shape[1]) * np.dtype(dtype).itemsize
    layout = FrameStackLayout.for_frames(frame_shape, dtype, num_slots=num_slots or None,
                                         frame_stack_size=frame_stack_size or None,
                                         bytes_per_frame=bytes_per_frame or None)
    if layout.frame_stack_size * layout.bytes_per_frame < raw:
        raise SettingRefused(
            f"frame_stack_size x bytes_per_frame = {layout.frame_stack_size} x {layout.bytes_per_frame} B "
            f"refused: a slot must hold at least one uncompressed frame ({raw:,} B for "
            f"{frame_shape[1]} x {frame_shape[0]} {np.dtype(dtype).name}); raise either, or set them to 0")
    if bytes_per_frame > 2 * raw + 4096:
        raise SettingRefused(f"bytes_per_frame = {bytes_per_frame:,} refused: more than twice the "
                             f"uncompressed frame ({raw:,} B)")
    if limits is not None:
        allowed = min(MEMORY_SHARE * limits.available_memory, limits.shared_memory_free)
        if layout.total_bytes > allowed:
            raise SettingRefused(
                f"frame stacks of {layout.num_slots} slots x {layout.frame_stack_size} frames x "
                f"{layout.bytes_per_frame:,} B = {_mib(layout.total_bytes)} refused: more than "
                f"{_mib(allowed)} (half the available memory, or what /dev/shm has free)")


MIN_EVENT_RATE, MAX_EVENT_RATE = 0.1, 100.0
MAX_SERIES_TIMEOUT = 86400.0


def check_event_rate(rate: float) -> float:
    """Result events per second while data arrives."""
    if not (isinstance(rate, (int, float, np.floating)) and math.isfinite(rate)
            and MIN_EVENT_RATE <= rate <= MAX_EVENT_RATE):
        raise SettingRefused(f"result_event_rate must be between {MIN_EVENT_RATE:g} and {MAX_EVENT_RATE:g} "
                             f"events per second, got {rate}")
    return float(rate)


def _check_seconds(name: str, seconds: float, maximum: float, zero_means: str) -> float:
    if not (isinstance(seconds, (int, float, np.floating)) and math.isfinite(seconds) and 0 <= seconds <= maximum):
        raise SettingRefused(f"{name} must be 0 ({zero_means}) or up to {maximum:g} seconds, got {seconds!r}")
    return float(seconds)


def check_series_timeout(seconds: float) -> float:
    """0 (automatic) or a bound in seconds on a series' silence."""
    return _check_seconds("series_timeout", seconds, MAX_SERIES_TIMEOUT, "automatic")


MAX_CONFIG_REUSE = 60.0


# SIMPLON's nimages is a uint32; more in one trigger is no scan anyone runs
MAX_IMAGES_PER_TRIGGER = 2**31 - 1
# trigger modes whose every trigger takes one image, its exposure the trigger's
ONE_IMAGE_PER_TRIGGER_MODES = ("inte", "exte")


def check_config_reuse(seconds: float) -> float:
    """0 (read the DCU's settings at every Start) or how long a value read may serve again."""
    return _check_seconds("config_reuse", seconds, MAX_CONFIG_REUSE, "read at every Start")


def check_images_per_trigger(images: int, nav_shape: tuple[int, ...] | None = None,
                             trigger_mode: str | None = None) -> int:
    """0 (automatic: ints/exts take the whole scan in one trigger, inte/exte one image per trigger)
    or the images each trigger takes; the scan must be a whole number of triggers."""
    images = int(images)
    if images < 0 or images > MAX_IMAGES_PER_TRIGGER:
        raise SettingRefused(f"images_per_trigger must be 0 (automatic) to {MAX_IMAGES_PER_TRIGGER}, got {images}")
    if images and trigger_mode in ONE_IMAGE_PER_TRIGGER_MODES and images != 1:
        raise SettingRefused(f"images_per_trigger {images}: in trigger mode {trigger_mode} each trigger takes one "
                             f"image (its exposure is the trigger's); set 0 or 1")
    if images and nav_shape:
        count = int(np.prod(nav_shape))
        if count % images:
            raise SettingRefused(f"images_per_trigger {images} does not divide the scan of {count} positions "
                                 f"(nav_shape {list(nav_shape)}) into whole triggers")
    return images


def check_choice(name: str, value: str, allowed: Sequence[str]) -> str:
    """A setting with a fixed set of values (stream transport, stream connection)."""
    if value not in allowed:
        raise SettingRefused(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
    return value
