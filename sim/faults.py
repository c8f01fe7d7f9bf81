"""Stream faults the simulator can inject, set with ``update_sim_config({"faults": [...]})``.

A fault spec is a dict with a ``kind`` and the frame(s) it applies to (0-based frame numbers):

* ``{"kind": "drop", "frames": [N, ...]}``       frame N is not sent
* ``{"kind": "duplicate", "frames": [N]}``        frame N is sent twice
* ``{"kind": "reorder", "frames": [N]}``          frame N+1 is sent before frame N
* ``{"kind": "corrupt", "frames": [N]}``          bytes in the middle of N's blob are inverted
* ``{"kind": "truncate", "frames": [N], "mode": "blob"|"parts"}``
      ``blob`` (default): N's blob is cut to half its length (v1: ``size`` still says the full
      length; v2: a shorter byte string inside valid CBOR); ``parts``: v1 sends only the
      ``dimage`` and ``dimage_d`` parts, v2 sends the first half of the CBOR message
* ``{"kind": "wrong_series", "frames": [N]}``    frame N carries series id + 1
* ``{"kind": "stale_end"}``                       an end message of the previous series (series id
      − 1) goes out before this series' header / start message
* ``{"kind": "no_header"}``                       the series' header / start message is not sent
      (the images and the end are)
* ``{"kind": "stall", "frame": N, "ms": T}``      the sender pauses T ms before frame N
* ``{"kind": "stop", "frame": N}``                nothing is sent after frame N, not even the end
* ``{"kind": "rebind", "frame": N}``              the PUSH socket is closed and bound again to the
      same port after frame N (messages still queued are dropped, as on a DCU restart)

``"frame": N`` and ``"frames": [N, ...]`` are accepted for every frame fault. Faults apply to the
next armed series and are then cleared; ``"persistent": true`` keeps a fault for later series.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

FRAME_KINDS = ("drop", "duplicate", "reorder", "corrupt", "truncate", "wrong_series", "stall",
               "stop", "rebind")
KINDS = FRAME_KINDS + ("stale_end", "no_header")
TRUNCATE_MODES = ("blob", "parts")


@dataclass(frozen=True)
class FaultSpec:
    """One validated fault."""

    kind: str
    frames: tuple[int, ...] = ()
    ms: float = 0.0
    mode: str = "blob"
    persistent: bool = False

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind}
        if self.frames:
            out["frames"] = list(self.frames)
        if self.kind == "stall":
            out["ms"] = self.ms
        if self.kind == "truncate":
            out["mode"] = self.mode
        if self.persistent:
            out["persistent"] = True
        return out


def _frame_list(spec: dict[str, Any], where: str) -> tuple[int, ...]:
    if "frame" in spec and "frames" in spec:
        raise ValueError(f"{where}: give either 'frame' or 'frames', not both")
    raw = [spec["frame"]] if "frame" in spec else spec.get("frames")
    if not isinstance(raw, list) or not raw:
        raise ValueError(f"{where}: needs 'frame': N or 'frames': [N, ...] (0-based frame numbers)")
    for number in raw:
        if isinstance(number, bool) or not isinstance(number, int) or number < 0:
            raise ValueError(f"{where}: frame numbers must be integers >= 0, got {number!r}")
    return tuple(sorted(set(raw)))


def parse_fault(spec: Any, index: int = 0) -> FaultSpec:
    """Validate one fault dict; ValueError says what is wrong and what is allowed."""
    where = f"faults[{index}]"
    if not isinstance(spec, dict):
        raise ValueError(f"{where}: a fault is a dict like {{'kind': 'drop', 'frames': [3]}}, "
                         f"got {spec!r}")
    kind = spec.get("kind")
    if kind not in KINDS:
        raise ValueError(f"{where}: unknown fault kind {kind!r}; known kinds: {', '.join(KINDS)}")
    allowed = {"kind", "persistent"}
    if kind in FRAME_KINDS:
        allowed |= {"frame", "frames"}
    if kind == "stall":
        allowed.add("ms")
    if kind == "truncate":
        allowed.add("mode")
    unknown = sorted(set(spec) - allowed)
    if unknown:
        raise ValueError(f"{where}: fault {kind!r} does not take {', '.join(unknown)} "
                         f"(allowed: {', '.join(sorted(allowed))})")
    persistent = spec.get("persistent", False)
    if not isinstance(persistent, bool):
        raise ValueError(f"{where}: 'persistent' must be true or false, got {persistent!r}")
    frames = _frame_list(spec, where) if kind in FRAME_KINDS else ()
    ms = 0.0
    if kind == "stall":
        ms = spec.get("ms")
        if isinstance(ms, bool) or not isinstance(ms, (int, float)) or not 0 <= ms <= 600_000:
            raise ValueError(f"{where}: stall needs 'ms' between 0 and 600000, got {ms!r}")
    mode = spec.get("mode", "blob")
    if kind == "truncate" and mode not in TRUNCATE_MODES:
        raise ValueError(f"{where}: truncate 'mode' must be one of {', '.join(TRUNCATE_MODES)}, "
                         f"got {mode!r}")
    return FaultSpec(kind, frames, float(ms), mode, persistent)


def parse_faults(specs: Any) -> list[FaultSpec]:
    if specs is None:
        return []
    if not isinstance(specs, list):
        raise ValueError(f"'faults' must be a list of fault dicts, got {specs!r}")
    return [parse_fault(spec, i) for i, spec in enumerate(specs)]


@dataclass
class FaultPlan:
    """The faults of one series, indexed by frame number for the send loop."""

    specs: list[FaultSpec] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.by_frame: dict[int, dict[str, FaultSpec]] = {}
        for spec in self.specs:
            for number in spec.frames:
                self.by_frame.setdefault(number, {})[spec.kind] = spec
        self.stale_end = any(spec.kind == "stale_end" for spec in self.specs)
        self.no_header = any(spec.kind == "no_header" for spec in self.specs)
        stops = [n for spec in self.specs if spec.kind == "stop" for n in spec.frames]
        self.stop_after: int | None = min(stops) if stops else None

    def __bool__(self) -> bool:
        return bool(self.specs)

    def at(self, frame_number: int) -> dict[str, FaultSpec]:
        return self.by_frame.get(frame_number, {})


def corrupt_blob(blob: bytes) -> bytes:
    """Invert up to 16 bytes in the middle of the payload (past a bslz4 header) so the frame no
    longer decodes to its ground truth."""
    data = bytearray(blob)
    if not data:
        return bytes(data)
    start = min(len(data) - 1, max(12, len(data) // 2))
    for i in range(start, min(len(data), start + 16)):
        data[i] ^= 0xFF
    return bytes(data)


def truncate_blob(blob: bytes) -> bytes:
    return blob[: len(blob) // 2]
