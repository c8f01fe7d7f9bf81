"""Depth 1: the processing pipeline without Tango (StreamReceiver -> LiveRunner) on the simulator.

The simulator runs in its own process; this process holds the receiver thread, the runner's
merge thread and its worker processes, as the device would. Each run arms and triggers one series
over REST and waits for the final snapshot; every run's results are checked against the ground
truth computed from the simulator's data generator.

    .venv/bin/python benchmarks/bench_pipeline.py --scenario quadro512-quick --analyses sum+sumsig
    .venv/bin/python benchmarks/bench_pipeline.py --scenario arina96 --runs 3 --json out.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.scenarios import (  # noqa: E402
    ClosingBench, add_run_arguments, measure_series,
    RunFigures, Scenario, SimulatorControl, SimulatorProcess, TriggerThread, analyses_by_name, check_results,
    cpu_seconds, figures_from_timing, ground_truth, peak_rss_mb, reset_peak_rss, scenario_by_name, thread_id,
    worker_pids)
from tango_dectris_live.processing.live_dataset import ReceiverFrameSource, SeriesFinished, StackReady  # noqa: E402
from tango_dectris_live.processing.runner import LiveRunner  # noqa: E402
from tango_dectris_live.processing.snapshot import RunState  # noqa: E402
from tango_dectris_live.receiver import StreamReceiver  # noqa: E402

DEPTH = "pipeline"
RUN_TIMEOUT_S = 600.0


class TimedFrameSource:
    """A FrameSource that notes when the first stack of a series was handed to the runner."""

    def __init__(self, inner: ReceiverFrameSource) -> None:
        self._inner = inner
        self.decode_frames_into = inner.decode_frames_into
        self.first_stack_at: float | None = None
        self.series_ended_at: float | None = None  # time.monotonic(): the receiver had the last frame

    def next_event(self, timeout: float | None):
        event = self._inner.next_event(timeout)
        if isinstance(event, StackReady) and self.first_stack_at is None:
            self.first_stack_at = time.perf_counter()
        elif isinstance(event, SeriesFinished) and event.ended_at:
            self.series_ended_at = event.ended_at
        return event

    def post(self, event) -> None:
        self._inner.post(event)

    def put_back(self, events) -> None:
        self._inner.put_back(events)

    def release(self, stack) -> None:
        self._inner.release(stack)


class PipelineBench(ClosingBench):
    """One simulator + receiver + runner, measured over several series of one scenario."""

    def __init__(self, scenario: Scenario, analyses: str, *, workers: int = 2, receiver_mode: str = "listen",
                 stream_format: str = "legacy", header_detail: str = "basic", frame_rate: float | None = None,
                 num_slots: int | None = None, frame_stack_size: int | None = None, receive_hwm: int = 1000,
                 frames_per_partition: int | None = None, coalesce: float | None = None) -> None:
        if receiver_mode not in ("listen", "arm"):
            raise ValueError(f"receiver_mode must be listen (passive) or arm (active), got {receiver_mode!r}")
        self.scenario = scenario
        self.analyses_name = analyses
        self.analyses = analyses_by_name(analyses)
        self.receiver_mode = receiver_mode
        self.settings = {"workers": workers, "receiver_mode": receiver_mode, "stream_format": stream_format,
                         "header_detail": header_detail, "num_slots": num_slots,
                         "frame_stack_size": frame_stack_size, "receive_hwm": receive_hwm, "frame_rate": frame_rate,
                         "coalesce": coalesce,
                         "frames_per_partition": frames_per_partition}
        self.frames_per_partition = frames_per_partition  # None: a worker takes its whole stack at once
        self.sim = SimulatorProcess(scenario.model)
        try:
            self.control = SimulatorControl(self.sim.rest_url)
            self.control.prepare(scenario, stream_format=stream_format, header_detail=header_detail,
                                 frame_rate=frame_rate)
            self.truth = ground_truth(scenario, self.analyses, self.control.sim_config())
            self.receiver = StreamReceiver(
                self.sim.stream_endpoint(stream_format), stream_version=1 if stream_format == "legacy" else 2,
                frame_shape=scenario.frame_shape, dtype=scenario.dtype, num_slots=num_slots,
                frame_stack_size=frame_stack_size, receive_hwm=receive_hwm, timeout=60.0,
                **({} if coalesce is None else {"coalesce": coalesce})).start()
            self.runner = LiveRunner(workers=workers)
        except BaseException:
            self.sim.close()
            raise
        self.source = TimedFrameSource(ReceiverFrameSource(self.receiver))
        self.receiver_tid = thread_id("StreamReceiver(")
        self._next_series = 1  # the simulator counts series from 1 after initialize
        if receiver_mode == "listen":
            self.receiver.listen()

    def close(self) -> None:
        try:
            self.runner.close()
            self.receiver.stop()
            self.control.close()
        finally:
            self.sim.close()

    def _cpu(self, workers: list[int]) -> dict[str, float]:
        own = cpu_seconds(os.getpid())
        receiver = cpu_seconds(os.getpid(), self.receiver_tid) if self.receiver_tid else 0.0
        return {"simulator": cpu_seconds(self.sim.pid), "receiver": receiver,
                "workers": sum(cpu_seconds(pid) for pid in workers), "main": own - receiver}

    @staticmethod
    def _wait(run, trigger: TriggerThread):
        """The final snapshot; gives up at once when the trigger failed (no frames will come)."""
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while True:
            try:
                return run.wait(0.2)  # returns as soon as the run ends: the timing stays exact
            except TimeoutError:
                if trigger.error is not None:
                    run.abort()
                    run.wait(30)
                    trigger.join()  # raises with the simulator's answer
                if time.monotonic() > deadline:
                    run.abort()
                    raise

    def run_once(self) -> RunFigures:
        """Process one series; its figures (``correct`` False when the results are wrong)."""
        series = self._next_series
        if self.receiver_mode == "arm":
            self.receiver.arm(series)
        self.source.first_stack_at = self.source.series_ended_at = None
        before = self.receiver.stats()
        bytes_before = before.bytes_received
        run = self.runner.process(self.source, self.analyses, nav_shape=self.scenario.nav_shape,
                                  frames_per_partition=self.frames_per_partition)
        armed = self.control.arm()
        if armed != series:
            raise RuntimeError(f"the simulator armed series {armed}, expected {series}")
        self._next_series += 1
        workers = worker_pids(exclude={self.sim.pid})
        processes = [os.getpid(), self.sim.pid, *workers]
        for pid in processes:
            reset_peak_rss(pid)
        cpu_before = self._cpu(workers)
        at_send: dict[str, Any] = {}

        def probe() -> None:  # where the backlog sits when the simulator has handed over its last frame
            stats, (_, processed) = self.receiver.stats(), run.counters()
            at_send.update(monotonic=time.monotonic(), received=stats.frames_received - before.frames_received,
                           processed=processed, slots_in_use=stats.slots_in_use)

        trigger = TriggerThread(self.control, on_sent=probe).start()
        snapshot = self._wait(run, trigger)
        finished_at = time.perf_counter()
        finished_mono = time.monotonic()
        trigger.join()
        cpu_after = self._cpu(workers)
        stats = self.receiver.stats()
        problems = []
        if snapshot.state != RunState.FINISHED:
            problems.append(f"run ended {snapshot.state.value}: {snapshot.error}")
        if snapshot.frames_processed != self.scenario.frames:
            problems.append(f"{snapshot.frames_processed} of {self.scenario.frames} frames processed "
                            f"({snapshot.frames_dropped} reported missing by the receiver)")
        problems += check_results(snapshot.buffers, self.truth)
        elapsed_from_first = finished_at - (self.source.first_stack_at or trigger.started_at)
        extra: dict[str, Any] = {
            "settings": self.settings,
            "compressed_mb_per_s": (stats.bytes_received - bytes_before) / (finished_at - trigger.started_at) / 1e6,
            "frames_per_s_from_first_stack": self.scenario.frames / elapsed_from_first,
            "backpressure_s": stats.backpressure_seconds, "receiver_errors": dict(stats.errors),
            "stacks_merged": snapshot.stacks_merged}
        if at_send and self.source.series_ended_at:
            # The latency split: the backlog still on its way (the simulator's ZeroMQ queue, the
            # sockets' buffers) reaches the receiver first, then the frames in the slots are processed.
            extra["backlog_at_send"] = {
                "in_transit_frames": self.scenario.frames - at_send["received"],
                "received_unprocessed_frames": at_send["received"] - at_send["processed"],
                "slots_in_use": at_send["slots_in_use"],
                "to_last_frame_received_ms": (self.source.series_ended_at - at_send["monotonic"]) * 1e3,
                "last_frame_received_to_result_ms": (finished_mono - self.source.series_ended_at) * 1e3}
        return figures_from_timing(
            self.scenario, DEPTH, self.analyses_name, trigger, finished_at,
            {k: cpu_after[k] - cpu_before[k] for k in cpu_after},
            sum(peak_rss_mb(pid) for pid in processes), problems, extra)


def measure(scenario: Scenario, analyses: str, runs: int = 3, warmup: int = 1, **settings: Any) -> list[RunFigures]:
    """``warmup`` unreported series, then ``runs`` measured ones."""
    return measure_series(lambda: PipelineBench(scenario, analyses, **settings), runs, warmup)


# A paced series keeps up when the simulator was never held back (a DCU would have dropped frames)
# and the backlog left when the last frame was sent is processed within this time.
REALTIME_SEND_SLACK = 1.10
REALTIME_MAX_LATENCY_MS = 250.0


def keeps_up(figures: RunFigures, frame_rate: float) -> bool:
    """Zero missing frames, correct results, sender on schedule and a bounded backlog."""
    nominal = figures.frames / frame_rate
    return (figures.correct and figures.sim_send_s <= nominal * REALTIME_SEND_SLACK + 0.05
            and figures.latency_ms <= REALTIME_MAX_LATENCY_MS)


def realtime_limit(scenario: Scenario, analyses: str, low: float | None = None, high: float | None = None,
                   steps: int = 6, **settings: Any) -> dict[str, Any]:
    """Bisect the highest paced frame rate (Hz) in [low, high] that :func:`keeps_up` (default:
    the scenario's max rate and 1/16 of it)."""
    high = float(high or scenario.max_rate_hz)
    low = float(low or high / 16)
    trials: list[dict[str, Any]] = []
    with PipelineBench(scenario, analyses, **settings) as bench:
        bench.run_once()  # warm-up at full speed

        def attempt(rate: float) -> bool:
            bench.control.set_pacing(scenario, rate)
            figures = bench.run_once()
            ok = keeps_up(figures, rate)
            trials.append({"rate_hz": round(rate, 1), "keeps_up": ok, "sim_send_s": round(figures.sim_send_s, 4),
                           "nominal_s": round(figures.frames / rate, 4), "latency_ms": round(figures.latency_ms, 1),
                           "correct": figures.correct, "problems": figures.problems})
            print(f"  {rate:10,.0f} Hz: {'keeps up' if ok else 'falls behind'} (send {figures.sim_send_s:.3f} s "
                  f"for nominal {figures.frames / rate:.3f} s, latency {figures.latency_ms:.0f} ms"
                  f"{', ' + '; '.join(figures.problems) if figures.problems else ''})", flush=True)
            return ok

        if attempt(high):
            best = high
        elif not attempt(low):
            best = 0.0
        else:
            best = low
            for _ in range(steps):
                middle = (best + high) / 2
                if attempt(middle):
                    best = middle
                else:
                    high = middle
    return {"scenario": scenario.name, "analyses": analyses, "depth": DEPTH, "realtime_limit_hz": round(best, 1),
            "searched_up_to_hz": round(float(high), 1), "trials": trials,
            "criteria": {"send_slack": REALTIME_SEND_SLACK, "max_latency_ms": REALTIME_MAX_LATENCY_MS}}


def print_figures(figures: list[RunFigures]) -> None:
    for f in figures:
        cpu = " ".join(f"{k} {v:.2f}" for k, v in f.cpu_s.items())
        print(f"{f.scenario:22s} {f.depth:14s} {f.analyses:11s} {f.frames_per_s:10,.0f} frames/s "
              f"{f.mb_per_s:8,.0f} MB/s  latency {f.latency_ms:7.1f} ms  cpu[{cpu}]  peak {f.peak_mb:7.0f} MB  "
              f"{'correct' if f.correct else 'FAILED: ' + '; '.join(f.problems)}")
        split = f.extra.get("backlog_at_send")
        if split:
            print(f"{'':22s} latency split: {split['in_transit_frames']:,} frames still on their way when the "
                  f"simulator finished, {split['received_unprocessed_frames']:,} received not yet processed; "
                  f"last frame received after {split['to_last_frame_received_ms']:.0f} ms, result "
                  f"{split['last_frame_received_to_result_ms']:.0f} ms later")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_arguments(parser)
    parser.add_argument("--receiver-mode", default="listen", choices=("listen", "arm"))
    parser.add_argument("--stream-format", default="legacy", choices=("legacy", "cbor"))
    parser.add_argument("--header-detail", default="basic", choices=("all", "basic", "none"))
    parser.add_argument("--frame-rate", type=float, default=None, help="pace the simulator (Hz); default: max")
    parser.add_argument("--num-slots", type=int, default=None, help="default: automatic")
    parser.add_argument("--frame-stack-size", type=int, default=None)
    parser.add_argument("--coalesce", type=float, default=None,
                        help="receiver nap while a stream flows (s); default: the receiver's")
    parser.add_argument("--realtime", action="store_true",
                        help="bisect the highest paced frame rate processed in real time instead")
    parser.add_argument("--realtime-low", type=float, default=None, help="default: 1/16 of the high end")
    parser.add_argument("--realtime-high", type=float, default=None, help="default: the scenario's max rate")
    parser.add_argument("--json", type=Path, default=None, help="write the runs' figures here")
    args = parser.parse_args()
    if args.realtime:
        limit = realtime_limit(scenario_by_name(args.scenario), args.analyses, args.realtime_low,
                               args.realtime_high, workers=args.workers, receiver_mode=args.receiver_mode,
                               stream_format=args.stream_format, header_detail=args.header_detail,
                               num_slots=args.num_slots, frame_stack_size=args.frame_stack_size,
                               coalesce=args.coalesce)
        print(f"{limit['scenario']} {limit['analyses']}: real-time limit {limit['realtime_limit_hz']:,.0f} Hz")
        if args.json is not None:
            args.json.write_text(json.dumps(limit, default=json_default))
        return
    figures = measure(scenario_by_name(args.scenario), args.analyses, args.runs, args.warmup,
                      workers=args.workers, receiver_mode=args.receiver_mode, stream_format=args.stream_format,
                      header_detail=args.header_detail, frame_rate=args.frame_rate, num_slots=args.num_slots,
                      frame_stack_size=args.frame_stack_size, coalesce=args.coalesce)
    print_figures(figures)
    if args.json is not None:
        args.json.write_text(json.dumps([f.as_dict() for f in figures], default=json_default))


def json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


if __name__ == "__main__":
    main()
