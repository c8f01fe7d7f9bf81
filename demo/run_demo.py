"""`make demo`: an embedded Tango database, the simulator, the DectrisLive server, and a client.

Everything runs on 127.0.0.1 with free ports and is shut down at the end (also on errors and
Ctrl-C). What the client did and every State change it received are printed and written to
``demo-output/``.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import tango

from tango_dectris_live.device.embedded_db import EmbeddedTangoDatabase, stop_process

DEVICE = "demo/dectris/1"
INSTANCE = "demo"
_LISTENING = re.compile(r"listening: rest=http://([\d.]+):(\d+) stream=tcp://[\d.]+:(\d+) "
                        r"stream2=tcp://[\d.]+:(\d+)")


class StateRecorder:
    """Subscriber that timestamps every State change event."""

    def __init__(self, t0: float) -> None:
        self.t0 = t0
        self.events: list[tuple[float, str]] = []
        self._lock = threading.Lock()
        self.changed = threading.Condition(self._lock)

    def push_event(self, event) -> None:
        if event.err:
            return
        with self.changed:
            self.events.append((time.monotonic() - self.t0, str(event.attr_value.value)))
            print(f"  [event] t={self.events[-1][0]:6.2f}s State -> {self.events[-1][1]}")
            self.changed.notify_all()

    def wait_for(self, state: str, since: int, timeout: float) -> None:
        """Wait until a State event ``state`` arrives after the first ``since`` events."""
        with self.changed:
            ok = self.changed.wait_for(lambda: any(s == state for _, s in self.events[since:]), timeout)
        if not ok:
            raise RuntimeError(f"no State {state} event within {timeout:g} s")


def start_simulator(model: str) -> tuple[subprocess.Popen, int, int, int]:
    proc = subprocess.Popen([sys.executable, "-m", "sim", "--host", "127.0.0.1", "--port", "0",
                             "--stream-port", "0", "--stream2-port", "0", "--model", model],
                            stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    match = _LISTENING.search(line)
    if not match:
        stop_process(proc)
        raise RuntimeError(f"the simulator did not start: {line!r}")
    return proc, int(match.group(2)), int(match.group(3)), int(match.group(4))


def run(output: Path, model: str) -> dict:
    output.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    summary: dict = {"model": model, "steps": []}
    db = EmbeddedTangoDatabase()
    sim_proc = None
    try:
        db.start()
        print(f"embedded Tango database on {db.tango_host}")
        sim_proc, rest_port, stream_port, stream2_port = start_simulator(model)
        print(f"simulator ({model}) REST on 127.0.0.1:{rest_port}, stream v1 {stream_port}, "
              f"v2 {stream2_port}")
        db.register_device(INSTANCE, DEVICE, {"DcuHost": "127.0.0.1", "DcuPort": rest_port,
                                              "StreamPort": stream_port, "Stream2Port": stream2_port,
                                              "StatePollPeriod": 0.2})
        db.start_server(INSTANCE, DEVICE)
        print(f"device server DectrisLive/{INSTANCE} exports {DEVICE}")

        proxy = tango.DeviceProxy(f"tango://{db.tango_host}/{DEVICE}")
        proxy.set_timeout_millis(10000)
        recorder = StateRecorder(t0)
        event_id = proxy.subscribe_event("State", tango.EventType.CHANGE_EVENT, recorder)

        def step(text: str) -> None:
            print(f"client: {text}")
            summary["steps"].append(text)

        step(f"State {proxy.state()}, Status: {proxy.status()}")
        n = len(recorder.events)
        step("Initialize")
        proxy.Initialize()
        recorder.wait_for("ON", n, 60)
        settings = {"count_time": 0.01, "frame_time": 0.01, "nimages": 50}
        # No receiver in this first demo: the simulator's stream is switched off.
        proxy.stream_mode = list(proxy.get_attribute_config("stream_mode").enum_labels).index("disabled")
        labels = list(proxy.get_attribute_config("trigger_mode").enum_labels)
        proxy.trigger_mode = labels.index("ints")
        for name, value in settings.items():
            proxy.write_attribute(name, value)
            step(f"{name} = {value} (DCU reports {proxy.read_attribute(name).value})")
        n = len(recorder.events)
        series = proxy.Arm()
        step(f"Arm -> series {series}")
        proxy.Trigger()
        step("Trigger (ints: 50 frames at 10 ms)")
        recorder.wait_for("ON", n, 30)
        step(f"series {series} complete, State {proxy.state()}")
        series_end = proxy.Disarm()
        step(f"Disarm -> series {series_end}")
        proxy.unsubscribe_event(event_id)
        summary["series"] = series
        summary["state_events"] = recorder.events
        summary["settings"] = {name: proxy.read_attribute(name).value for name in settings}
        summary["description"] = proxy.read_attribute("description").value
    finally:
        db.stop()
        if sim_proc is not None:
            stop_process(sim_proc)
    (output / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"wrote {output / 'summary.json'}; all processes stopped")
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output", type=Path, default=Path("demo-output"))
    parser.add_argument("--model", default="QUADRO")
    args = parser.parse_args()
    run(args.output, args.model)


if __name__ == "__main__":
    main()
