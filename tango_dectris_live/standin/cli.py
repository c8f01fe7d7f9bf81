"""``tango-dectris-live-standin``: a DectrisLive device to develop against, in one command.

    tango-dectris-live-standin [--model ARINA] [--device test/dectris/1] [--saving-dir DIR] [--host ADDR]
                               [--port PORT]

starts the detector simulator, an embedded Tango database and the real DectrisLive server on
127.0.0.1 (free ports), Initializes the device, prints ``export TANGO_HOST=...`` and the device
name, and runs until Ctrl-C (or SIGTERM), which stops every process it started (docs/standin.md).
"""
from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path
from types import FrameType

import psutil
import tango
import zmq

from ..device.embedded_db import StartupError
from ..testing import stop_leftovers
from .realistic import (
    DEFAULT_DEVICE,
    DEFAULT_MODEL,
    MODEL_NAMES,
    RealisticStandIn,
    StandInError,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tango-dectris-live-standin", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL, choices=MODEL_NAMES,
                        help=f"simulated detector (default {DEFAULT_MODEL}: 192x192 pixels, 4D-STEM)")
    parser.add_argument("--device", default=DEFAULT_DEVICE, help=f"Tango device name (default {DEFAULT_DEVICE})")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address everything listens on (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=0,
                        help="port of the Tango database (TANGO_HOST); default 0: a free one, printed")
    parser.add_argument("--saving-dir", type=Path, default=None,
                        help="the device's SavingBaseDirectory: series files go below it "
                             "(default: a new temporary folder, removed at exit unless a file was saved in it)")
    return parser


def _announce(standin: RealisticStandIn) -> None:
    """What a user needs to connect, as lines a test (or ``grep ^export``) can read."""
    assert standin.simulator is not None
    print(f"DectrisLive stand-in: the real device server on a simulated {standin.model} "
          f"(DCU {standin.simulator.rest_url})")
    print(f"export TANGO_HOST={standin.tango_host}")
    print(f"device {standin.device} (State {standin.proxy.state()})")
    print(f"series files below {standin.saving_base}")
    print("Ctrl-C stops everything.", flush=True)


def _serve_until_stopped(standin: RealisticStandIn, stop_requested: threading.Event) -> int:
    """Wait for Ctrl-C/SIGTERM; 1 if the device server died meanwhile."""
    while not stop_requested.wait(0.5):
        server = standin.server_process
        if server is not None and server.poll() is not None:
            print(f"the device server exited by itself (code {server.returncode}); stopping", file=sys.stderr)
            return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    stop_requested = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        if not stop_requested.is_set():
            stop_requested.set()
            # while starting, interrupt the start-up at once (the clean-up below still runs)
            raise KeyboardInterrupt

    try:
        standin = RealisticStandIn(model=args.model, device=args.device, host=args.host, saving_base=args.saving_dir,
                                   port=args.port)
    except StandInError as exc:
        print(f"tango-dectris-live-standin: {exc}", file=sys.stderr)
        return 2
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, request_stop)
    code = 0
    try:
        print(f"starting the simulator ({args.model}), a Tango database and the DectrisLive server ...", flush=True)
        standin.start()
        _announce(standin)
        code = _serve_until_stopped(standin, stop_requested)
    except KeyboardInterrupt:
        pass
    except (StandInError, StartupError, TimeoutError) as exc:
        print(f"tango-dectris-live-standin: {exc}", file=sys.stderr)
        code = 2
    except tango.DevFailed as exc:
        print(f"tango-dectris-live-standin: {exc.args[0].desc}", file=sys.stderr)
        code = 2
    except (OSError, zmq.ZMQError) as exc:  # e.g. a --host that is not an address of this machine
        print(f"tango-dectris-live-standin: cannot listen on {args.host}: {exc}", file=sys.stderr)
        code = 2
    finally:
        # a second Ctrl-C must not cut the clean-up short
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        started = psutil.Process().children(recursive=True)
        standin.stop()
        killed = stop_leftovers(started)
        print("stopped: simulator, Tango database and device server"
              + (f"; had to kill {len(killed)}: {killed}" if killed else ""), flush=True)
        if standin.saving_base is not None and standin.saving_base.is_dir():
            print(f"series files kept in {standin.saving_base}", flush=True)
    return code
