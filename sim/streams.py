"""The simulated DCU's data streams: a ZeroMQ PUSH sender for stream v1 and one for stream v2.

:class:`DetectorStreamSink` implements :class:`sim.series.StreamSink`. Frames come from
:class:`sim.data.ScanDataGenerator` (or a zmqdump recording), are encoded by :mod:`sim.encode`
and sent either by the Python loop here (which also injects :mod:`sim.faults`) or, when no fault
is set, by the compiled loop in ``sim._fastsend``.

No consumer, or one too slow (the PUSH high-water mark is reached): a series waits for the
socket to take its messages for at most ``send_timeout_ms`` *in all* (its wait budget, spent by
the header, the frames and the end message together). Once the budget is spent every further
message is offered without waiting and dropped when refused; dropped images are counted per
series (:meth:`DetectorStreamSink.dropped_frames`, the state machine's ``stream/status/dropped``).
So arm, trigger and disarm with nobody connected take the exposure time plus at most the budget.

Several consumers on one stream: the PUSH socket deals each message to one connected PULL client,
round-robin, and skips a client whose queue is full, as a DCU does. How much it queues per client
is bounded by ``send_hwm`` (ZMQ_SNDHWM, messages) and ``send_buffer_bytes`` (ZMQ_SNDBUF, the
kernel's send buffer): a DCU's limited buffers, so a slow client is skipped after a few frames.
ZeroMQ reads both when a socket is bound, so changing them binds the stream sockets again (same
ports) at once; the compiled sender sends on the same sockets and so honours them too.
"""
from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import cbor2
import numpy as np
import zmq

from sim import encode
from sim.data import ScanDataGenerator, check_scan_size, default_nav_shape
from sim.faults import FaultPlan, FaultSpec, corrupt_blob, parse_faults, truncate_blob
from sim.series import SeriesInfo
from sim.zmqdump import ReplayRecording

try:
    from sim import _fastsend
except ImportError:  # not built: the Python loop sends everything
    _fastsend = None

PACINGS = ("frame_time", "max")
#: How stream v1 messages go on the wire. ``multipart``: each message one multipart ZeroMQ message
#: (a real DCU). ``split_header``: the global header's parts each a single-part message (what a
#: zmqdump replay, e.g. LiberTEM-live's simulator, sends), images multipart, the end alone.
#: ``split_all``: every part of every message a single-part message.
V1_FRAMINGS = ("multipart", "split_header", "split_all")
DEFAULT_SIM_CONFIG: dict[str, Any] = {
    "pacing": "frame_time", "nav_shape": None, "seed": 0, "dose": 20.0, "pool_size": 64,
    "faults": [], "replay_file": None, "fast_path": True, "send_timeout_ms": 2000,
    "v1_framing": "multipart", "send_hwm": None, "send_buffer_bytes": None,
}
#: The settings read when a stream socket is bound (changing one binds the sockets again).
SOCKET_SETTINGS = ("send_hwm", "send_buffer_bytes")
SEND_HWM_MAX = 1_000_000
SEND_BUFFER_RANGE = (1024, 1 << 30)
# Paced sends go in batches, and waits for a consumer in slices, of this length so that ``stop``
# is honoured within it.
FAST_BATCH_SECONDS = 0.05


