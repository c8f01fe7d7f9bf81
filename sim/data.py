"""Synthetic 4D-STEM data with exact ground truth.

Every scan position shows a bright-field disk plus an annular halo with Poisson noise. The disk
moves and dims with a scalar *object field* ``s(y, x)`` in [0, 1) over the scan, so both a
centre-of-mass image and a virtual bright-field image show the object (a ramp along x with a
round feature in the middle of the scan).

Generating a fresh noisy frame per scan position would make a large scan slow, so the generator
keeps a *pool* of ``pool_size`` distinct frames. Pool frame ``p`` is rendered for the object value
``(p + 0.5) / pool_size`` with its own noise (seeded by ``(seed, p)``), and scan position ``k`` maps
to pool frame ``floor(s(y, x) * pool_size)`` where ``(y, x) = divmod(k, nav_w)``. Frame numbers
beyond the scan wrap around (``k % (nav_h * nav_w)``). ``frame(k)`` therefore always returns exactly
what a sender built from the same generator sent for frame ``k``.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np

#: Pool frames are cached while the cache stays under this size; beyond it they are re-rendered
#: (deterministically) on demand, so a 16M detector does not need gigabytes.
CACHE_LIMIT_BYTES = 512 * 1024 * 1024
NUM_MASKED_PIXELS = 7
#: The ground truth keeps the pool frame of every scan position (8 bytes each): at most this many
#: positions (8192 x 8192, 512 MiB). A longer series wraps around a scan of this size or less.
MAX_SCAN_POSITIONS = 1 << 26
#: Scan positions whose pool index is computed at once (bounds the temporaries to a few MiB).
_INDEX_CHUNK = 1 << 20


class ScanTooLarge(ValueError):
    """A scan whose ground truth (one pool index per position) would not fit the simulator."""


def check_scan_size(nav_shape: tuple[int, int] | list[int], origin: str = "") -> None:
    """Raise :class:`ScanTooLarge` when ``nav_shape`` has more than MAX_SCAN_POSITIONS positions;
    ``origin`` says where the shape came from (for the message)."""
    nav_h, nav_w = (int(n) for n in nav_shape)
    positions = nav_h * nav_w
    if positions > MAX_SCAN_POSITIONS:
        where = f"nav_shape [{nav_h}, {nav_w}]" + (f" ({origin})" if origin else "")
        raise ScanTooLarge(
            f"{where} has {positions} scan positions; the simulator's ground truth holds at most "
            f"{MAX_SCAN_POSITIONS} (8 bytes each, {MAX_SCAN_POSITIONS * 8 >> 20} MiB; e.g. [8192, 8192]): "
            f'set the simulator\'s nav_shape to a smaller scan (PUT /sim/api/config {{"nav_shape": [h, w]}}); '
            f"frames beyond it wrap around")


class ScanDataGenerator:
    """Deterministic synthetic frames for a ``nav_shape`` scan on a ``width`` × ``height`` detector."""

    def __init__(self, width: int, height: int, dtype: np.dtype | str = "uint16",
                 nav_shape: tuple[int, int] = (16, 16), seed: int = 0, dose: float = 20.0,
                 pool_size: int = 64, disk_radius: float | None = None,
                 max_shift: float | None = None, mask_to_zero: bool = False) -> None:
        if width < 4 or height < 4:
            raise ValueError(f"detector must be at least 4x4 pixels, got {width}x{height}")
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.dtype("uint8"), np.dtype("uint16"), np.dtype("uint32")):
            raise ValueError(f"frames must be uint8, uint16 or uint32, not {self.dtype}")
        nav_h, nav_w = (int(n) for n in nav_shape)
        if nav_h < 1 or nav_w < 1:
            raise ValueError(f"nav_shape must be two positive integers, not {list(nav_shape)}")
        if pool_size < 1:
            raise ValueError(f"pool_size must be at least 1, not {pool_size}")
        check_scan_size((nav_h, nav_w))
        if not dose > 0:
            raise ValueError(f"dose (mean counts per bright-field pixel) must be > 0, not {dose}")
        self.width, self.height = int(width), int(height)
        self.nav_shape = (nav_h, nav_w)
        self.seed = int(seed)
        self.dose = float(dose)
        self.pool_size = int(pool_size)
        self.disk_radius = float(disk_radius) if disk_radius else min(width, height) / 8.0
        self.max_shift = float(max_shift) if max_shift is not None else self.disk_radius / 2.0
        self.mask_to_zero = bool(mask_to_zero)
        self.mask_value = 0 if mask_to_zero else int(np.iinfo(self.dtype).max)
        self.masked_pixels = self._pick_masked_pixels()
        self._pool_index = self._object_pool_index()
        self._cache: dict[int, np.ndarray] = {}
        self._cache_enabled = self.pool_size * self.frame_nbytes <= CACHE_LIMIT_BYTES

    @property
    def frame_nbytes(self) -> int:
        return self.width * self.height * self.dtype.itemsize

    @property
    def scan_size(self) -> int:
        return self.nav_shape[0] * self.nav_shape[1]

    # -- the scan ---------------------------------------------------------------------------

    def object_field(self) -> np.ndarray:
        """``s(y, x)`` in [0, 1): a ramp along x plus a round feature in the scan centre."""
        return self._object_field_at(0, self.scan_size).reshape(self.nav_shape)

    def _object_field_at(self, start: int, stop: int) -> np.ndarray:
        """``s`` of the scan positions ``start .. stop-1`` (row-major), flat."""
        nav_h, nav_w = self.nav_shape
        y, x = np.divmod(np.arange(start, stop, dtype=np.int64), nav_w)
        v = (y + 0.5) / nav_h
        u = (x + 0.5) / nav_w
        feature = np.exp(-((u - 0.5) ** 2 + (v - 0.5) ** 2) / (2 * 0.15 ** 2))
        field = 0.45 * u + 0.5 * feature
        return np.clip(field, 0.0, np.nextafter(1.0, 0.0))

    def _object_pool_index(self) -> np.ndarray:
        # in chunks: a large scan needs its 8 bytes per position, not five float temporaries
        index = np.empty(self.scan_size, dtype=np.int64)
        for start in range(0, self.scan_size, _INDEX_CHUNK):
            stop = min(start + _INDEX_CHUNK, self.scan_size)
            index[start:stop] = (self._object_field_at(start, stop) * self.pool_size).astype(np.int64)
        return index

    def pool_indices_shown(self, frames: int) -> np.ndarray:
        """The pool frames shown by frames ``0 .. frames-1`` (sorted, each once)."""
        shown = self._pool_index[:max(0, min(int(frames), self.scan_size))]
        return np.nonzero(np.bincount(shown, minlength=self.pool_size))[0]

    def pool_index(self, frame_number: int | np.ndarray) -> int | np.ndarray:
        """The pool frame shown at frame number(s) ``frame_number`` (documented in the module)."""
        if isinstance(frame_number, np.ndarray):
            return self._pool_index[frame_number % self.scan_size]
        return int(self._pool_index[int(frame_number) % self.scan_size])

    def disk_centre(self, pool_index: int) -> tuple[float, float]:
        """(cy, cx) of the bright-field disk in pool frame ``pool_index``."""
        s = (pool_index + 0.5) / self.pool_size
        shift = self.max_shift * (2.0 * s - 1.0)
        return self.height / 2.0 + 0.5 * shift, self.width / 2.0 + shift

    def disk_intensity(self, pool_index: int) -> float:
        """Mean counts per bright-field pixel: the object absorbs up to half of the dose."""
        s = (pool_index + 0.5) / self.pool_size
        return self.dose * (1.0 - 0.5 * s)

    # -- frames -----------------------------------------------------------------------------

    def _pick_masked_pixels(self) -> np.ndarray:
        rng = np.random.default_rng([self.seed, 0x6D61736B])
        flat = rng.choice(self.width * self.height, size=min(NUM_MASKED_PIXELS, self.width * self.height),
                          replace=False)
        return np.stack(np.unravel_index(np.sort(flat), (self.height, self.width)), axis=1)

    def pixel_mask(self) -> np.ndarray:
        """The detector's pixel mask, (height, width) uint32: bit 1 (dead) at the masked pixels."""
        mask = np.zeros((self.height, self.width), dtype=np.uint32)
        mask[self.masked_pixels[:, 0], self.masked_pixels[:, 1]] = 2
        return mask

    def flatfield(self) -> np.ndarray:
        return np.ones((self.height, self.width), dtype=np.float32)

    def _render(self, pool_index: int) -> np.ndarray:
        cy, cx = self.disk_centre(pool_index)
        yy = np.arange(self.height, dtype=np.float32)[:, None] - np.float32(cy)
        xx = np.arange(self.width, dtype=np.float32)[None, :] - np.float32(cx)
        r = np.sqrt(yy * yy + xx * xx)
        radius = self.disk_radius
        lam = np.full(r.shape, 0.002 * self.dose, dtype=np.float32)
        lam[(r >= 1.6 * radius) & (r < 2.4 * radius)] = 0.05 * self.dose
        lam[r < radius] = self.disk_intensity(pool_index)
        rng = np.random.default_rng([self.seed, pool_index])
        counts = rng.poisson(lam)
        top = int(np.iinfo(self.dtype).max)
        # The highest value is reserved for masked pixels, as on the detector.
        np.minimum(counts, top - 1, out=counts)
        frame = counts.astype(self.dtype)
        frame[self.masked_pixels[:, 0], self.masked_pixels[:, 1]] = self.mask_value
        frame.setflags(write=False)
        return frame

    def pool_frame(self, pool_index: int) -> np.ndarray:
        """Pool frame ``pool_index`` (read-only, (height, width))."""
        if not 0 <= pool_index < self.pool_size:
            raise IndexError(f"pool frame {pool_index} out of range 0..{self.pool_size - 1}")
        cached = self._cache.get(pool_index)
        if cached is not None:
            return cached
        frame = self._render(pool_index)
        if self._cache_enabled:
            self._cache[pool_index] = frame
        return frame

    def frame(self, frame_number: int) -> np.ndarray:
        """The uncompressed frame sent as frame number ``frame_number`` (read-only)."""
        if frame_number < 0:
            raise IndexError(f"frame numbers start at 0, got {frame_number}")
        return self.pool_frame(self.pool_index(frame_number))

    def high_threshold_frame(self, frame_number: int) -> np.ndarray:
        """The ``threshold_2`` channel: a quarter of the counts (a higher energy threshold sees
        fewer photons); masked pixels keep the mask value."""
        base = self.frame(frame_number)
        frame = (base >> 2).astype(self.dtype)
        frame[self.masked_pixels[:, 0], self.masked_pixels[:, 1]] = self.mask_value
        frame.setflags(write=False)
        return frame

    def sum_frames(self, frame_numbers: Iterable[int]) -> np.ndarray:
        """Sum (uint64) of the given frames, computed from pool counts: cheap for long scans."""
        counts = np.bincount(self.pool_index(np.asarray(list(frame_numbers), dtype=np.int64)),
                             minlength=self.pool_size)
        total = np.zeros((self.height, self.width), dtype=np.uint64)
        for p in np.nonzero(counts)[0]:
            total += self.pool_frame(int(p)).astype(np.uint64) * np.uint64(counts[p])
        return total

    def sum_per_frame(self, frame_numbers: Iterable[int]) -> np.ndarray:
        """Total counts of each frame (a virtual 'sum' detector), in the order given."""
        pool_sums = np.array([int(self.pool_frame(p).sum(dtype=np.uint64)) for p in range(self.pool_size)],
                             dtype=np.uint64)
        return pool_sums[self.pool_index(np.asarray(list(frame_numbers), dtype=np.int64))]


def default_nav_shape(total_frames: int) -> tuple[int, int]:
    """Square scan when ``total_frames`` is a perfect square, else one line of frames."""
    if total_frames < 1:
        return (1, 1)
    side = int(round(total_frames ** 0.5))
    if side * side == total_frames:
        return (side, side)
    return (1, total_frames)
