"""`make demo`: live 4D-STEM processing through the DectrisLive Tango device, end to end.

Starts an embedded Tango database, the detector simulator (an ARINA) and the ``tango-dectris-live``
server, then a client (a ``DeviceProxy``) that subscribes to every result attribute and the
progress scalars and runs

1. an ACTIVE scan: the device sets the image count from ``nav_shape``, arms, triggers, receives
   and processes (analyses sum, sumsig, bf, adf, com, last_frame) while the detector runs at its
   frame rate;
2. a PASSIVE acquisition: the device listens, the demo arms and triggers the simulator through its
   REST API as another program would, the device processes that series, then Stop.

It prints the events received per attribute, frames/s and missing frames, and writes a PNG per
result plus ``summary.json`` to ``demo-output/``. Everything listens on 127.0.0.1 with ports chosen
at run time; every process it started is stopped at the end, also on Ctrl-C or an error.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import requests
import tango

from result_images import NAN_COLOUR, write_png
from sim.data import ScanDataGenerator
from tango_dectris_live.device.embedded_db import EmbeddedTangoDatabase, stop_process
from tango_dectris_live.testing import EventRecorder, result_attributes, stop_leftovers, wait_for

DEVICE = "demo/dectris/1"
INSTANCE = "demo"
MODEL = "ARINA"  # 192×192 pixels, the 4D-STEM detector
ANALYSES = ("sum", "sumsig", "bf", "adf", "com", "last_frame")
PROGRESS_ATTRIBUTES = ("series_id", "frames_expected", "frames_received", "frames_processed",
                       "frames_missing", "progress", "receive_rate", "process_rate", "backlog",
                       "acquisition_status")
PEAK_ATTRIBUTES = ("receive_rate", "process_rate", "backlog")
# The simulator's bright-field disk has radius width/8 = 24 px and moves up to 12 px with the object;
# its halo is the ring 1.6..2.4 radii. The virtual detectors are sized to see both move.
# outer before inner: the ring must stay inner < outer at every write
VIRTUAL_DETECTORS = {"bf_radius": 20.0, "adf_outer_radius": 60.0, "adf_inner_radius": 30.0}
_LISTENING = re.compile(r"listening: rest=http://([\d.]+):(\d+) stream=tcp://[\d.]+:(\d+) "
                        r"stream2=tcp://[\d.]+:(\d+)")


class DemoFailure(RuntimeError):
    """A step of the demo did not do what it should; the message says which and what was seen."""


# -- processes ----------------------------------------------------------------------------------

class Simulator:
    """``python -m sim`` on 127.0.0.1 with free ports; its REST API for the "someone else" part."""

    def __init__(self, model: str, workdir: Path) -> None:
        self.model = model
        self._log_path = workdir / "simulator.log"
        self.proc: subprocess.Popen | None = None
        self.rest_port = self.stream_port = self.stream2_port = 0

    def start(self, timeout: float = 30.0) -> None:
        with open(self._log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "sim", "--host", "127.0.0.1", "--port", "0", "--stream-port", "0",
                 "--stream2-port", "0", "--model", self.model], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while (match := _LISTENING.search(self._log_path.read_text(errors="replace"))) is None:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise DemoFailure(f"the simulator did not start:\n{self._log_path.read_text(errors='replace')}")
            time.sleep(0.05)
        self.rest_port, self.stream_port, self.stream2_port = (int(match.group(i)) for i in (2, 3, 4))

    @property
    def rest_url(self) -> str:
        return f"http://127.0.0.1:{self.rest_port}"

    def put(self, module: str, task: str, key: str, value: Any = None) -> None:
        """A SIMPLON PUT, as a vendor GUI or a beamline script would send it."""
        body = None if value is None else {"value": value}
        reply = requests.put(f"{self.rest_url}/{module}/api/1.8.0/{task}/{key}", json=body, timeout=30)
        if reply.status_code != 200:
            raise DemoFailure(f"simulator refused {module}/{task}/{key}={value!r}: {reply.text}")

    def sim_config(self, **changes: Any) -> dict:
        """Simulator-only settings (pacing, nav_shape, ...); returns all of them."""
        if changes:
            requests.put(f"{self.rest_url}/sim/api/config", json=changes, timeout=10).raise_for_status()
        reply = requests.get(f"{self.rest_url}/sim/api/config", timeout=10)
        reply.raise_for_status()
        return reply.json()

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)


# -- the client ---------------------------------------------------------------------------------

def enum_index(proxy: tango.DeviceProxy, name: str, label: str) -> int:
    return list(proxy.get_attribute_config(name).enum_labels).index(label)


def wait_for_state(events: EventRecorder, state: tango.DevState, timeout: float) -> None:
    wait_for(lambda: (last := events.latest("State")) is not None and last.value == state, timeout,
             f"State {state} event")


def is_final(events: EventRecorder, result: str) -> bool:
    """The device pushes a final change event (VALID or WARNING) and then data-ready per result."""
    last = events.latest(result)
    return bool(events.data_ready(result)) and last is not None and last.quality != tango.AttrQuality.ATTR_CHANGING


def wait_for_final_results(events: EventRecorder, results: list[str], timeout: float) -> None:
    wait_for(lambda: all(is_final(events, name) for name in results), timeout,
             f"final result of {', '.join(results)}", interval=0.01)


def change_counts(events: EventRecorder, names: tuple[str, ...]) -> dict[str, int]:
    """Change events per attribute since the phase began (attributes without any left out)."""
    return {name.lower(): count for name in sorted(names, key=str.lower) if (count := events.change_count(name))}


def acquisition_figures(proxy: tango.DeviceProxy, events: EventRecorder, results: list[str], seconds: float,
                        output: Path, prefix: str) -> dict:
    """What one acquisition gave: counters, rates, events per attribute, the images written."""
    counters = {name: proxy.read_attribute(name).value for name in
                ("series_id", "frames_expected", "frames_received", "frames_processed", "frames_missing")}
    processed = int(counters["frames_processed"])
    samples = [int(value) for value in events.values("frames_processed")]
    peak = {name: max(map(float, events.values(name)), default=0.0) for name in PEAK_ATTRIBUTES}
    watched = ("State", *PROGRESS_ATTRIBUTES, *results)
    intermediate = {name.lower(): count for name in sorted(watched, key=str.lower) if (count := sum(
        event.quality == tango.AttrQuality.ATTR_CHANGING for event in events.changes(name)))}
    images = {}
    for name in results:
        final = np.asarray(events.latest(name).value, dtype=np.float64)
        read_back = proxy.read_attribute(name)
        if not np.array_equal(final, np.asarray(read_back.value, dtype=np.float64), equal_nan=True):
            raise DemoFailure(f"{name}: the final change event differs from a read of the attribute")
        info = write_png(final, output / f"{prefix}_{name}.png")
        info["quality"] = str(read_back.quality)
        images[name] = info
    return {
        **{k: int(v) for k, v in counters.items()},
        "seconds_start_to_final_event": round(seconds, 2),
        "frames_per_second_end_to_end": round(processed / seconds, 1) if seconds > 0 else None,
        "peak_receive_rate": round(peak["receive_rate"], 1),
        "peak_process_rate": round(peak["process_rate"], 1),
        "peak_backlog_slots": int(peak["backlog"]),
        "device_status": next((str(text) for text in reversed(events.values("acquisition_status"))
                               if str(text).startswith("series")), str(proxy.acquisition_status)),
        "change_events": change_counts(events, watched),
        "intermediate_result_events": intermediate,
        "data_ready_events": {name: count for name in sorted(results) if (count := len(events.data_ready(name)))},
        "error_events": dict(sorted(Counter(text.split(": ", 1)[0].lower() for text in events.errors).items())),
        "frames_processed_events_increasing": all(a <= b for a, b in zip(samples, samples[1:])),
        "images": images,
    }


def ground_truth_check(proxy: tango.DeviceProxy, simulator: Simulator, events: EventRecorder,
                       nav_shape: tuple[int, int], dropped: list[int]) -> dict:
    """Compare the integer results with the simulator's own ground truth of the frames it sent
    (``dropped``: frames it was told not to send, NaN in scan-shaped results)."""
    config = simulator.sim_config()
    dtype = f"uint{int(proxy.bit_depth_image)}"
    truth = ScanDataGenerator(int(proxy.x_pixels_in_detector), int(proxy.y_pixels_in_detector), dtype,
                              nav_shape=nav_shape, seed=config["seed"], dose=config["dose"],
                              pool_size=config["pool_size"])
    count = nav_shape[0] * nav_shape[1]
    sent = np.setdiff1d(np.arange(count), dropped)
    expected_sumsig = truth.sum_per_frame(range(count)).astype(np.float64)
    expected_sumsig[dropped] = np.nan
    sum_ok = np.array_equal(events.latest("sum_image").value, truth.sum_frames(sent).astype(np.float64))
    sumsig_ok = np.array_equal(events.latest("sumsig_image").value, expected_sumsig.reshape(nav_shape),
                               equal_nan=True)
    return {"sum_image_equals_ground_truth": bool(sum_ok), "sumsig_image_equals_ground_truth": bool(sumsig_ok)}


def print_figures(title: str, figures: dict) -> None:
    print(f"\n== {title} ==")
    print(f"  series {figures['series_id']}: {figures['frames_processed']} of {figures['frames_expected']} frames "
          f"processed, {figures['frames_received']} received, {figures['frames_missing']} missing")
    print(f"  Start/arm to final event: {figures['seconds_start_to_final_event']} s = "
          f"{figures['frames_per_second_end_to_end']} frames/s; peak receive "
          f"{figures['peak_receive_rate']} frames/s, peak process {figures['peak_process_rate']} frames/s, "
          f"peak backlog {figures['peak_backlog_slots']} slots")
    print(f"  device: {figures['device_status']}")
    print("  events received (change / of them intermediate / data-ready):")
    for name, count in figures["change_events"].items():
        print(f"    {name:22s} {count:5d} / {figures['intermediate_result_events'].get(name, 0):4d} / "
              f"{figures['data_ready_events'].get(name, 0)}")
    print("  final results (quality, NaN pixels, PNG):")
    for name, image in figures["images"].items():
        print(f"    {name:22s} {image['quality']:24s} {image['nan_pixels']:5d}  {image['file']}")
    for key in ("sum_image_equals_ground_truth", "sumsig_image_equals_ground_truth"):
        if key in figures:
            print(f"  {key}: {figures[key]}")


def run_active_scan(proxy: tango.DeviceProxy, events: EventRecorder, results: list[str], simulator: Simulator,
                    nav_shape: tuple[int, int], output: Path) -> dict:
    frames = nav_shape[0] * nav_shape[1]
    frame_time = float(proxy.frame_time)
    print(f"\nclient: ACTIVE scan {nav_shape[0]}×{nav_shape[1]} positions of "
          f"{proxy.y_pixels_in_detector}×{proxy.x_pixels_in_detector} frames at "
          f"{1 / frame_time:,.0f} frames/s (≈{frames * frame_time:.0f} s of exposure)")
    proxy.nav_shape = list(nav_shape)
    simulator.sim_config(pacing="frame_time", nav_shape=list(nav_shape))
    events.clear()
    started = time.monotonic()
    proxy.Start()
    wait_for_final_results(events, results, timeout=frames * frame_time + 120)
    seconds = time.monotonic() - started
    wait_for_state(events, tango.DevState.ON, 30)
    return acquisition_figures(proxy, events, results, seconds, output, "active")


def saved_series(proxy: tango.DeviceProxy, output: Path) -> dict:
    """Wait for the series file to be closed; what it holds, read back with h5py + hdf5plugin."""
    import h5py
    import hdf5plugin  # noqa: F401 - the filters that decode the saved frames

    wait_for(lambda: str(proxy.saving_status).startswith(("saved", "saving stopped")), 120,
             lambda: f"the series file closed ({proxy.saving_status})")
    path = Path(proxy.last_saved_file)
    with h5py.File(path, "r") as f:
        frames = f["/entry/data/data"]
        stored = int(np.count_nonzero([frames.id.get_chunk_info_by_coord((i, 0, 0)).size
                                       for i in range(frames.shape[0])])) if frames.shape[0] else 0
        first = frames[0] if stored else None
        results = sorted(f"{analysis}/{name}" for analysis in f["/entry/results"]
                         if isinstance(f["/entry/results"][analysis], h5py.Group)
                         for name in f["/entry/results"][analysis] if not name.endswith("_plot"))
        missing = f["/entry/data/missing_frames"][...].tolist()
    print(f"  saved {path.relative_to(output.resolve())}: {stored} frames (compressed as received), "
          f"{len(missing)} missing, results {', '.join(results)}")
    return {"file": str(path.relative_to(output.resolve())), "frames_in_file": stored, "missing_frames": missing,
            "results_in_file": results, "saving_status": str(proxy.saving_status),
            "first_frame_sum": float(first.sum()) if first is not None else None}


def diagonal_frames(nav_shape: tuple[int, int]) -> list[int]:
    """Frame numbers on the scan's diagonal: dropped in the passive series, a red line in the images."""
    rows, columns = nav_shape
    return [k * columns + k for k in range(min(rows, columns))]


