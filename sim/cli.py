"""``simplon-sim``: run the simulated DCU until SIGTERM or Ctrl-C."""
from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from types import FrameType

from sim.models import MODELS
from sim.rest import API_PROFILES
from sim.server import SimulatorServer


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="simplon-sim", description="Simulated DECTRIS detector: SIMPLON REST API and stream v1/v2.")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="REST port, 0 = any free port (default 8000)")
    parser.add_argument("--stream-port", type=int, default=9999,
                        help="stream v1 (legacy) port, 0 = any free port (default 9999)")
    parser.add_argument("--stream2-port", type=int, default=31001,
                        help="stream v2 (cbor) port, 0 = any free port (default 31001)")
    parser.add_argument("--model", default="QUADRO", choices=sorted(MODELS), help="detector preset (default QUADRO)")
    parser.add_argument("--verbose", action="store_true", help="log every HTTP request to stderr")
    parser.add_argument("--profile", default="full", choices=API_PROFILES,
                        help="minimal: a DCU with only part of SIMPLON (no key listings, no filewriter/"
                             "monitor/system, basic stream settings only); partial: like LiberTEM-live's "
                             "simulator (no detector/status/state, HTTP 500 'not implemented' for most "
                             "keys and commands, stream v1 header parts as separate messages)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Start the simulator, print one ``listening:`` line, serve until SIGTERM/SIGINT; exit 0."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stop_requested = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        stop_requested.set()

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    server = SimulatorServer(host=args.host, port=args.port, stream_port=args.stream_port,
                             stream2_port=args.stream2_port, model=args.model, verbose=args.verbose,
                             profile=args.profile)
    try:
        server.start()
    except OSError as exc:
        print(f"simplon-sim: cannot listen on {args.host}: {exc}", file=sys.stderr)
        return 2
    try:
        print(f"listening: rest={server.rest_url} stream=tcp://{args.host}:{server.stream_port} "
              f"stream2=tcp://{args.host}:{server.stream2_port}", flush=True)
        # a timeout keeps the main thread waking up, so signal handlers run promptly everywhere
        while not stop_requested.wait(0.5):
            pass
    finally:
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


if __name__ == "__main__":
    sys.exit(main())
