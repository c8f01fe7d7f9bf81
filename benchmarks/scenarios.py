"""The benchmark scenarios of issue 6, the simulator they run against, and their ground truth.

* :data:`SCENARIOS` / :func:`scenario_by_name`: detector, geometry, frame count and scan shape of
  each scenario; :meth:`Scenario.quick` is the same scenario with 1/8 of the frames.
* :data:`ANALYSIS_SETS`: the analyses measured (names of the project's analyses registry).
* :class:`SimulatorProcess`: a :class:`sim.server.SimulatorServer` in its own process on free
  loopback ports (so its CPU time and memory are measured apart from the consumer's).
* :class:`SimulatorControl`: configures, arms and triggers it over SIMPLON REST + ``/sim/api/config``.
* :func:`ground_truth` / :func:`check_results`: the expected results, computed from the
  simulator's data generator for exactly the frames it sends, and the comparison.

Timing figures come from :mod:`benchmarks.bench_pipeline` and :mod:`benchmarks.bench_libertem_live`.
"""
from __future__ import annotations

import dataclasses
import datetime
import multiprocessing
import os
import platform
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager, Mapping

import numpy as np
import requests

API = "1.8.0"
REST_TIMEOUT_S = 600.0  # a trigger answers only once its frames are sent

# ---------------------------------------------------------------------------------------------
# Scenarios


