"""``tango-dectris-live``: start the DectrisLive device server the standard pytango way.

    tango-dectris-live INSTANCE                      # devices and properties from the Tango DB
    tango-dectris-live INSTANCE -nodb -port 10000 -dlist det/eiger/1 --dcu 10.0.0.5:80

``--dcu HOST:PORT`` gives the DCU address to devices whose DcuHost property is not set (needed with
-nodb, where no properties exist). Every other argument goes to Tango unchanged.
"""
from __future__ import annotations

import os
import signal
import sys

SERVER_NAME = "DectrisLive"


def _take_dcu_option(args: list[str]) -> list[str]:
    """Remove ``--dcu HOST[:PORT]`` from ``args`` and export it for the device."""
    from .dectris_live import ENV_DCU_HOST, ENV_DCU_PORT

    remaining = []
    it = iter(args)
    for arg in it:
        if arg == "--dcu" or arg.startswith("--dcu="):
            value = arg.split("=", 1)[1] if "=" in arg else next(it, "")
            if not value:
                raise SystemExit("--dcu needs HOST or HOST:PORT")
            host, _, port = value.partition(":")
            os.environ[ENV_DCU_HOST] = host
            if port:
                if not port.isdigit():
                    raise SystemExit(f"--dcu {value}: the port must be a number")
                os.environ[ENV_DCU_PORT] = port
            continue
        remaining.append(arg)
    return remaining


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(__doc__)
        raise SystemExit(0 if args else 2)
    args = _take_dcu_option(args)

    # A parent may hand down blocked signals (Debian's Starter blocks SIGTERM): then `kill`, systemd's
    # stop and Ctrl-C would stay pending for ever and the server never shut down cleanly.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT})

    from tango.server import run

    from .dectris_live import DectrisLive

    run((DectrisLive,), args=[SERVER_NAME, *args])


if __name__ == "__main__":
    main()
