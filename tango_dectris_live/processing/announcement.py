"""What a merging device tells its receiver nodes of the next series (several nodes on one stream).

Only one node gets the DCU's series header (the DCU deals its messages round-robin), so every node
is told the series' geometry and encoding from the DCU's REST configuration, together with the
analyses (by registered name: no code travels) and their parameters. JSON, checked on arrival.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from tango_dectris_live.stream.messages import SeriesHeader

from .analyses import AnalysisParameters
from .series_control import StreamGeometry

ANNOUNCEMENT_VERSION = 1


class AnnouncementError(ValueError):
    """A series announcement that a node cannot take (the message says what is wrong)."""


@dataclass(frozen=True)
class SeriesAnnouncement:
    """The series a node prepares for: stream geometry, image count, what to compute."""

    geometry: StreamGeometry
    number_of_images: int
    analyses: tuple[str, ...]
    parameters: AnalysisParameters
    nav_shape: tuple[int, ...] | None
    trigger_mode: str = "ints"
    frame_time: float = 0.0

    def header(self, series: int) -> SeriesHeader:
        """The header the DCU would have sent for ``series`` (what a node without it goes by)."""
        return SeriesHeader(series_id=int(series), number_of_images=self.number_of_images,
                            shape=tuple(self.geometry.frame_shape), dtype=np.dtype(self.geometry.dtype))

    def to_json(self) -> str:
        p = self.parameters
        return json.dumps({
            "version": ANNOUNCEMENT_VERSION, "stream_version": self.geometry.version,
            "frame_shape": list(self.geometry.frame_shape), "dtype": self.geometry.dtype,
            "number_of_images": self.number_of_images, "analyses": list(self.analyses),
            "nav_shape": list(self.nav_shape) if self.nav_shape is not None else None,
            "beam_centre": list(p.beam_centre) if p.beam_centre is not None else None,
            "bf_radius": p.bf_radius, "adf_inner_radius": p.adf_inner_radius, "adf_outer_radius": p.adf_outer_radius,
            "trigger_mode": self.trigger_mode, "frame_time": self.frame_time})

    @classmethod
    def from_json(cls, text: str) -> SeriesAnnouncement:
        try:
            data: dict[str, Any] = json.loads(text)
            if data.get("version") != ANNOUNCEMENT_VERSION:
                raise AnnouncementError(f"series announcement version {data.get('version')!r}; this node "
                                        f"understands {ANNOUNCEMENT_VERSION}")
            shape = tuple(int(n) for n in data["frame_shape"])
            dtype = str(np.dtype(data["dtype"]))
            images = int(data["number_of_images"])
            if len(shape) != 2 or min(shape) < 1 or images < 1 or np.dtype(dtype).kind != "u":
                raise AnnouncementError(f"series announcement of {images} frames {shape} {dtype}: not a detector "
                                        f"series")
            nav = data.get("nav_shape")
            centre = data.get("beam_centre")
            parameters = AnalysisParameters(
                beam_centre=(float(centre[0]), float(centre[1])) if centre is not None else None,
                bf_radius=float(data["bf_radius"]), adf_inner_radius=float(data["adf_inner_radius"]),
                adf_outer_radius=float(data["adf_outer_radius"]))
            frame_time = float(data.get("frame_time", 0.0))
            return cls(geometry=StreamGeometry(int(data["stream_version"]), shape, dtype), number_of_images=images,
                       analyses=tuple(str(name) for name in data["analyses"]), parameters=parameters,
                       nav_shape=tuple(int(n) for n in nav) if nav else None,
                       trigger_mode=str(data.get("trigger_mode", "ints")),
                       frame_time=frame_time if math.isfinite(frame_time) else 0.0)
        except AnnouncementError:
            raise
        except (KeyError, TypeError, ValueError, IndexError) as error:
            raise AnnouncementError(f"malformed series announcement: {type(error).__name__}: {error}") from error