@dataclass(frozen=True)
class Scenario:
    """One detector stream to process: REST settings of the simulator and what they produce."""

    name: str
    description: str
    model: str  # sim.models preset
    detector_config: tuple[tuple[str, Any], ...]  # written in this order (roi/binning first)
    frame_shape: tuple[int, int]  # (height, width)
    dtype: str
    frames: int
    nav_shape: tuple[int, int]
    # the highest rate the simulator sends this stream at (upper end of the real-time search);
    # ARINA: pixel_format uint16 keeps 16 bit up to the binned/unbinned 8-bit rates
    max_rate_hz: float
    substitute_note: str = ""  # what differs from issue 6's scenario, if anything

    @property
    def frame_bytes(self) -> int:
        """Uncompressed bytes per frame."""
        return self.frame_shape[0] * self.frame_shape[1] * np.dtype(self.dtype).itemsize

    def quick(self) -> Scenario:
        """The same stream with 1/8 of the frames (scan height / 4, width / 2)."""
        nav = (max(1, self.nav_shape[0] // 4), max(1, self.nav_shape[1] // 2))
        return dataclasses.replace(self, name=self.name + "-quick", frames=nav[0] * nav[1], nav_shape=nav)


SCENARIOS: tuple[Scenario, ...] = (
    Scenario("arina96", "ARINA binned 96x96 uint16, scan 256x256", "ARINA",
             (("binning_mode", "2x2"), ("pixel_format", "uint16"), ("frame_time", 1 / 60000)),
             (96, 96), "uint16", 65536, (256, 256), 120000.0),
    Scenario("arina192", "ARINA 192x192 uint16, scan 128x128", "ARINA",
             (("binning_mode", "disabled"), ("pixel_format", "uint16"), ("frame_time", 1 / 15000)),
             (192, 192), "uint16", 16384, (128, 128), 30000.0),
    Scenario("quadro512", "QUADRO 512x512 uint16, scan 64x64", "QUADRO",
             # auto_summation off keeps 16 bit at slow paced rates too (it would give 32 bit below 1 kHz)
             (("roi_mode", "disabled"), ("auto_summation", False), ("frame_time", 1 / 4500)),
             (512, 512), "uint16", 4096, (64, 64), 4500.0),
    # auto_summation at 500 Hz gives 32-bit images
    Scenario("eiger2-1m-like", "EIGER2 1M 1028x1062 uint32, scan 16x32",
             "EIGER2_1M", (("auto_summation", True), ("frame_time", 1 / 500)),
             (1062, 1028), "uint32", 512, (16, 32), 500.0),
)

ANALYSIS_SETS: Mapping[str, tuple[str, ...]] = {
    "sum+sumsig": ("sum", "sumsig"),
    "bf+adf+com": ("bf", "adf", "com"),
}


def scenario_by_name(name: str) -> Scenario:
    """A scenario of :data:`SCENARIOS`; a ``-quick`` suffix gives its :meth:`Scenario.quick` form."""
    base = name.removesuffix("-quick")
    for scenario in SCENARIOS:
        if scenario.name == base:
            return scenario.quick() if name.endswith("-quick") else scenario
    raise ValueError(f"unknown scenario {name!r}; choose one of "
                     f"{', '.join(s.name for s in SCENARIOS)} (optionally with -quick)")


def analyses_by_name(name: str) -> tuple[str, ...]:
    try:
        return ANALYSIS_SETS[name]
    except KeyError:
        raise ValueError(f"unknown analysis set {name!r}; choose one of {', '.join(ANALYSIS_SETS)}") from None


# ---------------------------------------------------------------------------------------------
# The simulator in its own process


def _serve_simulator(model: str, ports: Any, stop: Any) -> None:
    from sim.server import SimulatorServer

    with SimulatorServer(host="127.0.0.1", port=0, stream_port=0, stream2_port=0, model=model) as server:
        ports.put((server.port, server.stream_port, server.stream2_port))
        stop.wait()


class SimulatorProcess:
    """A simulated DCU of ``model`` in a spawned process, on free loopback ports."""

    def __init__(self, model: str, start_timeout: float = 60.0, serve: Any = None, extra_args: tuple = ()) -> None:
        """``serve(model, ports, stop, *extra_args)``: another simulator server function (default: the plain one)."""
        context = multiprocessing.get_context("spawn")
        self._stop = context.Event()
        ports = context.Queue()
        self.process = context.Process(target=serve or _serve_simulator, args=(model, ports, self._stop, *extra_args),
                                       name=f"dectris-sim-{model}", daemon=True)
        self.process.start()
        try:
            self.rest_port, self.stream_port, self.stream2_port = ports.get(timeout=start_timeout)
        except Exception:
            self.close()
            raise
        self.rest_url = f"http://127.0.0.1:{self.rest_port}"

    @property
    def pid(self) -> int:
        return int(self.process.pid)

    def stream_endpoint(self, stream_format: str) -> str:
        port = self.stream_port if stream_format == "legacy" else self.stream2_port
        return f"tcp://127.0.0.1:{port}"

    def close(self) -> None:
        self._stop.set()
        self.process.join(30)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()

    def __enter__(self) -> SimulatorProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class SimulatorControl:
    """SIMPLON REST client for what the benchmarks do with the simulator."""

    def __init__(self, rest_url: str) -> None:
        self.rest_url = rest_url
        self._session = requests.Session()

    def _put(self, path: str, body: Any = None) -> Any:
        response = self._session.put(self.rest_url + path, json=body, timeout=REST_TIMEOUT_S)
        if response.status_code != 200:
            raise RuntimeError(f"simulator refused PUT {path} {body!r}: {response.status_code} {response.text}")
        return response.json() if response.content else None

    def get_detector_config(self, key: str) -> Any:
        response = self._session.get(f"{self.rest_url}/detector/api/{API}/config/{key}", timeout=30)
        response.raise_for_status()
        return response.json()["value"]

    def put_config(self, module: str, key: str, value: Any) -> None:
        self._put(f"/{module}/api/{API}/config/{key}", {"value": value})

    def command(self, name: str) -> Any:
        return self._put(f"/detector/api/{API}/command/{name}")

    def prepare(self, scenario: Scenario, *, stream_format: str = "legacy", header_detail: str = "basic",
                frame_rate: float | None = None, pool_size: int = 64) -> None:
        """Initialize and configure one series of ``scenario``: pacing "max" unless ``frame_rate``
        (Hz) is given, then the simulator sends at that rate (frame_time = 1 / frame_rate)."""
        self.command("initialize")
        for key, value in scenario.detector_config:
            self.put_config("detector", key, value)
        if frame_rate is not None:
            self.put_config("detector", "frame_time", 1.0 / frame_rate)
        self.put_config("detector", "compression", "bslz4")
        self.put_config("detector", "trigger_mode", "ints")
        self.put_config("detector", "ntrigger", 1)
        self.put_config("detector", "nimages", scenario.frames)
        self.put_config("stream", "mode", "enabled")
        self.put_config("stream", "format", stream_format)
        self.put_config("stream", "header_detail", header_detail)
        self._put("/sim/api/config", {"pacing": "max" if frame_rate is None else "frame_time",
                                      "pool_size": pool_size, "nav_shape": list(scenario.nav_shape),
                                      "faults": [], "send_timeout_ms": 60_000})
        self._check_geometry(scenario)

    def _check_geometry(self, scenario: Scenario) -> None:
        width = self.get_detector_config("x_pixels_in_detector")
        height = self.get_detector_config("y_pixels_in_detector")
        bits = self.get_detector_config("bit_depth_image")
        if (height, width) != scenario.frame_shape or bits != np.dtype(scenario.dtype).itemsize * 8:
            raise RuntimeError(f"{scenario.name}: the simulator is set to {width}x{height} {bits} bit, "
                               f"not {scenario.frame_shape[1]}x{scenario.frame_shape[0]} {scenario.dtype}")

    def set_pacing(self, scenario: Scenario, frame_rate: float | None) -> None:
        """Send the next series as fast as possible (None) or at ``frame_rate`` Hz."""
        frame_time = 1.0 / frame_rate if frame_rate is not None else dict(scenario.detector_config)["frame_time"]
        self.put_config("detector", "frame_time", frame_time)
        self._put("/sim/api/config", {"pacing": "max" if frame_rate is None else "frame_time"})
        self._check_geometry(scenario)

    def sim_config(self) -> dict[str, Any]:
        response = self._session.get(self.rest_url + "/sim/api/config", timeout=30)
        response.raise_for_status()
        return response.json()

    def arm(self) -> int:
        """Arm; returns the series id."""
        return int(self.command("arm")["sequence id"])

    def close(self) -> None:
        self._session.close()


class TriggerThread:
    """Sends the (blocking) software trigger from a thread; ``sent_at`` is the monotonic time at
    which the simulator had handed its last frame to ZeroMQ."""

    def __init__(self, control: SimulatorControl, on_sent: Callable[[], None] | None = None) -> None:
        self._control = control
        self._on_sent = on_sent  # called on the trigger thread right after sent_at (a probe)
        self.started_at = 0.0
        self.sent_at = 0.0
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="sim-trigger", daemon=True)

    def _run(self) -> None:
        try:
            self.started_at = time.perf_counter()
            self._control.command("trigger")
            self.sent_at = time.perf_counter()
            if self._on_sent is not None:
                self._on_sent()
        except BaseException as error:  # reported by join()
            self.error = error

    def start(self) -> TriggerThread:
        self._thread.start()
        return self

    def join(self, timeout: float = REST_TIMEOUT_S) -> None:
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"the simulator's trigger did not return within {timeout} s")
        if self.error is not None:
            raise RuntimeError(f"trigger failed: {self.error}") from self.error


