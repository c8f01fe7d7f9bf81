"""Macros of the DectrisLive Sardana controllers (the MacroServer's MacroPath includes this folder)."""
from __future__ import annotations

import json

import tango
from sardana.macroserver.macro import Macro, Type

VIRTUAL_DETECTORS = ("sumsig", "bf", "adf", "com_x", "com_y")  # the counter controller's axes 1-5


class dectris_live_setup(Macro):
    """Create, for one DectrisLive device, the detector-image controller (2D, channel
    <prefix>_image), the virtual-detector controller (counters <prefix>_sumsig, _bf, _adf, _com_x,
    _com_y) and a measurement group <prefix>_mg with all of them, and make it the active one.
    The same as these lines (see docs/sardana.md):

        defctrl DectrisLiveTwoDController <prefix>_2d Device <device>
        defelem <prefix>_image <prefix>_2d 1
        defctrl DectrisLiveCounterTimerController <prefix>_vd Device <device>
        defelem <prefix>_sumsig <prefix>_vd 1   (... _bf 2, _adf 3, _com_x 4, _com_y 5)
        defmeas <prefix>_mg <prefix>_sumsig ... <prefix>_image
        senv ActiveMntGrp <prefix>_mg
    """

    param_def = [
        ["device", Type.String, None, "Tango name of the DectrisLive device"],
        ["prefix", Type.String, "dlive", "prefix of the controller, channel and measurement group names"],
    ]

    def run(self, device, prefix):
        counters = [f"{prefix}_{name}" for name in VIRTUAL_DETECTORS]
        image = f"{prefix}_image"
        self.defctrl("DectrisLiveTwoDController", f"{prefix}_2d", "Device", device)
        self.defelem(image, f"{prefix}_2d", 1)
        self.defctrl("DectrisLiveCounterTimerController", f"{prefix}_vd", "Device", device)
        for axis, name in enumerate(counters, start=1):
            self.defelem(name, f"{prefix}_vd", axis)
        self.defmeas(f"{prefix}_mg", counters + [image])
        self._declare_image_type(f"{prefix}_mg", image)
        self.senv("ActiveMntGrp", f"{prefix}_mg")
        self.output("%s ready: measurement group %s_mg (%s, %s)", device, prefix, ", ".join(counters), image)

    def _declare_image_type(self, group: str, image: str) -> None:
        """Write the image channel's data type (float64) into the measurement group's configuration:
        without it, once ValueRefEnabled is on, Sardana's HDF5 recorder takes the type of the
        reference (a string) for the images and cannot build its virtual dataset of them."""
        proxy = tango.DeviceProxy(self.getMeasurementGroup(group).getFullName())
        configuration = json.loads(proxy.Configuration)
        channel = self.getObj(image).getFullName()
        for controller in configuration["controllers"].values():
            if channel in controller["channels"]:
                controller["channels"][channel]["data_type"] = "float64"
        proxy.Configuration = json.dumps(configuration)