def _validated_sim_config(current: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(changes, dict):
        raise ValueError(f"simulator settings must be a dict, got {changes!r}")
    unknown = sorted(set(changes) - set(DEFAULT_SIM_CONFIG))
    if unknown:
        raise ValueError(f"unknown simulator setting(s) {', '.join(unknown)}; "
                         f"known: {', '.join(sorted(DEFAULT_SIM_CONFIG))}")
    new = dict(current)
    for key, value in changes.items():
        if key == "pacing":
            if value not in PACINGS:
                raise ValueError(f"pacing must be one of {', '.join(PACINGS)}, got {value!r}")
        elif key == "nav_shape":
            if value is not None:
                if (not isinstance(value, (list, tuple)) or len(value) != 2
                        or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in value)):
                    raise ValueError(f"nav_shape must be [height, width] (positive integers) or null, "
                                     f"got {value!r}")
                value = [int(value[0]), int(value[1])]
                check_scan_size(value)
        elif key == "seed":
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"seed must be an integer >= 0, got {value!r}")
        elif key == "dose":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1e6:
                raise ValueError(f"dose (mean counts per bright-field pixel) must be in (0, 1e6], "
                                 f"got {value!r}")
            value = float(value)
        elif key == "pool_size":
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 4096:
                raise ValueError(f"pool_size must be an integer in 1..4096, got {value!r}")
        elif key == "faults":
            value = [spec.to_json() for spec in parse_faults(value)]
        elif key == "replay_file":
            if value is not None:
                if not isinstance(value, str) or not Path(value).is_file():
                    raise ValueError(f"replay_file {value!r} does not exist (give the path of a "
                                     f"zmqdump recording, or null)")
                ReplayRecording.load(value)  # raises ValueError when it is not a v1 recording
        elif key == "fast_path":
            if not isinstance(value, bool):
                raise ValueError(f"fast_path must be true or false, got {value!r}")
        elif key == "v1_framing":
            if value not in V1_FRAMINGS:
                raise ValueError(f"v1_framing must be one of {', '.join(V1_FRAMINGS)}, got {value!r}")
        elif key == "send_timeout_ms":
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 600_000:
                raise ValueError(f"send_timeout_ms (how long a series may wait in all for a consumer) "
                                 f"must be an integer in 0..600000, got {value!r}")
        elif key == "send_hwm":
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or not 1 <= value <= SEND_HWM_MAX):
                raise ValueError(f"send_hwm (messages the stream queues per consumer, ZMQ_SNDHWM) must be "
                                 f"an integer in 1..{SEND_HWM_MAX} or null (ZeroMQ's default, 1000), "
                                 f"got {value!r}")
        elif key == "send_buffer_bytes":
            low, high = SEND_BUFFER_RANGE
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or not low <= value <= high):
                raise ValueError(f"send_buffer_bytes (the kernel's send buffer of each stream "
                                 f"connection, ZMQ_SNDBUF) must be an integer in {low}..{high} or null "
                                 f"(the kernel's autotuning), got {value!r}")
        new[key] = value
    return new


def _now_rfc3339() -> str:
    return datetime.now(timezone.utc).astimezone().isoformat(timespec="milliseconds")


@dataclass
class SeriesStream:
    """What the sink knows about the series being sent."""

    series: SeriesInfo
    stream_format: str  # "legacy" or "cbor"
    generator: ScanDataGenerator | None
    channels: list[str]
    plan: FaultPlan
    replay: ReplayRecording | None
    t0_ns: int
    v1_framing: str = "multipart"  # the sim setting when the series was armed (see V1_FRAMINGS)
    series_date: str = ""
    encoded: dict[int, list[encode.EncodedFrame]] = field(default_factory=dict)
    dimage_d: dict[int, bytes] = field(default_factory=dict)
    held: list[bytes] | None = None  # a reordered frame waiting for its successor
    held_frame: int = -1
    stopped: bool = False
    fast_pool: Any = None
    wait_left_s: float = 0.0  # what is left of the series' wait budget (send_timeout_ms)
    trigger_starts_ns: dict[int, int] = field(default_factory=dict)  # inte: frame -> start offset
    last_stop_ns: int = 0  # inte: stop of the last image after the time origin

    @property
    def real_ns(self) -> int:
        return round(self.series.count_time * 1e9)

    @property
    def frame_ns(self) -> int:
        return round(self.series.frame_time * 1e9)

    @property
    def real_ticks(self) -> int:
        return round(self.series.count_time * encode.V2_TIMEBASE)

    @property
    def frame_ticks(self) -> int:
        return round(self.series.frame_time * encode.V2_TIMEBASE)


