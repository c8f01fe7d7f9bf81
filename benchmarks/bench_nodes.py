"""Scale-out (issue 22): one simulated stream, the single device vs. a merging device with 1, 2 and 3 node devices.

As a facility deploys it: an embedded Tango database; the simulator (ARINA binned 96x96 uint16,
bslz4, pacing max) in a process of its own, spawned by this benchmark; three node devices
(``Role node``), each in a ``tango-dectris-live`` server process of its own with ``--workers``
worker processes (its children); one single device (``Role single``, same workers) in its own
server; and, for each node count, a merging device (``Role merger``, ``Nodes`` = the first 1, 2
or 3 node devices) in a server of its own, started for its series and stopped after them (an idle
merger still subscribes to the nodes' partial results, which would cost CPU during the others'
series).

Each run is one series as a user waits for it: the interval runs from just before the client calls
``proxy.Start()`` on the device under test until the client has received both the data-ready
event of ``sum_image`` (pushed once, with the final result) and the State ON change event that
follows the RUNNING of this Start. frames/s = frames / that interval. Every run's results are read
back and checked against the simulator's ground truth (and frames_processed / frames_missing).

CPU seconds (utime + stime from /proc/<pid>/stat) are taken before the Start and after the end,
per process tree: each server process plus its children (the workers), the simulator process, and
this process (the client: Start, events). Per-frame costs: node = the nodes' trees (receiver +
Tango + publishing in the server process, decoding + analyses in the workers, partial results) /
frames; merger = its tree per series, and per partial result it received (the node's
``partial_results`` sequence numbers, read before and after each run, count them).

A second, in-process part (``--merge-scans``) times what the merger does per partial result --
decode one node's message, merge the latest partials of N nodes (LiberTEM merge, from fresh
buffers, as ``MergedRun.snapshot`` does) -- and what a node does to send one (copy + encode), for
several scan sizes: the merge's cost grows with the scan, not with the frame rate.

    .venv/bin/python benchmarks/bench_nodes.py --runs 1 --warmup 0 --scan 32 32 --analyses sums
    .venv/bin/python benchmarks/bench_nodes.py --json benchmarks/results/$(date +%F)-nodes.json
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import signal
import struct
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import tango

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import scenarios  # noqa: E402
from benchmarks.scenarios import (  # noqa: E402
    record_header,
    Scenario, SimulatorControl, SimulatorProcess, check_results, child_pids, cpu_seconds, ground_truth, median,
    scenario_by_name)
from benchmarks.start_timer import StartTimer  # noqa: E402
from tango_dectris_live.device.embedded_db import EmbeddedTangoDatabase, stop_process  # noqa: E402
from tango_dectris_live.processing.analyses import AnalysisParameters  # noqa: E402
from tango_dectris_live.testing import result_attributes, stop_leftovers, wait_for  # noqa: E402

ANALYSIS_SETS = {"sums": ("sum", "sumsig"), "all": ("sum", "sumsig", "bf", "adf", "com")}
CONFIGS = ("single", "1 node", "2 nodes", "3 nodes")
NODES = [f"bench/dlnode/{i}" for i in (1, 2, 3)]
SINGLE = "bench/dlsingle/1"
STARTUP_TIMEOUT_S = 180.0
RUN_TIMEOUT_S = 300.0
_LENGTH = struct.Struct("<I")


def merger_name(count: int) -> str:
    return f"bench/dlmerge/{count}"


def node_count(config: str) -> int:
    return 0 if config == "single" else int(config.split()[0])


# ---------------------------------------------------------------------------------------------
# CPU per process tree

def tree_cpu(pid: int) -> dict[str, float]:
    """CPU seconds of ``pid`` itself ("main") and of all its descendants ("children": the workers);
    a process that ends meanwhile counts 0 from then on."""
    def descendants(root: int) -> list[int]:
        try:
            direct = child_pids(root)
        except FileNotFoundError:
            return []
        return [p for child in direct for p in (child, *descendants(child))]

    children = 0.0
    for child in descendants(pid):
        try:
            children += cpu_seconds(child)
        except FileNotFoundError:
            continue
    return {"main": cpu_seconds(pid), "children": children}


def _difference(after: dict[str, dict[str, float]], before: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    return {name: {part: after[name][part] - before[name].get(part, 0.0) for part in after[name]} for name in after}


def partial_header(value: Any) -> tuple[dict[str, Any], int]:
    """The JSON header of a ``partial_results`` DevEncoded value and its size in bytes ({} before
    a node's first series)."""
    if not value or len(value) != 2 or not value[1]:
        return {}, 0
    data = bytes(value[1])
    (length,) = _LENGTH.unpack_from(data)
    return json.loads(data[_LENGTH.size:_LENGTH.size + length]), len(data)


# ---------------------------------------------------------------------------------------------
# Start -> final result and State ON, as a client sees it

def run_series(timer: StartTimer) -> tuple[float, float, float]:
    """Start one series; (started, final result received, State ON received), perf_counter."""
    proxy = timer.proxy
    wait_for(lambda: proxy.state() == tango.DevState.ON, 60, lambda: f"State ON ({proxy.status()})")
    started = timer.start()
    result_at, on_at = timer.wait(RUN_TIMEOUT_S)
    return started, result_at, on_at


# ---------------------------------------------------------------------------------------------
# The deployment

class Deployment:
    """Simulator, Tango database, node servers, single server; a merger server per node count on demand."""

    def __init__(self, scenario: Scenario, workers: int, stream_format: str, state_poll: float) -> None:
        self.scenario = scenario
        self.workers = workers
        self.state_poll = state_poll
        self.db = EmbeddedTangoDatabase()
        self.sim: SimulatorProcess | None = None
        self.control: SimulatorControl | None = None
        self.pids: dict[str, int] = {}
        self.truth: dict[str, dict[str, np.ndarray]] = {}
        try:
            self._start(stream_format)
        except BaseException:
            self.close()
            raise

    def _start(self, stream_format: str) -> None:
        self.sim = SimulatorProcess(self.scenario.model)
        self.control = SimulatorControl(self.sim.rest_url)
        self.control.prepare(self.scenario, stream_format=stream_format)
        config = self.control.sim_config()
        self.truth = {name: ground_truth(self.scenario, analyses, config) for name, analyses in ANALYSIS_SETS.items()}
        self.bytes_per_frame = compressed_bytes_per_frame(self.scenario, config)
        self.db.start()
        common = {"DcuHost": "127.0.0.1", "DcuPort": self.sim.rest_port, "StreamPort": self.sim.stream_port,
                  "Stream2Port": self.sim.stream2_port, "StatePollPeriod": self.state_poll}
        for i, node in enumerate(NODES, start=1):
            self.db.register_device(f"node{i}", node, {**common, "Role": "node", "Workers": self.workers})
        self.db.register_device("single", SINGLE, {**common, "Role": "single", "Workers": self.workers})
        for count in (1, 2, 3):
            self.db.register_device(f"merge{count}", merger_name(count), {**common, "Role": "merger"})
            self.db.database().put_device_property(merger_name(count), {"Nodes": NODES[:count]})
        for i, node in enumerate(NODES, start=1):
            self.pids[node] = self.db.start_server(f"node{i}", node, timeout=STARTUP_TIMEOUT_S).pid
        self.pids[SINGLE] = self.db.start_server("single", SINGLE, timeout=STARTUP_TIMEOUT_S).pid

    def proxy(self, name: str) -> tango.DeviceProxy:
        proxy = tango.DeviceProxy(f"tango://{self.db.tango_host}/{name}")
        proxy.set_timeout_millis(30_000)
        return proxy

    def start_merger(self, count: int) -> str:
        name = merger_name(count)
        self.pids[name] = self.db.start_server(f"merge{count}", name, timeout=STARTUP_TIMEOUT_S).pid
        return name

    def stop_merger(self, count: int) -> None:
        name = merger_name(count)
        process = self.db.servers.get(f"merge{count}")
        if process is not None:
            stop_process(process)
        self.pids.pop(name, None)

    def configure(self, proxy: tango.DeviceProxy, analyses: tuple[str, ...]) -> None:
        """The analyses and the parameters the ground truth is computed with (the frame's centre,
        not the simulated DCU's beam centre)."""
        wait_for(lambda: proxy.state() == tango.DevState.ON, STARTUP_TIMEOUT_S,
                 lambda: f"{proxy.dev_name()} ON ({proxy.status()})", interval=0.1)
        parameters = AnalysisParameters().resolved(self.scenario.frame_shape)
        proxy.analyses = list(analyses)
        proxy.nav_shape = list(self.scenario.nav_shape)
        proxy.beam_center = [parameters.beam_centre[1], parameters.beam_centre[0]]
        proxy.adf_outer_radius = parameters.adf_outer_radius
        proxy.adf_inner_radius = parameters.adf_inner_radius
        proxy.bf_radius = parameters.bf_radius

    def close(self) -> None:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            started = [p for p in psutil.Process().children(recursive=True)
                       if "resource_tracker" not in " ".join(_cmdline(p))]
            self.db.stop()
            if self.sim is not None:
                if self.control is not None:
                    self.control.close()
                self.sim.close()
            killed = stop_leftovers(started)
            if killed:
                print(f"note: had to kill {len(killed)} leftover processes: {killed}", file=sys.stderr)
        finally:
            signal.signal(signal.SIGINT, previous)


def _cmdline(process: psutil.Process) -> list[str]:
    try:
        return process.cmdline()
    except psutil.Error:
        return []


def compressed_bytes_per_frame(scenario: Scenario, sim_config: dict[str, Any]) -> float:
    """Mean bslz4 size of the frames the simulator sends (its pool frames, as it encodes them)."""
    from sim.encode import compress_bslz4

    generator = scenarios._generator(scenario, sim_config)
    index = generator.pool_index(np.arange(scenario.frames, dtype=np.int64))
    sizes = np.array([len(compress_bslz4(generator.pool_frame(p))) for p in range(generator.pool_size)])
    return float(sizes[index].mean())


# ---------------------------------------------------------------------------------------------
# One configuration: warm-up, then measured series

def measure_config(deployment: Deployment, config: str, analyses_name: str, runs: int,
                   warmup: int) -> list[dict[str, Any]]:
    count = node_count(config)
    name = SINGLE if count == 0 else merger_name(count)
    proxy = deployment.proxy(name)
    deployment.configure(proxy, ANALYSIS_SETS[analyses_name])
    results = result_attributes(proxy, ANALYSIS_SETS[analyses_name])
    nodes = NODES[:count]
    node_proxies = {node: deployment.proxy(node) for node in nodes}
    frames = deployment.scenario.frames
    timer = StartTimer(proxy)
    records = []
    try:
        for index in range(warmup + runs):
            trees = {name: deployment.pids[name], **{node: deployment.pids[node] for node in nodes}}
            sequences = {node: partial_header(p.read_attribute("partial_results").value)[0].get("sequence", 0)
                         for node, p in node_proxies.items()}
            cpu_before = {**{n: tree_cpu(pid) for n, pid in trees.items()},
                          "simulator": {"main": cpu_seconds(deployment.sim.pid)},
                          "client": {"main": cpu_seconds(os.getpid())}}
            started, result_at, on_at = run_series(timer)
            cpu_after = {**{n: tree_cpu(pid) for n, pid in trees.items()},
                         "simulator": {"main": cpu_seconds(deployment.sim.pid)},
                         "client": {"main": cpu_seconds(os.getpid())}}
            partials, partial_bytes = {}, {}
            for node, p in node_proxies.items():
                header, size = partial_header(p.read_attribute("partial_results").value)
                partials[node] = int(header.get("sequence", 0)) - int(sequences[node])
                partial_bytes[node] = size
            problems = []
            processed, missing = int(proxy.frames_processed), int(proxy.frames_missing)
            if (processed, missing) != (frames, 0):
                problems.append(f"{processed} of {frames} frames processed, {missing} missing")
            values = {}
            for result in results:
                attribute = proxy.read_attribute(result)
                values[result] = np.asarray(attribute.value)
                if attribute.quality != tango.AttrQuality.ATTR_VALID:
                    problems.append(f"{result}: quality {attribute.quality}")
            problems += check_results(values, deployment.truth[analyses_name])
            elapsed = max(result_at, on_at) - started
            record = {"config": config, "nodes": count, "analyses": analyses_name, "frames": frames,
                      "warmup": index < warmup, "elapsed_s": elapsed, "frames_per_s": frames / elapsed,
                      "result_s": result_at - started, "on_s": on_at - started,
                      "cpu_s": _difference(cpu_after, cpu_before), "partials": partials,
                      "partial_bytes": partial_bytes, "correct": not problems, "problems": problems}
            if count:
                lines = list(proxy.nodes_status)
                record["nodes_status"] = lines
                record["shares"] = [_share(line) for line in lines]
            records.append(record)
            print(f"  {config:8s} {analyses_name:4s} {'warm-up' if index < warmup else f'run {index - warmup + 1}'}: "
                  f"{elapsed * 1e3:8.1f} ms {frames / elapsed:9,.0f} frames/s "
                  f"{'shares ' + str(record.get('shares')) if count else ''} "
                  f"{'ok' if not problems else problems}", flush=True)
    finally:
        timer.close()
    return [r for r in records if not r["warmup"]]


def _share(line: str) -> int:
    """Frames a node received, from its nodes_status line ("name: 5461 frames received, ...")."""
    try:
        return int(line.split(": ", 1)[1].split(" frames received")[0])
    except (IndexError, ValueError):
        return -1


# ---------------------------------------------------------------------------------------------
# What the merger does per partial result, in-process, by scan size

def merge_costs(scan_sides: list[int], frame_shape: tuple[int, int], repeats: int) -> list[dict[str, Any]]:
    """Per analysis set, scan size and node count: node side (copy + encode one partial) and
    merger side (decode one, merge the latest partials of N nodes), median seconds of ``repeats``."""
    from tango_dectris_live.processing.analyses import AnalysisRegistry
    from tango_dectris_live.processing.libertem_internals import allocate_full_results, udf_input_dtype
    from tango_dectris_live.processing.live_dataset import LiveDataSet, resolve_scan_shape
    from tango_dectris_live.processing.partials import PartialResults, ResultMerger, partial_of
    from tango_dectris_live.processing.snapshot import RunState

    registry = AnalysisRegistry.discover()
    parameters = AnalysisParameters().resolved(frame_shape)
    rng = np.random.default_rng(1)
    rows = []
    for analyses_name, analyses in ANALYSIS_SETS.items():
        for side in scan_sides:
            scan = resolve_scan_shape(side * side, (side, side))
            size = side * side
            merger = ResultMerger(registry, analyses, parameters, scan, frame_shape, "uint16")
            dataset = LiveDataSet(scan.shape, frame_shape, np.dtype("uint16"))
            for nodes in (1, 2, 3):
                encoded, node_side = [], []
                for node in range(nodes):
                    selected = registry.build(list(analyses), parameters, frame_shape)
                    for s in selected:
                        allocate_full_results(s.udf, dataset, udf_input_dtype(s.udf, np.dtype("uint16")))
                        for buffer in s.udf.results.values():
                            if buffer.has_data():
                                raw = buffer.raw_data
                                raw[...] = rng.random(raw.shape) * 100 if raw.dtype.kind == "f" else \
                                    rng.integers(0, 100, raw.shape).astype(raw.dtype)
                    order = np.arange(node, size, nodes, dtype=np.int64)
                    done = np.zeros(size, bool)
                    done[order] = True
                    times = []
                    for _ in range(repeats + 1):  # the first one warms up (allocations, imports)
                        t = time.perf_counter()
                        message = partial_of(selected, done, series=1, state="running", end_seen=False,
                                             frames_received=order.size, frames_processed=order.size,
                                             sequence=1, order=order).encode()
                        times.append(time.perf_counter() - t)
                    node_side.append(median(times[1:]))
                    encoded.append(message)
                decode_times, partials = [], []
                for message in encoded:
                    times = []
                    for _ in range(repeats + 1):
                        t = time.perf_counter()
                        partial = PartialResults.decode(*message)
                        times.append(time.perf_counter() - t)
                    decode_times.append(median(times[1:]))
                    merger.check(partial)
                    partials.append(partial)
                merge_times = []
                for _ in range(repeats + 1):
                    t = time.perf_counter()
                    merger.merge(partials, 1, RunState.RUNNING)
                    merge_times.append(time.perf_counter() - t)
                merge_times = merge_times[1:]
                rows.append({"analyses": analyses_name, "scan": [side, side], "nodes": nodes,
                             "partial_bytes": len(encoded[0][1]), "node_copy_encode_s": median(node_side),
                             "decode_s": median(decode_times), "merge_s": median(merge_times)})
                rows[-1]["merger_core_share"] = merger_load(rows[-1])
    return rows


# ---------------------------------------------------------------------------------------------
# Summary, model, output

def summarise(runs: list[dict[str, Any]], bytes_per_frame: float) -> dict[str, Any]:
    frames = runs[0]["frames"]
    count = runs[0]["nodes"]
    rates = [r["frames_per_s"] for r in runs]

    def total_cpu(keys: list[str]) -> list[float]:
        return [sum(sum(r["cpu_s"][k].values()) for k in keys) for r in runs]

    row: dict[str, Any] = {
        "config": runs[0]["config"], "nodes": count, "analyses": runs[0]["analyses"], "runs": len(runs),
        "frames": frames, "frames_per_s_min": min(rates), "frames_per_s_median": median(rates),
        "frames_per_s_max": max(rates), "elapsed_ms_median": median([r["elapsed_s"] for r in runs]) * 1e3,
        "simulator_us_per_frame": median([r["cpu_s"]["simulator"]["main"] for r in runs]) / frames * 1e6,
        "client_ms_per_series": median([r["cpu_s"]["client"]["main"] for r in runs]) * 1e3,
        "correct": all(r["correct"] for r in runs), "problems": sorted({p for r in runs for p in r["problems"]})}
    if count == 0:
        row["device_main_us_per_frame"] = median([r["cpu_s"][SINGLE]["main"] for r in runs]) / frames * 1e6
        row["device_workers_us_per_frame"] = median([r["cpu_s"][SINGLE]["children"] for r in runs]) / frames * 1e6
        row["device_us_per_frame"] = median(total_cpu([SINGLE])) / frames * 1e6
        return row
    nodes = NODES[:count]
    merger = merger_name(count)
    row["node_main_us_per_frame"] = median([sum(r["cpu_s"][n]["main"] for n in nodes) for r in runs]) / frames * 1e6
    row["node_workers_us_per_frame"] = \
        median([sum(r["cpu_s"][n]["children"] for n in nodes) for r in runs]) / frames * 1e6
    row["node_us_per_frame"] = median(total_cpu(nodes)) / frames * 1e6
    merger_cpu = [sum(r["cpu_s"][merger].values()) for r in runs]
    partials = [sum(r["partials"].values()) for r in runs]
    row["merger_ms_per_series"] = median(merger_cpu) * 1e3
    row["merger_us_per_frame"] = median(merger_cpu) / frames * 1e6
    row["partials_per_series"] = median(partials)
    row["merger_ms_per_partial"] = median([c / max(p, 1) for c, p in zip(merger_cpu, partials)]) * 1e3
    row["partial_bytes"] = max(max(r["partial_bytes"].values()) for r in runs)
    row["shares_last_run"] = runs[-1].get("shares")
    return row


def print_table(rows: list[dict[str, Any]]) -> None:
    header = (f"{'config':8s} {'analyses':8s} {'frames/s min / median':>22s} {'ms':>7s} "
              f"{'node us/fr (main+wk)':>21s} {'single us/fr':>13s} {'merger ms/ser':>13s} "
              f"{'partials':>8s} {'ms/partial':>10s} {'sim us/fr':>9s} correct")
    print(header)
    print("-" * len(header))
    for row in rows:
        if row["nodes"]:
            node = (f"{row['node_us_per_frame']:6.1f} ({row['node_main_us_per_frame']:.1f}+"
                    f"{row['node_workers_us_per_frame']:.1f})")
            single = ""
            merger = f"{row['merger_ms_per_series']:13.0f} {row['partials_per_series']:8.0f} " \
                     f"{row['merger_ms_per_partial']:10.1f}"
        else:
            node = ""
            single = (f"{row['device_us_per_frame']:6.1f} ({row['device_main_us_per_frame']:.1f}+"
                      f"{row['device_workers_us_per_frame']:.1f})")
            merger = f"{'':13s} {'':8s} {'':10s}"
        print(f"{row['config']:8s} {row['analyses']:8s} {row['frames_per_s_min']:10,.0f} / "
              f"{row['frames_per_s_median']:9,.0f} {row['elapsed_ms_median']:7.0f} {node:>21s} {single:>13s} "
              f"{merger} {row['simulator_us_per_frame']:9.2f} "
              f"{'yes' if row['correct'] else 'NO: ' + '; '.join(row['problems'])[:120]}")


def merger_load(row: dict[str, Any]) -> float:
    """Share of one core the merger spends on partial results while a series runs, whatever the
    frame rate: each of N nodes sends PARTIAL_RATE_HZ partials a second (each decoded), and the
    latest ones are merged at most PUBLISH_RATE_HZ times a second."""
    arrivals = row["nodes"] * PARTIAL_RATE_HZ
    return arrivals * row["decode_s"] + min(arrivals, PUBLISH_RATE_HZ) * row["merge_s"]


def print_merge_costs(rows: list[dict[str, Any]]) -> None:
    header = (f"{'analyses':8s} {'scan':>9s} {'nodes':>5s} {'partial MB':>10s} {'node: copy+encode ms':>20s} "
              f"{'merger: decode ms':>17s} {'merge of N ms':>13s} {'merger core share':>17s}")
    print(header)
    print("-" * len(header))
    for row in rows:
        print(f"{row['analyses']:8s} {row['scan'][0]:>4d}x{row['scan'][1]:<4d} {row['nodes']:5d} "
              f"{row['partial_bytes'] / 1e6:10.2f} {row['node_copy_encode_s'] * 1e3:20.2f} "
              f"{row['decode_s'] * 1e3:17.2f} {row['merge_s'] * 1e3:13.2f} {merger_load(row):17.3f}")


LINKS_GBIT = {"10 GbE": 10.0, "25 GbE": 25.0, "100 GbE": 100.0}
PARTIAL_RATE_HZ = 4.0  # acquisition.PARTIAL_RATE: partial results per second per node while a series runs
PUBLISH_RATE_HZ = 10.0  # result_event_rate default: merges per second at most


def model(rows: list[dict[str, Any]], merge_rows: list[dict[str, Any]], bytes_per_frame: float,
          cores: list[int], scan_side: int) -> list[dict[str, Any]]:
    """Predicted frames/s of N machines (one node each, C cores, C-1 workers) from the measured
    per-frame costs, and what limits it."""
    predictions = []
    for analyses_name in ANALYSIS_SETS:
        node_rows = [r for r in rows if r["analyses"] == analyses_name and r["nodes"] == 1]
        if not node_rows:
            continue
        node = node_rows[0]
        main_us, workers_us = node["node_main_us_per_frame"], node["node_workers_us_per_frame"]
        merge = {r["nodes"]: r for r in merge_rows if r["analyses"] == analyses_name and r["scan"][0] == scan_side}
        for n in (1, 2, 3, 4, 8):
            for c in cores:
                # the server process (receiver thread, Tango, partial results) takes one core at most;
                # the workers share the other C - 1 (at least one)
                per_node = min(1e6 / main_us, max(c - 1, 1) * 1e6 / workers_us)
                limits = {"nodes": n * per_node}
                for link, gbit in LINKS_GBIT.items():
                    limits[f"DCU link {link}"] = gbit * 1e9 / 8 / bytes_per_frame
                rate = min(limits.values())
                # the merger: decode N partials at 4 Hz each, merge all N at most PUBLISH_RATE times/s;
                # independent of the frame rate
                load = None
                m = merge.get(min(n, 3))
                if m is not None:  # beyond 3 nodes: decode and merge scaled by N / 3
                    load = merger_load({**m, "nodes": n, "merge_s": m["merge_s"] * n / min(n, 3)})
                limiting = min(limits, key=limits.get)
                predictions.append({"analyses": analyses_name, "nodes": n, "cores": c, "frames_per_s": rate,
                                    "per_node_frames_per_s": per_node, "limited_by": limiting,
                                    "merger_cpu_share_of_a_core": load})
    return predictions


ARINA_MAX_HZ = 120_000.0  # ARINA binned: the rate a DCU streams at most


def print_model(predictions: list[dict[str, Any]], bytes_per_frame: float, raw_bytes: int, scan_side: int) -> None:
    print(f"\nModel: N machines, one node each with C cores (server process <= 1 core, C-1 workers), "
          f"{bytes_per_frame:,.0f} B per compressed frame (simulated data), merger load at a {scan_side}x{scan_side} "
          f"scan")
    print("DCU link capacity in frames/s, compressed (raw " + f"{raw_bytes:,} B): " + ", ".join(
        f"{link} {gbit * 1e9 / 8 / bytes_per_frame:,.0f} ({gbit * 1e9 / 8 / raw_bytes:,.0f})"
        for link, gbit in LINKS_GBIT.items()))
    header = f"{'analyses':8s} {'N':>2s} {'C':>3s} {'per node fr/s':>13s} {'N nodes fr/s':>13s} " \
             f"{'limited by':>17s} {'merger core share':>17s}"
    print(header)
    print("-" * len(header))
    for p in predictions:
        load = f"{p['merger_cpu_share_of_a_core']:.3f}" if p["merger_cpu_share_of_a_core"] is not None else "-"
        print(f"{p['analyses']:8s} {p['nodes']:2d} {p['cores']:3d} {p['per_node_frames_per_s']:13,.0f} "
              f"{p['frames_per_s']:13,.0f} {p['limited_by']:>17s} {load:>17s}")
    for p in predictions:
        if p["nodes"] == 1:
            print(f"{p['analyses']}, {p['cores']} cores per machine: {math.ceil(ARINA_MAX_HZ / p['per_node_frames_per_s'])}"
                  f" node(s) for {ARINA_MAX_HZ:,.0f} frames/s")


NOTE = ("On this machine every process (simulator, 1-3 nodes with their workers, the merger, the client) "
        "competes for the same cores, so measured N-node throughput here does not grow with N: the per-frame "
        "CPU costs are what carries over to N real machines (see the model).")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--scan", type=int, nargs=2, default=[128, 128], metavar=("HEIGHT", "WIDTH"),
                        help="scan shape (frames = HEIGHT x WIDTH); default 128 128")
    parser.add_argument("--analyses", nargs="+", default=list(ANALYSIS_SETS), choices=list(ANALYSIS_SETS),
                        help="sums: sum, sumsig; all: sum, sumsig, bf, adf, com")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS,
                        help="single device and/or merger with 1, 2, 3 nodes")
    parser.add_argument("--runs", type=int, default=3, help="measured series per configuration and analysis set")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured series before them")
    parser.add_argument("--workers", type=int, default=1, help="worker processes per node and of the single device")
    parser.add_argument("--stream-format", default="legacy", choices=("legacy", "cbor"))
    parser.add_argument("--state-poll", type=float, default=0.2, help="StatePollPeriod of every device (s)")
    parser.add_argument("--merge-scans", type=int, nargs="*", default=[64, 128, 256, 512],
                        help="scan sides for the in-process merge timing (none: skip it)")
    parser.add_argument("--merge-repeats", type=int, default=7, help="timed repeats (after one warm-up)")
    parser.add_argument("--cores", type=int, nargs="+", default=[8, 16, 32], help="cores per machine in the model")
    parser.add_argument("--json", type=Path, default=None, help="write the record (every run) here")
    args = parser.parse_args()
    if args.runs < 1 or args.warmup < 0 or args.workers < 1:
        parser.error("--runs and --workers must be at least 1, --warmup at least 0")
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    base = scenario_by_name("arina96")
    scan = tuple(args.scan)
    scenario = dataclasses.replace(base, name=f"arina96-scan{scan[0]}x{scan[1]}",
                                   description=f"ARINA binned 96x96 uint16 bslz4, scan {scan[0]}x{scan[1]}",
                                   frames=scan[0] * scan[1], nav_shape=scan)
    load_before = os.getloadavg()
    began = time.time()
    runs: list[dict[str, Any]] = []
    print(f"{scenario.description}, {scenario.frames:,} frames, pacing max, stream {args.stream_format}; "
          f"{args.workers} worker(s) per node and single device; {args.warmup} warm-up + {args.runs} runs", flush=True)
    deployment = Deployment(scenario, args.workers, args.stream_format, args.state_poll)
    try:
        for config in args.configs:
            count = node_count(config)
            if count:
                deployment.start_merger(count)
            try:
                for analyses_name in args.analyses:
                    runs += measure_config(deployment, config, analyses_name, args.runs, args.warmup)
            finally:
                if count:
                    deployment.stop_merger(count)
    except KeyboardInterrupt:
        sys.exit("interrupted; every process this benchmark started is stopped")
    finally:
        bytes_per_frame = getattr(deployment, "bytes_per_frame", float(scenario.frame_bytes))
        deployment.close()
    rows = [summarise([r for r in runs if r["config"] == c and r["analyses"] == a], bytes_per_frame)
            for c in args.configs for a in args.analyses]
    print(f"\n{scenario.description}, {scenario.frames:,} frames; {args.workers} worker(s) per node; "
          f"{args.runs} runs; os.cpu_count() = {os.cpu_count()}; {bytes_per_frame:,.0f} B per compressed frame")
    print_table(rows)
    print("us/fr: CPU microseconds per frame of the series (node: all nodes' server processes + their workers, "
          "per frame of the scan); merger ms/ser: CPU of the merger's server per series; ms/partial: that / the "
          "partial results its nodes sent; sim: the simulator process (separate from this client).")
    print(NOTE)
    merge_rows = merge_costs(args.merge_scans, scenario.frame_shape, args.merge_repeats) if args.merge_scans else []
    if merge_rows:
        print("\nPer partial result, in-process (one core, median of "
              f"{args.merge_repeats}): node side and merger side, by scan size and node count")
        print_merge_costs(merge_rows)
    side = scan[0] if scan[0] in args.merge_scans else (args.merge_scans[0] if args.merge_scans else scan[0])
    predictions = model(rows, merge_rows, bytes_per_frame, args.cores, side)
    print_model(predictions, bytes_per_frame, scenario.frame_bytes, side)
    load_after = os.getloadavg()
    print(f"\nload average before {' '.join(f'{x:.2f}' for x in load_before)}, "
          f"after {' '.join(f'{x:.2f}' for x in load_after)}; {time.time() - began:.0f} s")
    if args.json is not None:
        args.json.write_text(json.dumps({
            **record_header(load_before, load_after),
            "scenario": {"name": scenario.name, "frames": scenario.frames, "nav_shape": list(scan),
                         "frame_shape": list(scenario.frame_shape), "dtype": scenario.dtype, "compression": "bslz4",
                         "pacing": "max", "stream_format": args.stream_format,
                         "compressed_bytes_per_frame": bytes_per_frame},
            "workers_per_node": args.workers, "note": NOTE, "summaries": rows, "merge_costs": merge_rows,
            "model": predictions, "runs": runs}, indent=1) + "\n")
        print(f"written {args.json}")
    if not all(row["correct"] for row in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