def run_passive_acquisition(proxy: tango.DeviceProxy, events: EventRecorder, results: list[str], simulator: Simulator,
                            nav_shape: tuple[int, int], dropped: list[int], output: Path) -> dict:
    frames = nav_shape[0] * nav_shape[1]
    print(f"\nclient: PASSIVE: Listen; then a series of {frames} frames armed and triggered from outside "
          f"through the simulator's REST API, sent as fast as the simulator can; the simulator drops the "
          f"{len(dropped)} frames of the scan's diagonal (NaN, red in the scan images)")
    events.clear()
    proxy.Listen()
    wait_for(lambda: (statuses := events.values("acquisition_status")) and statuses[-1].startswith("listening"),
             60, "'listening' acquisition_status event")
    # Someone else (a vendor GUI, a Sardana macro) sets up and runs a series on the detector.
    simulator.sim_config(pacing="max", nav_shape=list(nav_shape), faults=[{"kind": "drop", "frames": dropped}])
    simulator.put("detector", "config", "ntrigger", 1)
    simulator.put("detector", "config", "nimages", frames)
    started = time.monotonic()
    simulator.put("detector", "command", "arm")
    simulator.put("detector", "command", "trigger")
    wait_for_final_results(events, results, timeout=120)
    seconds = time.monotonic() - started
    print("client: Stop (the device stops listening)")
    proxy.Stop()
    wait_for_state(events, tango.DevState.ON, 30)
    figures = acquisition_figures(proxy, events, results, seconds, output, "passive")
    figures["status_after_stop"] = proxy.status()
    return figures


