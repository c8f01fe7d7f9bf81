"""The DectrisLive device's attributes and commands a Bluesky detector uses, as ophyd-async Tango
signals.

Change events: the device pushes them for State, Status, the progress and saving attributes and
the results, so the signals that are followed (State, ``acquisitions_ended``, ``frames_processed``,
``saving_status``, ``last_saved_file``, ...) update without polling. Data-ready events, which
ophyd-async's Tango signals do not cover, are subscribed through the driver's own ``DeviceProxy``
(:class:`~tango_dectris_live.bluesky.events.DeviceEvents`).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from ophyd_async.core import Array1D, SignalR, SignalRW
from ophyd_async.tango.core import (DevStateEnum, TangoDevice, get_full_attr_trl, tango_signal_r,
                                    tango_triggerable_command)

#: The SIMPLON parameters used here; they exist on the device once the detector is initialized
#: (the DCU lists no configuration before), so they are optional signals (None when absent).
SIMPLON_SIGNALS = ("count_time", "frame_time", "detector_readout_time", "x_pixels_in_detector",
                   "y_pixels_in_detector", "bit_depth_image")


class DectrisLiveDriver(TangoDevice):
    """One ``DectrisLive`` device: live-processing settings, progress, saving, SIMPLON timing.

    ``trl`` is the device's Tango resource locator, e.g. ``tango://host:10000/bl/det/arina`` (or
    ``bl/det/arina`` with ``TANGO_HOST`` set). Only the attributes declared here are connected,
    not the hundred-odd SIMPLON attributes the device has."""

    # live processing (docs/live-processing.md)
    analyses: SignalRW[Sequence[str]]
    available_analyses: SignalR[Sequence[str]]
    result_attributes: SignalR[Sequence[str]]
    nav_shape: SignalRW[Array1D[np.int64]]
    beam_center: SignalRW[Array1D[np.float64]]
    bf_radius: SignalRW[float]
    adf_inner_radius: SignalRW[float]
    adf_outer_radius: SignalRW[float]
    # progress of the series being processed (or of the last one)
    acquisitions_ended: SignalR[int]
    acquisition_status: SignalR[str]
    series_id: SignalR[int]
    frames_expected: SignalR[int]
    frames_processed: SignalR[int]
    frames_missing: SignalR[int]
    # saving (docs/saving.md)
    saving_mode: SignalRW[str]
    saving_directory: SignalRW[str]
    saving_name_pattern: SignalRW[str]
    saving_status: SignalR[str]
    last_saved_file: SignalR[str]
    frames_saved: SignalR[int]
    # single, node or merger (a merging device saves no frames: its nodes do); None: a device before roles
    role: SignalR[str] | None
    # SIMPLON parameters (SIMPLON_SIGNALS)
    count_time: SignalRW[float] | None
    frame_time: SignalRW[float] | None
    detector_readout_time: SignalR[float] | None
    x_pixels_in_detector: SignalR[int] | None
    y_pixels_in_detector: SignalR[int] | None
    bit_depth_image: SignalR[int] | None

    def __init__(self, trl: str, name: str = "") -> None:
        # ophyd-async 0.21 fills declared children by their exact Tango name only when it fills
        # every attribute of the device (auto_fill_signals); Tango's State and the commands are
        # capitalised, so they are made here from their full names instead.
        self.state = tango_signal_r(DevStateEnum, get_full_attr_trl(trl, "State"))
        self.status = tango_signal_r(str, get_full_attr_trl(trl, "Status"))
        self.start = tango_triggerable_command(get_full_attr_trl(trl, "Start"))
        self.stop_ = tango_triggerable_command(get_full_attr_trl(trl, "Stop"))
        self.abort = tango_triggerable_command(get_full_attr_trl(trl, "Abort"))
        super().__init__(trl, support_events=True, auto_fill_signals=False, name=name)

    def simplon(self, name: str) -> SignalR:
        """A SIMPLON parameter's signal; a clear error when the device does not have it (yet)."""
        signal = getattr(self, name, None)
        if signal is None:
            raise RuntimeError(f"the DectrisLive device {self.get_trl()} has no attribute {name}: its SIMPLON "
                               f"attributes appear once the detector is initialized (run the device's Initialize, "
                               f"wait for State ON, then connect again)")
        return signal
