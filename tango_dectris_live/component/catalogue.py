"""Which SIMPLON parameters a detector offers: the keys the DCU lists, the core set clients rely on
(also where a DCU lists nothing), the quirks it answers without listing, and what it lacks."""
from __future__ import annotations

from dataclasses import dataclass

from tango_dectris_live.simplon.client import DetectorClient
from tango_dectris_live.simplon.errors import DetectorNotInitializedError, UnknownParameterError
from tango_dectris_live.simplon.parameters import ParameterInfo

# (module, task) pairs whose parameters are offered, in order.
PARAMETER_GROUPS = (
    ("detector", "config"), ("detector", "status"),
    ("stream", "config"), ("stream", "status"),
    ("filewriter", "config"), ("filewriter", "status"),
    ("monitor", "config"), ("monitor", "status"),
)

# Keys clients can rely on: offered like every other key, but listed here so that a DCU without
# ``keys`` listings (older firmware, other simulators) still offers them.
CORE_KEYS: dict[tuple[str, str], tuple[str, ...]] = {
    ("detector", "config"): (
        "count_time", "frame_time", "nimages", "ntrigger", "trigger_mode", "photon_energy",
        "threshold_energy", "compression", "roi_mode", "bit_depth_image", "x_pixels_in_detector",
        "y_pixels_in_detector", "description", "beam_center_x", "beam_center_y",
    ),
    ("detector", "status"): ("state", "temperature", "humidity"),
    ("stream", "config"): ("mode", "format", "header_detail", "header_appendix", "image_appendix"),
    ("stream", "status"): ("state", "dropped"),
    ("filewriter", "config"): ("mode", "name_pattern", "nimages_per_file"),
    ("monitor", "config"): ("mode",),
}

# Keys the DCU answers but does not list (SIMPLON.md §1.1 quirks).
UNLISTED_KEYS: dict[tuple[str, str], tuple[str, ...]] = {
    ("detector", "config"): ("wavelength",),
    ("detector", "status"): ("error",),
}


@dataclass(frozen=True)
class ParameterCatalogue:
    """The parameters a DCU offers now. ``complete``: the configuration was there to read (a DCU
    in state ``na`` has only its state until Initialize)."""

    parameters: tuple[ParameterInfo, ...]
    missing: tuple[str, ...]  # "module/task/key" of core keys and listings the DCU does not provide
    complete: bool


def read_catalogue(client: DetectorClient, dcu_state: str) -> ParameterCatalogue:
    """Ask the DCU for every parameter it offers (one GET per key: seconds on a real DCU)."""
    parameters: list[ParameterInfo] = []
    missing: list[str] = []
    for module, task in PARAMETER_GROUPS:
        if dcu_state == "na" and (module, task) != ("detector", "status"):
            continue
        keys = ["state"] if dcu_state == "na" else _keys_of(client, module, task, missing)
        for key in keys:
            try:
                parameters.append(client.describe(module, task, key))
            except (UnknownParameterError, DetectorNotInitializedError):
                if key in CORE_KEYS.get((module, task), ()):
                    missing.append(f"{module}/{task}/{key}")
    return ParameterCatalogue(tuple(parameters), tuple(missing), complete=dcu_state != "na")


def _keys_of(client: DetectorClient, module: str, task: str, missing: list[str]) -> list[str]:
    try:
        keys = list(client.list_keys(module, task))
    except UnknownParameterError:
        missing.append(f"{module}/{task}/keys")
        keys = list(CORE_KEYS.get((module, task), ()))
    for key in UNLISTED_KEYS.get((module, task), ()):
        if key not in keys:
            keys.append(key)
    return keys