def run(output: Path, nav_shape: tuple[int, int], passive_shape: tuple[int, int], frame_time: float) -> dict:
    output.mkdir(parents=True, exist_ok=True)
    for old in (*output.glob("*.png"), *output.glob("series/*.h5")):
        old.unlink()
    summary: dict = {"model": MODEL, "analyses": list(ANALYSES), "nan_colour_rgb": list(NAN_COLOUR)}
    workdir = Path(tempfile.mkdtemp(prefix="dectris-live-demo-"))
    db = EmbeddedTangoDatabase()
    simulator = Simulator(MODEL, workdir)
    try:
        db.start()
        print(f"embedded Tango database on {db.tango_host}")
        simulator.start()
        print(f"simulator ({MODEL}) REST {simulator.rest_url}, stream v1 port {simulator.stream_port}, "
              f"v2 port {simulator.stream2_port}")
        db.register_device(INSTANCE, DEVICE, {
            "DcuHost": "127.0.0.1", "DcuPort": simulator.rest_port, "StreamPort": simulator.stream_port,
            "Stream2Port": simulator.stream2_port, "StatePollPeriod": 0.2,
            "SavingBaseDirectory": str(output.resolve())})
        db.start_server(INSTANCE, DEVICE)
        print(f"device server DectrisLive/{INSTANCE} exports {DEVICE}")

        proxy = tango.DeviceProxy(f"tango://{db.tango_host}/{DEVICE}")
        proxy.set_timeout_millis(10000)
        results = result_attributes(proxy, ANALYSES)
        watched = ("State", *PROGRESS_ATTRIBUTES, *results)
        with EventRecorder(proxy, changes=watched, data_ready=tuple(results)) as events:
            print(f"client: subscribed to State, {len(PROGRESS_ATTRIBUTES)} progress attributes and "
                  f"{len(results)} result attributes ({', '.join(results)})")

            print("client: Initialize")
            proxy.Initialize()
            wait_for_state(events, tango.DevState.ON, 120)
            proxy.trigger_mode = enum_index(proxy, "trigger_mode", "ints")
            proxy.count_time = frame_time
            proxy.frame_time = frame_time
            proxy.stream_format = enum_index(proxy, "stream_format", "cbor")
            proxy.analyses = list(ANALYSES)
            for name, value in VIRTUAL_DETECTORS.items():
                proxy.write_attribute(name, value)
            proxy.result_event_rate = 10.0
            proxy.saving_mode = "results_and_frames"
            proxy.saving_directory = "series"
            proxy.saving_name_pattern = "demo_{date}_series_{series_id}.h5"
            print(f"client: saving {proxy.saving_mode} below {output.resolve()}/series")
            print(f"client: analyses {list(proxy.analyses)}, beam centre from the detector "
                  f"({proxy.beam_center_x}, {proxy.beam_center_y}) px, "
                  + ", ".join(f"{k} {v:g} px" for k, v in VIRTUAL_DETECTORS.items()))
            summary["subscription_events"] = change_counts(events, watched)  # the active scan clears them

            active = run_active_scan(proxy, events, results, simulator, nav_shape, output)
            active.update(ground_truth_check(proxy, simulator, events, nav_shape, dropped=[]))
            print_figures("active scan", active)
            active["saved"] = saved_series(proxy, output)
            dropped = diagonal_frames(passive_shape)
            passive = run_passive_acquisition(proxy, events, results, simulator, passive_shape, dropped, output)
            passive.update(ground_truth_check(proxy, simulator, events, passive_shape, dropped))
            print_figures("passive acquisition", passive)
            passive["saved"] = saved_series(proxy, output)
            summary.update(active=active, passive=passive)
    finally:
        # A second Ctrl-C must not cut the clean-up short.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        started = psutil.Process().children(recursive=True)
        db.stop()
        simulator.stop()
        killed = stop_leftovers(started)
        shutil.rmtree(workdir, ignore_errors=True)
        summary["leftover_processes_killed"] = killed
        (output / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        print(f"\nwrote {len(list(output.glob('*.png')))} PNG images and {output / 'summary.json'}; "
              + ("all processes stopped" if not killed else f"had to kill {len(killed)}: {killed}"))
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=Path("demo-output"))
    parser.add_argument("--scan", type=int, nargs=2, default=(128, 128), metavar=("ROWS", "COLUMNS"),
                        help="active scan shape (default 128 128)")
    parser.add_argument("--passive-scan", type=int, nargs=2, default=(64, 64), metavar=("ROWS", "COLUMNS"),
                        help="shape of the series armed from outside (default 64 64)")
    parser.add_argument("--frame-time", type=float, default=0.001,
                        help="detector frame time in seconds for the active scan (default 0.001: 1 kHz)")
    args = parser.parse_args()
    # SIGTERM (a CI runner, `kill`) cleans up like Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        run(args.output, tuple(args.scan), tuple(args.passive_scan), args.frame_time)
    except KeyboardInterrupt:
        sys.exit("interrupted; all processes stopped")
    except (DemoFailure, TimeoutError, tango.DevFailed) as exc:
        detail = exc.args[0].desc if isinstance(exc, tango.DevFailed) else str(exc)
        sys.exit(f"demo failed: {detail}")


if __name__ == "__main__":
    main()