# ---------------------------------------------------------------------------------------------
# Ground truth


def _generator(scenario: Scenario, sim_config: Mapping[str, Any]):
    """The simulator's data generator for ``scenario`` with its current settings."""
    from sim.data import ScanDataGenerator

    height, width = scenario.frame_shape
    return ScanDataGenerator(width, height, scenario.dtype, nav_shape=tuple(sim_config["nav_shape"]),
                             seed=sim_config["seed"], dose=sim_config["dose"], pool_size=sim_config["pool_size"],
                             mask_to_zero=False)


def ground_truth(scenario: Scenario, analyses: tuple[str, ...], sim_config: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Expected final results (the project's result names) for the frames the simulator sends.

    The fast path sends pool frame ``pool_index(k)`` as frame ``k``; per-frame values are computed
    once per pool frame and spread over the scan with that mapping.
    """
    from libertem import masks

    from tango_dectris_live.processing.analyses import AnalysisParameters

    gen = _generator(scenario, sim_config)
    index = gen.pool_index(np.arange(scenario.frames, dtype=np.int64)).reshape(scenario.nav_shape)
    pool = [gen.pool_frame(p).astype(np.float64) for p in range(gen.pool_size)]
    params = AnalysisParameters().resolved(scenario.frame_shape)
    height, width = scenario.frame_shape
    cy, cx = params.beam_centre
    truth: dict[str, np.ndarray] = {}
    if "sum" in analyses:
        truth["sum_image"] = gen.sum_frames(range(scenario.frames)).astype(np.float64)
    if "sumsig" in analyses:
        truth["sumsig_image"] = np.array([f.sum() for f in pool])[index]
    if "bf" in analyses:
        disk = masks.circular(centerX=cx, centerY=cy, imageSizeX=width, imageSizeY=height,
                              radius=params.bf_radius).astype(np.float64)
        truth["bf_image"] = np.array([(f * disk).sum() for f in pool])[index]
    if "adf" in analyses:
        ring = masks.ring(centerX=cx, centerY=cy, imageSizeX=width, imageSizeY=height,
                          radius=params.adf_outer_radius, radius_inner=params.adf_inner_radius).astype(np.float64)
        truth["adf_image"] = np.array([(f * ring).sum() for f in pool])[index]
    if "com" in analyses:
        yy = np.arange(scenario.frame_shape[0], dtype=np.float64)[:, None]
        xx = np.arange(scenario.frame_shape[1], dtype=np.float64)[None, :]
        com_y = np.array([(f * yy).sum() / f.sum() - cy for f in pool])
        com_x = np.array([(f * xx).sum() / f.sum() - cx for f in pool])
        truth["com_y_image"] = com_y[index]
        truth["com_x_image"] = com_x[index]
    return truth


# Per-frame values (sumsig, bf, adf) are exact enough for 1e-5 relative, which catches a single
# missing or misplaced frame (its position is NaN or holds another frame's value).
_RTOL = {"com_x_image": 1e-4, "com_y_image": 1e-4}
_ATOL = {"com_x_image": 1e-3, "com_y_image": 1e-3}
# LiberTEM's SumUDF accumulates in float32: over 65,536 frames ~1e-4 relative rounding; the
# project's sum is exact (float64 from integers).
FLOAT32_SUM_RTOL = 2e-3
EXACT_SUM_RTOL = 1e-12


def check_results(results: Mapping[str, np.ndarray], truth: Mapping[str, np.ndarray],
                  sum_rtol: float = EXACT_SUM_RTOL) -> list[str]:
    """What is wrong with ``results`` (empty when every result equals the ground truth).
    ``sum_rtol`` is relative to the largest value of the sum image."""
    problems = []
    for name, expected in truth.items():
        got = results.get(name)
        if got is None:
            problems.append(f"{name}: missing")
            continue
        got = np.asarray(got, dtype=np.float64)
        if got.shape != expected.shape:
            problems.append(f"{name}: shape {got.shape}, expected {expected.shape}")
            continue
        if name == "sum_image":
            rtol, atol = 0.0, sum_rtol * float(np.abs(expected).max())
        else:
            rtol, atol = _RTOL.get(name, 1e-5), _ATOL.get(name, 0.0)
        bad = ~np.isclose(got, expected, rtol=rtol, atol=atol)
        if bad.any():
            first = np.unravel_index(int(np.flatnonzero(bad)[0]), bad.shape)
            problems.append(f"{name}: {int(bad.sum())} of {bad.size} values differ, first at "
                            f"{tuple(int(i) for i in first)}: {got[first]!r} != {expected[first]!r}")
    return problems


# ---------------------------------------------------------------------------------------------
# CPU time and memory from /proc (no psutil)

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int, tid: int | None) -> list[str]:
    """/proc/<pid>[/task/<tid>]/stat from its field 3 on (the command name may hold spaces)."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    with open(path) as stat:
        return stat.read().rsplit(")", 1)[1].split()


def cpu_seconds(pid: int, tid: int | None = None) -> float:
    """User + system CPU seconds of a process (all its threads) or of one of its threads."""
    fields = _stat_fields(pid, tid)
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS  # utime, stime (fields 14, 15)


def minor_faults(pid: int, tid: int | None = None) -> int:
    """Minor page faults so far of a process (all its threads) or of one of its threads."""
    return int(_stat_fields(pid, tid)[7])  # minflt (field 10)


def peak_rss_mb(pid: int) -> float:
    """VmHWM (peak resident set) of a process in MB."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e6
    return 0.0


def reset_peak_rss(pid: int) -> None:
    """Reset VmHWM (Linux clear_refs "5"); silently keeps the lifetime peak where not permitted."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        pass  # not our process, or a kernel without it: the peak then covers the process lifetime


def child_pids(pid: int) -> list[int]:
    """Direct children of ``pid`` (from /proc/<pid>/task/*/children)."""
    children: list[int] = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as handle:
                children.extend(int(c) for c in handle.read().split())
        except FileNotFoundError:
            continue  # the thread ended meanwhile
    return children


def worker_pids(exclude: set[int]) -> list[int]:
    """This process' children that are worker processes (not the simulator, not multiprocessing's
    resource tracker)."""
    workers = []
    for pid in child_pids(os.getpid()):
        if pid in exclude:
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                cmdline = handle.read()
        except FileNotFoundError:
            continue
        if b"resource_tracker" in cmdline:
            continue
        workers.append(pid)
    return workers


def thread_id(name_prefix: str) -> int | None:
    """Native id of this process' first live Python thread whose name starts with ``name_prefix``."""
    for thread in threading.enumerate():
        if thread.name.startswith(name_prefix) and thread.native_id is not None:
            return thread.native_id
    return None


def record_header(load_before: tuple[float, ...], load_after: tuple[float, ...] | None = None) -> dict[str, Any]:
    """When, how and where a benchmark record (benchmarks/results/*.json) was measured: the date,
    the command line, the machine and its load average before and after (default: now)."""
    after = os.getloadavg() if load_after is None else load_after
    return {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                        "load_average_before": [round(x, 2) for x in load_before],
                        "load_average_after": [round(x, 2) for x in after]}}


def median(values: list[float]) -> float:
    return float(np.median(values)) if values else float("nan")


# ---------------------------------------------------------------------------------------------
# Figures of one run


@dataclass
class RunFigures:
    """What one processed series measured (one row of a benchmark before taking medians)."""

    scenario: str
    depth: str  # "pipeline" (ours, no Tango) or "libertem-live"
    analyses: str
    frames: int
    elapsed_s: float  # trigger sent -> final result available
    frames_per_s: float
    mb_per_s: float  # uncompressed frame bytes per second
    latency_ms: float  # simulator's last frame handed to ZeroMQ -> final result available
    sim_send_s: float  # how long the simulator took to send the series
    cpu_s: dict[str, float]  # per component
    peak_mb: float  # sum of the processes' peak RSS (shared memory counted in each process)
    correct: bool
    problems: list[str]
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def figures_from_timing(scenario: Scenario, depth: str, analyses: str, trigger: TriggerThread, finished_at: float,
                        cpu_s: dict[str, float], peak_mb: float, problems: list[str],
                        extra: dict[str, Any] | None = None) -> RunFigures:
    elapsed = finished_at - trigger.started_at
    return RunFigures(
        scenario=scenario.name, depth=depth, analyses=analyses, frames=scenario.frames, elapsed_s=elapsed,
        frames_per_s=scenario.frames / elapsed, mb_per_s=scenario.frames * scenario.frame_bytes / elapsed / 1e6,
        latency_ms=(finished_at - trigger.sent_at) * 1e3, sim_send_s=trigger.sent_at - trigger.started_at,
        cpu_s={k: round(v, 3) for k, v in cpu_s.items()}, peak_mb=round(peak_mb, 1), correct=not problems,
        problems=problems, extra=extra or {})


def measure_series(make_bench: Callable[[], ContextManager[Any]], runs: int, warmup: int) -> list[RunFigures]:
    """With one bench (``make_bench()``, a context manager with ``run_once()``): ``warmup``
    unreported series (worker imports, first allocations), then ``runs`` measured ones."""
    with make_bench() as bench:
        for _ in range(warmup):
            bench.run_once()
        return [bench.run_once() for _ in range(runs)]


def add_run_arguments(parser: Any) -> None:
    """The command-line options every depth's benchmark shares."""
    parser.add_argument("--scenario", default="quadro512-quick", help="scenario name (suffix -quick: 1/8 frames)")
    parser.add_argument("--analyses", default="sum+sumsig", help="sum+sumsig or bf+adf+com")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--workers", type=int, default=2)


class ClosingBench:
    """A bench as a context manager: ``close()`` on leaving the ``with`` block."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