class DetectorStreamSink:
    """Stream v1 and v2 PUSH senders of the simulated DCU (see the module docstring)."""

    def __init__(self, host: str = "127.0.0.1", stream_port: int = 0, stream2_port: int = 0) -> None:
        self.host = host
        self._requested_ports = (int(stream_port), int(stream2_port))
        self._context = zmq.Context()
        self._sockets: dict[str, zmq.Socket] = {}
        self._endpoints: dict[str, str] = {}
        self._lock = threading.RLock()
        self._sim_config = dict(DEFAULT_SIM_CONFIG)
        self._current: SeriesStream | None = None
        self._generators: dict[tuple, ScanDataGenerator] = {}
        # Compiled pools (with their slot table) sent zero-copy stay referenced while ZeroMQ may
        # still hold their bytes (their ``in_flight`` count), at the latest until close().
        self._fast_pools: dict[tuple, tuple[Any, np.ndarray]] = {}
        self.dropped = 0  # images dropped since the sink was made, all series
        self.frames_sent = 0
        self._series_dropped = 0  # images dropped in the current (or last) series

    # -- sockets ---------------------------------------------------------------------------

    @property
    def ports(self) -> tuple[int, int]:
        return tuple(int(self._endpoints[k].rsplit(":", 1)[1]) if k in self._endpoints else 0
                     for k in ("legacy", "cbor"))  # type: ignore[return-value]

    def _bind_one(self, stream_format: str, port: int) -> None:
        sock = self._context.socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, 0)
        # ZeroMQ copies these into the listener at bind: they apply to every consumer of this bind
        if self._sim_config["send_hwm"] is not None:
            sock.setsockopt(zmq.SNDHWM, self._sim_config["send_hwm"])
        if self._sim_config["send_buffer_bytes"] is not None:
            sock.setsockopt(zmq.SNDBUF, self._sim_config["send_buffer_bytes"])
        sock.bind(f"tcp://{self.host}:{port if port else '*'}")
        self._sockets[stream_format] = sock
        self._endpoints[stream_format] = sock.getsockopt_string(zmq.LAST_ENDPOINT)

    def bind(self) -> tuple[int, int]:
        with self._lock:
            if not self._sockets:
                self._bind_one("legacy", self._requested_ports[0])
                self._bind_one("cbor", self._requested_ports[1])
            return self.ports

    def rebind(self, stream_format: str) -> None:
        """Close one PUSH socket and bind it again on the same port (queued messages are lost)."""
        with self._lock:
            port = int(self._endpoints[stream_format].rsplit(":", 1)[1])
            self._sockets.pop(stream_format).close(linger=0)
            deadline = time.monotonic() + 5.0
            while True:
                try:
                    self._bind_one(stream_format, port)
                    return
                except zmq.ZMQError as exc:
                    # The closed listener is released asynchronously by ZeroMQ's I/O thread.
                    if exc.errno != zmq.EADDRINUSE or time.monotonic() > deadline:
                        raise
                    time.sleep(0.01)

    def close(self) -> None:
        with self._lock:
            for sock in self._sockets.values():
                sock.close(linger=0)
            self._sockets.clear()
            # term() returns once ZeroMQ released every message, so the pools can go after it.
            self._context.term()
            self._fast_pools.clear()

    # -- simulator settings ----------------------------------------------------------------

    def get_sim_config(self) -> dict[str, Any]:
        with self._lock:
            out = dict(self._sim_config)
            out["faults"] = [dict(f) for f in out["faults"]]
            return out

    def update_sim_config(self, changes: dict[str, Any]) -> dict[str, Any]:
        """Apply simulator settings (ValueError, nothing applied, when one is invalid). A change
        of ``send_hwm`` / ``send_buffer_bytes`` binds both stream sockets again on their ports
        (consumers connected then reconnect by themselves), refused while a series is armed."""
        with self._lock:
            new = _validated_sim_config(self._sim_config, changes)
            rebind = bool(self._sockets) and any(new[k] != self._sim_config[k] for k in SOCKET_SETTINGS)
            if rebind and self._current is not None:
                changed = [k for k in SOCKET_SETTINGS if new[k] != self._sim_config[k]]
                raise ValueError(f"{', '.join(changed)} cannot change while series "
                                 f"{self._current.series.series_id} is armed (the stream sockets are bound "
                                 f"again to apply it); disarm first")
            self._sim_config = new
            if rebind:
                for stream_format in list(self._sockets):
                    self.rebind(stream_format)
            return self.get_sim_config()

    def dropped_frames(self) -> int:
        """Images of the current (or last) series that no consumer took (``stream/status/dropped``)."""
        return self._series_dropped

    # -- series ------------------------------------------------------------------------------

    def _generator_for(self, series: SeriesInfo) -> ScanDataGenerator:
        cfg = self._sim_config
        if cfg["nav_shape"]:
            nav = tuple(cfg["nav_shape"])
        else:
            nav = default_nav_shape(series.total_frames)
            check_scan_size(nav, f"the default for nimages x ntrigger = {series.total_frames} frames, "
                                 "as the simulator's nav_shape is null")
        mask_to_zero = bool(series.detector_config.get("mask_to_zero", False))
        key = (series.width, series.height, series.bit_depth, nav, cfg["seed"], cfg["dose"],
               cfg["pool_size"], mask_to_zero)
        gen = self._generators.get(key)
        if gen is None:
            gen = ScanDataGenerator(series.width, series.height, encode.dtype_for_bit_depth(series.bit_depth),
                                    nav_shape=nav, seed=cfg["seed"], dose=cfg["dose"],
                                    pool_size=cfg["pool_size"], mask_to_zero=mask_to_zero)
            self._generators = {key: gen}  # keep one: a new geometry makes the old one useless
        return gen

    def generator_for(self, series: SeriesInfo) -> ScanDataGenerator:
        """The generator (ground truth) the sink uses for ``series`` with the current settings."""
        with self._lock:
            return self._generator_for(series)

    def _take_faults(self) -> FaultPlan:
        specs = parse_faults(self._sim_config["faults"])
        self._sim_config["faults"] = [s.to_json() for s in specs if s.persistent]
        return FaultPlan(specs)

    def start_series(self, series: SeriesInfo) -> None:
        with self._lock:
            self.bind()
            stream_format = series.stream_config.get("format", "legacy")
            if stream_format not in ("legacy", "cbor"):
                raise ValueError(f"stream format must be legacy or cbor, not {stream_format!r}")
            replay_file = self._sim_config["replay_file"]
            channels = ["threshold_1"]
            if stream_format == "cbor" and series.detector_config.get("threshold/2/mode") == "enabled":
                channels.append("threshold_2")
            state = SeriesStream(
                series=series, stream_format=stream_format,
                # the ground truth is built only for a stream that is sent
                generator=None if replay_file or not series.stream_enabled else self._generator_for(series),
                channels=channels, plan=self._take_faults(),
                replay=ReplayRecording.load(replay_file) if replay_file else None,
                t0_ns=time.monotonic_ns(), v1_framing=self._sim_config["v1_framing"],
                wait_left_s=self._sim_config["send_timeout_ms"] / 1000.0)
            if state.replay is not None and state.replay.stream_format != stream_format:
                raise ValueError(
                    f"replay_file holds a {state.replay.stream_format} stream but stream/config/format "
                    f"is {stream_format}; set the format to {state.replay.stream_format} to replay it")
            self._current = state
            self._series_dropped = 0
            if not series.stream_enabled:
                return
            self._release_idle_pools()
            # Encoding at arm keeps it out of the time the series' images take to stream.
            if state.generator is not None:
                for pool_index in self._series_pool_indices(state):
                    self._encoded(state, pool_index)
            if state.plan.stale_end:
                self._send(state, self._end_message(state, series.series_id - 1))
            if not state.plan.no_header:
                self._send(state, self._header_message(state), header=True)

    def end_series(self, series: SeriesInfo) -> None:
        with self._lock:
            state = self._current
            if state is None or state.series.series_id != series.series_id:
                state = SeriesStream(series, series.stream_config.get("format", "legacy"), None,
                                     ["threshold_1"], FaultPlan(), None, time.monotonic_ns(),
                                     v1_framing=self._sim_config["v1_framing"],
                                     wait_left_s=self._sim_config["send_timeout_ms"] / 1000.0)
            self._current = None
            if not series.stream_enabled:
                return
            if state.held is not None and not state.stopped:
                self._send(state, state.held, image=True)
                state.held = None
            if state.stopped:
                return
            self._send(state, self._end_message(state, series.series_id))

    # -- messages ----------------------------------------------------------------------------

    def _header_message(self, state: SeriesStream) -> list[bytes]:
        series = state.series
        detail = series.stream_config.get("header_detail", "basic")
        appendix = str(series.stream_config.get("header_appendix", "") or "")
        if state.replay is not None:
            return state.replay.header(series.series_id, series.series_unique_id)
        gen = state.generator
        assert gen is not None
        if state.stream_format == "legacy":
            return encode.v1_global_header(
                series.series_id, detail, series.detector_config, width=series.width,
                height=series.height, flatfield=gen.flatfield(), pixel_mask=gen.pixel_mask(),
                countrate_table=self._countrate_table(series), header_appendix=appendix)
        return [encode.v2_start_message(series_id=series.series_id,
                                        series_unique_id=series.series_unique_id,
                                        arm_date=series.arm_date,
                                        fields=self._v2_start_fields(state, detail, appendix))]

    @staticmethod
    def _countrate_table(series: SeriesInfo) -> np.ndarray:
        table = series.detector_config.get("countrate_correction_table")
        if table is not None:
            arr = np.asarray(table, dtype=np.float32)
            return arr.reshape(-1, 2) if arr.ndim == 1 else (arr.T if arr.shape[0] == 2 else arr)
        # A plausible paralysable-detector curve: measured counts (x) → corrected counts (y).
        x = np.arange(1000, dtype=np.float32) * 1125.0
        y = x * (1.0 + x / 2e6)
        return np.stack([x, y], axis=1).astype(np.float32)

    def _v2_start_fields(self, state: SeriesStream, detail: str, appendix: str) -> dict[str, Any]:
        series, cfg, gen = state.series, state.series.detector_config, state.generator
        assert gen is not None
        bits = series.bit_depth
        energy = cfg.get("photon_energy", cfg.get("incident_energy", 8041.0))
        thresholds = {"threshold_1": float(cfg.get("threshold/1/energy", cfg.get("threshold_energy", energy / 2)))}
        thresholds["threshold_2"] = float(cfg.get("threshold/2/energy", 1.4 * energy))
        goniometer = {axis: {"increment": float(cfg[f"{axis}_increment"]), "start": float(cfg[f"{axis}_start"])}
                      for axis in ("chi", "kappa", "omega", "phi", "two_theta")
                      if f"{axis}_start" in cfg and f"{axis}_increment" in cfg}
        fields: dict[str, Any] = {
            "beam_center_x": float(cfg.get("beam_center_x", series.width / 2)),
            "beam_center_y": float(cfg.get("beam_center_y", series.height / 2)),
            "channels": list(state.channels),
            "count_time": float(series.count_time),
            "countrate_correction_enabled": bool(cfg.get("countrate_correction_applied", True)),
            "detector_description": str(cfg.get("description", "Dectris simulated detector")),
            "detector_serial_number": str(cfg.get("detector_number", "E-00-0000")),
            "detector_translation": [float(v) for v in cfg.get("detector_translation", [0.0, 0.0, 0.0])],
            "flatfield_enabled": bool(cfg.get("flatfield_correction_applied", True)),
            "frame_time": float(series.frame_time),
            "goniometer": goniometer,
            "image_dtype": encode.dtype_for_bit_depth(bits).name,
            "image_size_x": series.width,
            "image_size_y": series.height,
            "incident_energy": float(energy),
            "incident_wavelength": float(cfg.get("wavelength", 12398.4 / float(energy))),
            "number_of_images": series.total_frames,
            "pixel_mask_enabled": bool(cfg.get("pixel_mask_applied", True)),
            "pixel_size_x": float(cfg.get("x_pixel_size", 7.5e-05)),
            "pixel_size_y": float(cfg.get("y_pixel_size", 7.5e-05)),
            "saturation_value": int(cfg.get("countrate_correction_count_cutoff", (1 << bits) - 2)),
            "sensor_material": str(cfg.get("sensor_material", "Si")),
            "sensor_thickness": float(cfg.get("sensor_thickness", 0.00045)),
            "threshold_energy": thresholds,
            "virtual_pixel_interpolation_enabled": bool(cfg.get("virtual_pixel_correction_applied", True)),
        }
        if detail == "all":
            table = self._countrate_table(series)[:, 1].astype(np.uint32)
            fields["countrate_correction_lookup_table"] = cbor2.CBORTag(70, table.astype("<u4").tobytes())
            fields["flatfield"] = {ch: encode.v2_multidim(gen.flatfield()) for ch in state.channels}
            fields["pixel_mask"] = {ch: encode.v2_multidim(gen.pixel_mask()) for ch in state.channels}
        if appendix:
            fields["user_data"] = appendix
        return fields

    def _end_message(self, state: SeriesStream, series_id: int) -> list[bytes]:
        if state.stream_format == "cbor":
            return [encode.v2_end_message(series_id, state.series.series_unique_id)]
        return [encode.v1_series_end(series_id)]

    @staticmethod
    def _series_pool_indices(state: SeriesStream) -> np.ndarray:
        """The pool frames the series' images show (sorted, each once)."""
        gen = state.generator
        assert gen is not None
        return gen.pool_indices_shown(state.series.total_frames)

    def _encoded(self, state: SeriesStream, pool_index: int) -> list[encode.EncodedFrame]:
        """The encoded channels of one pool frame (cached for the series)."""
        cached = state.encoded.get(pool_index)
        if cached is None:
            gen = state.generator
            assert gen is not None
            frames = [gen.pool_frame(pool_index)]
            if len(state.channels) > 1:
                high = (frames[0] >> 2).astype(gen.dtype)
                high[gen.masked_pixels[:, 0], gen.masked_pixels[:, 1]] = gen.mask_value
                frames.append(high)
            cached = [encode.encode_frame(f, state.series.compression, state.stream_format) for f in frames]
            state.encoded[pool_index] = cached
        return cached

    @staticmethod
    def _start_offset_ns(state: SeriesStream, frame_number: int) -> int:
        """Start of image ``frame_number`` after the series' time origin: frame_time steps, or in
        ``inte`` (every image its own count time) when its trigger actually came."""
        start = state.trigger_starts_ns.get(frame_number)
        return start if start is not None else frame_number * state.frame_ns

    def image_parts(self, frame_number: int) -> list[bytes]:
        """The ZeroMQ parts of image ``frame_number`` of the series being sent (no faults)."""
        with self._lock:
            state = self._current
            if state is None:
                raise RuntimeError("no series is armed: arm one before asking for its image messages")
            return self.frame_message(state, frame_number)

    def frame_message(self, state: SeriesStream, frame_number: int,
                      faults: dict[str, FaultSpec] | None = None,
                      series: SeriesInfo | None = None) -> list[bytes]:
        """The ZeroMQ parts of image ``frame_number`` with the frame faults in ``faults`` applied;
        ``series`` overrides the armed series' count time (an ``inte`` trigger's value)."""
        faults = faults or {}
        series = series or state.series
        series_id = series.series_id + (1 if "wrong_series" in faults else 0)
        if state.replay is not None:
            parts = state.replay.image(frame_number, series_id, series.series_unique_id)
            # v1: the blob is part 3; v2: the one CBOR message carries the blob(s)
            blob_index = 2 if state.stream_format == "legacy" else 0
            if "corrupt" in faults:
                parts[blob_index] = corrupt_blob(parts[blob_index])
            if "truncate" in faults:
                if state.stream_format == "cbor":
                    parts = [parts[0][: len(parts[0]) // 2]]
                else:
                    parts = parts[:2] if faults["truncate"].mode == "parts" else \
                        parts[:2] + [truncate_blob(parts[2])] + parts[3:]
            return parts
        gen = state.generator
        assert gen is not None
        encoded = self._encoded(state, gen.pool_index(frame_number))
        blob_fault = ("corrupt" in faults) or ("truncate" in faults and faults["truncate"].mode == "blob")

        def faulted(blob: bytes) -> bytes:
            if "corrupt" in faults:
                blob = corrupt_blob(blob)
            if "truncate" in faults and faults["truncate"].mode == "blob":
                blob = truncate_blob(blob)
            return blob

        appendix = str(series.stream_config.get("image_appendix", "") or "")
        if state.stream_format == "legacy":
            first = encoded[0]
            pool_index = gen.pool_index(frame_number)
            dimage_d = state.dimage_d.get(pool_index)
            if dimage_d is None:
                dimage_d = state.dimage_d[pool_index] = encode.v1_dimage_d(first)
            start = state.t0_ns + self._start_offset_ns(state, frame_number)
            real_ns = round(series.count_time * 1e9)
            parts = encode.v1_image_message(series_id, frame_number, first, real_time_ns=real_ns,
                                            start_time_ns=start, stop_time_ns=start + real_ns,
                                            image_appendix=appendix, dimage_d=dimage_d)
            if blob_fault:
                parts[2] = faulted(parts[2])
            if "truncate" in faults and faults["truncate"].mode == "parts":
                parts = parts[:2]
            return parts
        if blob_fault:
            encoded = [_replace_v2_blob(e, faulted(e.v2_blob)) for e in encoded]
        start_ticks = round(self._start_offset_ns(state, frame_number) * encode.V2_TIMEBASE / 1e9)
        real_ticks = round(series.count_time * encode.V2_TIMEBASE)
        message = encode.v2_image_message(
            series_id=series_id, series_unique_id=series.series_unique_id, image_id=frame_number,
            series_date=state.series_date or series.arm_date, real_time_ticks=real_ticks,
            start_time_ticks=start_ticks, stop_time_ticks=start_ticks + real_ticks,
            channels=list(zip(state.channels, encoded)), user_data=appendix)
        if "truncate" in faults and faults["truncate"].mode == "parts":
            message = message[: len(message) // 2]
        return [message]

    # -- sending -----------------------------------------------------------------------------

    def _socket(self, state: SeriesStream) -> zmq.Socket:
        return self._sockets[state.stream_format]

    def _send(self, state: SeriesStream, parts: list[bytes], *, image: bool = False, header: bool = False,
              stop: threading.Event | None = None) -> bool:
        """Send one message, waiting for a consumer only as long as the series' wait budget
        lasts; False when it was dropped (an image is then counted in ``dropped``). A v1 message
        goes out in the series' framing: whole, or (``header`` with split_header, any with
        split_all) one single-part ZeroMQ message per part."""
        framing = state.v1_framing if state.stream_format == "legacy" else "multipart"
        if len(parts) > 1 and (framing == "split_all" or (framing == "split_header" and header)):
            for part in parts:
                if not self._send_message(state, [part], stop):
                    if image:
                        self.dropped += 1
                        self._series_dropped += 1
                    return False
            return True
        if self._send_message(state, parts, stop):
            return True
        if image:
            self.dropped += 1
            self._series_dropped += 1
        return False

    def _send_message(self, state: SeriesStream, parts: list[bytes], stop: threading.Event | None) -> bool:
        """One (multipart) ZeroMQ message within the series' wait budget; False when dropped."""
        sock = self._socket(state)
        flags = zmq.SNDMORE if len(parts) > 1 else 0
        while True:
            try:
                sock.send(parts[0], flags | zmq.DONTWAIT, copy=len(parts[0]) < 65536)
                break
            except zmq.Again:
                if state.wait_left_s <= 0 or (stop is not None and stop.is_set()):
                    return False
                # slices, so a stop request is seen while waiting
                slice_s = min(state.wait_left_s, FAST_BATCH_SECONDS)
                t0 = time.monotonic()
                sock.poll(max(1, round(slice_s * 1000)), zmq.POLLOUT)
                state.wait_left_s -= time.monotonic() - t0
        # ZeroMQ takes the further parts of a message whose first part it took
        for i, part in enumerate(parts[1:], start=2):
            sock.send(part, zmq.SNDMORE if i < len(parts) else 0, copy=len(part) < 65536)
        return True

    def send_frames(self, series: SeriesInfo, first_frame: int, count: int, period_s: float,
                    stop: threading.Event) -> int:
        pacing_max = self._sim_config["pacing"] == "max"
        period = 0.0 if pacing_max else max(0.0, float(period_s))
        with self._lock:
            state = self._current
        if state is None or state.series.series_id != series.series_id or not series.stream_enabled:
            return _wait_exposure(count, period, stop)
        if not state.series_date:
            state.series_date = _now_rfc3339()
        own_count_time = series.trigger_mode == "inte" or series.count_time != state.series.count_time
        if own_count_time:
            # inte: this trigger's images start now and carry the trigger's count time
            # an image cannot start before the previous one stopped
            offset = max(time.monotonic_ns() - state.t0_ns, state.last_stop_ns)
            real_ns = round(series.count_time * 1e9)
            for i in range(count):
                state.trigger_starts_ns[first_frame + i] = offset + i * max(round(period * 1e9), real_ns)
            state.last_stop_ns = state.trigger_starts_ns[first_frame + count - 1] + real_ns
        if self._fast_path_usable(state) and not own_count_time:
            return self._send_frames_fast(state, first_frame, count, period, stop)
        return self._send_frames_python(state, series, first_frame, count, period, stop)

    def _send_frames_python(self, state: SeriesStream, series: SeriesInfo, first_frame: int, count: int,
                            period: float, stop: threading.Event) -> int:
        plan = state.plan
        t_start = time.monotonic()
        for i in range(count):
            if period > 0:
                delay = t_start + i * period - time.monotonic()
                if delay > 0 and stop.wait(delay):
                    return i
            if stop.is_set():
                return i
            k = first_frame + i
            if state.stopped:
                continue
            faults = plan.at(k)
            if "stall" in faults and stop.wait(faults["stall"].ms / 1000.0):
                return i
            with self._lock:
                if "drop" not in faults:
                    parts = self.frame_message(state, k, faults, series)
                    if "reorder" in faults:
                        state.held, state.held_frame = parts, k
                    else:
                        sent = self._send(state, parts, image=True, stop=stop)
                        self.frames_sent += sent
                        if sent and "duplicate" in faults:
                            self._send(state, parts)
                        if state.held is not None and state.held_frame == k - 1:
                            self._send(state, state.held, image=True, stop=stop)
                            state.held = None
                if plan.stop_after is not None and k >= plan.stop_after:
                    state.stopped = True
                if "rebind" in faults:
                    self.rebind(state.stream_format)
        return count

    # -- compiled fast path ------------------------------------------------------------------

    def _fast_path_usable(self, state: SeriesStream) -> bool:
        # The compiled loop sends each image as one multipart message: split_all images go
        # through the Python loop (split_header splits only the header, which Python sends).
        split_images = state.stream_format == "legacy" and state.v1_framing == "split_all"
        return (_fastsend is not None and self._sim_config["fast_path"] and not state.plan
                and state.replay is None and state.held is None and not split_images)

    def _fast_pool(self, state: SeriesStream) -> Any:
        if state.fast_pool is not None:
            return state.fast_pool
        series, gen = state.series, state.generator
        assert gen is not None
        appendix = str(series.stream_config.get("image_appendix", "") or "")
        key = (state.stream_format, series.series_id, series.series_unique_id, series.compression,
               id(gen), state.t0_ns, state.series_date, appendix, tuple(state.channels))
        entry = self._fast_pools.get(key)
        if entry is None:
            used = self._series_pool_indices(state)
            # The compiled pool holds only the frames the series shows: slot_of maps a pool frame
            # to its slot (-1, rejected by the pool's range check, for the frames it does not show).
            slot_of = np.full(gen.pool_size, -1, dtype=np.int64)
            slot_of[used] = np.arange(len(used), dtype=np.int64)
            encoded = [self._encoded(state, int(p)) for p in used]
            if state.stream_format == "legacy":
                pool = _fastsend.V1FramePool(**v1_fast_pieces(series.series_id, [e[0] for e in encoded],
                                                              state.real_ns, appendix))
            else:
                pool = _fastsend.V2FramePool(**v2_fast_pieces(
                    series.series_id, series.series_unique_id, state.series_date, state.real_ticks,
                    [list(zip(state.channels, e)) for e in encoded], appendix))
            entry = self._fast_pools[key] = (pool, slot_of)
        state.fast_pool = entry
        return entry

    def _release_idle_pools(self) -> None:
        """Forget the compiled pools of earlier series once ZeroMQ holds none of their bytes."""
        for key in [k for k, (pool, _) in self._fast_pools.items() if pool.in_flight == 0]:
            del self._fast_pools[key]

    def fast_pools_held(self) -> int:
        """Compiled pools kept alive because ZeroMQ may still hold some of their bytes."""
        with self._lock:
            return len(self._fast_pools)

    def _send_frames_fast(self, state: SeriesStream, first_frame: int, count: int, period: float,
                          stop: threading.Event) -> int:
        pool, slot_of = self._fast_pool(state)
        gen = state.generator
        assert gen is not None
        sock = self._socket(state)
        is_v1 = state.stream_format == "legacy"
        time_base, time_step = (state.t0_ns, state.frame_ns) if is_v1 else (0, state.frame_ticks)
        batch = count if period <= 0 else max(1, int(FAST_BATCH_SECONDS / period))
        batch = min(batch, 65536)
        t_start = time.monotonic()
        done = 0
        while done < count and not stop.is_set():
            n = min(batch, count - done)
            indices = np.ascontiguousarray(slot_of[gen.pool_index(np.arange(first_frame + done, first_frame + done + n,
                                                                            dtype=np.int64))], dtype=np.int64)
            # Wait in slices so that a stop request is seen while no consumer takes frames.
            wait_s = min(state.wait_left_s, FAST_BATCH_SECONDS)
            final_wait = state.wait_left_s <= FAST_BATCH_SECONDS
            handled, sent, dropped, waited = pool.send(sock.underlying, first_frame + done, indices, time_base,
                                                       time_step, t_start + done * period, period, wait_s,
                                                       final_wait)
            state.wait_left_s = max(0.0, state.wait_left_s - waited)
            self.frames_sent += sent
            self.dropped += dropped
            self._series_dropped += dropped
            done += handled
        return done


def _replace_v2_blob(encoded: encode.EncodedFrame, blob: bytes) -> encode.EncodedFrame:
    return encode.EncodedFrame(encoded.blob, encoded.v1_encoding, encoded.v2_algorithm, blob,
                               encoded.dtype, encoded.width, encoded.height)


def _wait_exposure(count: int, period: float, stop: threading.Event) -> int:
    """Stream off: take the time the exposures would take, in a deadline loop."""
    t_start = time.monotonic()
    for i in range(count):
        delay = t_start + (i + 1) * period - time.monotonic()
        if stop.wait(delay) if delay > 0 else stop.is_set():
            return i
    return count


def v1_fast_pieces(series_id: int, encoded: list[encode.EncodedFrame], real_ns: int,
                   appendix: str) -> dict[str, Any]:
    """The constant byte pieces the compiled v1 loop joins around per-frame numbers.

    Part 1 is ``{"frame":`` + k + ``dimage_suffix[p]``; part 4 is ``dconfig_prefix`` + start +
    ``,"stop_time":`` + stop + ``}\\n``. Keys are in sorted order, as ``encode.v1_json`` writes them.
    """
    dimage_d = [encode.v1_dimage_d(e) for e in encoded]
    suffixes = [(',"hash":"%s","htype":"dimage-1.0","series":%d}\n'
                 % (hashlib.md5(d).hexdigest(), series_id)).encode() for d in dimage_d]
    return {"dimage_suffixes": suffixes, "dimage_d": dimage_d, "blobs": [e.blob for e in encoded],
            "dconfig_prefix": b'{"htype":"dconfig-1.0","real_time":%d,"start_time":' % real_ns,
            "appendix": appendix.encode(), "real_ns": real_ns}


def v2_fast_pieces(series_id: int, series_unique_id: str, series_date: str, real_ticks: int,
                   channels_per_pool: list[list[tuple[str, encode.EncodedFrame]]],
                   appendix: str) -> dict[str, Any]:
    """The constant CBOR pieces of an image message around image_id, start and stop ticks."""
    dumps = cbor2.dumps
    n_keys = 9 + (1 if appendix else 0)
    prefix = (encode.SELF_DESCRIBE_PREFIX + bytes([0xA0 + n_keys]) + dumps("type") + dumps("image")
              + dumps("series_id") + dumps(series_id) + dumps("series_unique_id")
              + dumps(series_unique_id) + dumps("image_id"))
    after_id = (dumps("real_time") + dumps(encode.v2_rational(real_ticks)) + dumps("series_date")
                + dumps(encode.v2_datetime(series_date)) + dumps("start_time") + b"\x82")
    timebase = dumps(encode.V2_TIMEBASE)
    after_start = timebase + dumps("stop_time") + b"\x82"
    user_data = (dumps("user_data") + dumps(appendix)) if appendix else b""
    tails = [timebase + dumps("data") + dumps({name: encode.v2_image_array(e) for name, e in chans})
             + user_data for chans in channels_per_pool]
    return {"prefix": prefix, "after_id": after_id, "after_start": after_start, "tails": tails,
            "real_ticks": real_ticks}
