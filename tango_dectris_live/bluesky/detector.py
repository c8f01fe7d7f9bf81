"""``DectrisLiveDetector``: a DectrisLive device as an ophyd-async ``StandardDetector``.

One trigger (or one fly scan: prepare, kickoff, complete) is one ``Start`` of the device: one
active series of ``nav_shape`` frames, processed live, saved when its ``saving_mode`` says so.
One event holds one series: its scalars, its result images (read over Tango, or referenced in
its file) and, when saved with frames, the frames.
"""
from __future__ import annotations

from collections.abc import Sequence

from bluesky.protocols import Reading
from event_model import DataKey
from ophyd_async.core import SignalR, StandardDetector, merge_gathered_dicts

from .data import LiveReadingLogic, SeriesFileLogic
from .driver import DectrisLiveDriver
from .logic import LiveAcquireLogic, LiveTriggerLogic
from .series import SeriesRecord

#: recorded in every run's descriptor (read_configuration); the SIMPLON ones when the device has them
CONFIGURATION = ("nav_shape", "analyses", "beam_center", "bf_radius", "adf_inner_radius", "adf_outer_radius",
                 "saving_mode", "count_time", "frame_time")


class DectrisLiveDetector(StandardDetector):
    """A ``DectrisLive`` Tango device for Bluesky plans (``count``, ``scan``, fly scans).

    :param trl: the device, e.g. ``"tango://tango-host:10000/bl/det/arina"``
    :param name: the detector's name, the prefix of its data keys (``det-sum_image``, ...)
    :param analyses: when given, written to the device's ``analyses`` at every ``prepare``
    :param nav_shape: when given, written to the device's ``nav_shape`` at every ``prepare``
    :param results_from_file: when the device saves the series (``saving_mode`` ``results`` or
        ``results_and_frames``), take the result images from the file (StreamResource documents)
        rather than into the events; False keeps them in the events (for live plots) and only the
        frames come from the file
    """

    def __init__(self, trl: str, name: str = "", *, analyses: Sequence[str] | None = None,
                 nav_shape: Sequence[int] | None = None, results_from_file: bool = True) -> None:
        self.driver = DectrisLiveDriver(trl)
        record = SeriesRecord()
        #: series that ended since the detector was made (the data logics' collections written)
        self.series_done = record.done
        self.add_detector_logics(
            LiveTriggerLogic(self.driver, record, analyses=analyses, nav_shape=nav_shape),
            LiveAcquireLogic(self.driver, record),
            LiveReadingLogic(self.driver, record, results_from_file),
            SeriesFileLogic(self.driver, record, results_from_file),
        )
        super().__init__(name=name)

    def _configuration(self) -> list[SignalR]:
        # SIMPLON signals are None on a device whose detector was not initialized
        return [signal for signal in (getattr(self.driver, name) for name in CONFIGURATION) if signal is not None]

    async def describe_configuration(self) -> dict[str, DataKey]:
        return await merge_gathered_dicts(signal.describe() for signal in self._configuration())

    async def read_configuration(self) -> dict[str, Reading]:
        return await merge_gathered_dicts(signal.read() for signal in self._configuration())
