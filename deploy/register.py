"""Register a DectrisLive device in the Tango database named by TANGO_HOST.

    python deploy/register.py INSTANCE DEVICE DCU_HOST [DCU_PORT] [options]

Adds device DEVICE of class DectrisLive to server ``DectrisLive/INSTANCE`` with its properties
(DcuHost, DcuPort and any ``--property NAME=VALUE``). With ``--starter HOST`` the server is also
put under the control of the Starter of HOST (startup level ``--level``), that Starter's device
``tango/admin/HOST`` is registered if it is not yet, and the folder of the ``DectrisLive``
executable is added to its StartDsPath. Running it again updates what it set; it removes nothing.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

SERVER = "DectrisLive"
DEVICE_CLASS = "DectrisLive"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 2)[2].strip(),
                                     usage="python deploy/register.py INSTANCE DEVICE DCU_HOST [DCU_PORT] [options]")
    parser.add_argument("instance", help="server instance: the server is DectrisLive/INSTANCE")
    parser.add_argument("device", help="device name domain/family/member, e.g. bl/det/eiger")
    parser.add_argument("dcu_host", help="host name or address of the DCU (the DcuHost property)")
    parser.add_argument("dcu_port", nargs="?", type=int, default=80, help="HTTP port of the DCU (default 80)")
    parser.add_argument("--property", "-p", action="append", default=[], metavar="NAME=VALUE",
                        help="another device property (StreamPort, SavingBaseDirectory, StatePollPeriod, ...); "
                             "repeat for more; a list as comma-separated values (NavShape=16,32)")
    starter = parser.add_argument_group("Starter (Astor's start and restart of servers)")
    starter.add_argument("--starter", metavar="HOST",
                         help="the host whose Starter (tango/admin/HOST, Starter/HOST) starts the server; "
                              "its short host name, as the Starter checks it")
    starter.add_argument("--level", type=int, default=1,
                         help="startup level of the server under the Starter (1..; default 1); 0: known "
                              "to the Starter but not controlled (never started nor restarted by it)")
    starter.add_argument("--start-ds-path", metavar="DIR", type=Path,
                         help="folder of the DectrisLive executable, added to the Starter's StartDsPath "
                              "(default: the bin folder of the Python running this script)")
    starter.add_argument("--auto-restart", metavar="MINUTES", type=int,
                         help="the Starter's AutoRestartDuration: it restarts a controlled server that "
                              "fails after running longer than this (for every server of the host; "
                              "0: never)")
    return parser


def _device_properties() -> set[str]:
    """The property names the DectrisLive class reads (an unknown name would be ignored silently)."""
    from tango.server import device_property

    from tango_dectris_live.device.dectris_live import DectrisLive

    return {name for name, value in vars(DectrisLive).items() if isinstance(value, device_property)}


def _parse_properties(pairs: list[str], known: set[str]) -> dict[str, list[str]]:
    properties: dict[str, list[str]] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise SystemExit(f"--property {pair!r}: expected NAME=VALUE")
        if name not in known:
            raise SystemExit(f"--property {name}: DectrisLive has no such property; it has "
                             f"{', '.join(sorted(known))}")
        properties[name] = value.split(",") if "," in value else [value]
    return properties


def _default_start_ds_path() -> Path:
    """The folder where pip put the DectrisLive executable for this Python (the venv's bin)."""
    return Path(sys.executable).parent


def _register_starter(db, host: str, ds_path: Path, auto_restart: int | None) -> list[str]:
    """tango/admin/HOST in server Starter/HOST if missing; DS_PATH in its StartDsPath."""
    import tango

    done = []
    starter = f"tango/admin/{host}"
    try:
        db.get_device_info(starter)
    except tango.DevFailed:
        info = tango.DbDevInfo()
        info.name, info._class, info.server = starter, "Starter", f"Starter/{host}"
        db.add_device(info)
        done.append(f"registered the Starter {starter} (server Starter/{host})")
    paths = list(db.get_device_property(starter, "StartDsPath")["StartDsPath"])
    if str(ds_path) not in paths:
        db.put_device_property(starter, {"StartDsPath": [*paths, str(ds_path)]})
        done.append(f"added {ds_path} to {starter}'s StartDsPath")
    if auto_restart is not None:
        db.put_device_property(starter, {"AutoRestartDuration": [str(auto_restart)]})
        done.append(f"set {starter}'s AutoRestartDuration to {auto_restart} min")
    return done


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if "TANGO_HOST" not in os.environ:
        raise SystemExit("TANGO_HOST is not set: export TANGO_HOST=host:port of the Tango database")
    if args.device.count("/") != 2:
        raise SystemExit(f"{args.device}: a device name is domain/family/member")
    properties = {"DcuHost": [args.dcu_host], "DcuPort": [str(args.dcu_port)],
                  **_parse_properties(args.property, _device_properties())}
    ds_path = (args.start_ds_path or _default_start_ds_path()).resolve()
    if args.starter and not (ds_path / SERVER).exists():
        raise SystemExit(f"{ds_path} has no {SERVER} executable: give --start-ds-path the folder where "
                         f"pip installed it (the venv's bin)")

    import tango

    server = f"{SERVER}/{args.instance}"
    try:
        db = tango.Database()
        info = tango.DbDevInfo()
        info.name, info._class, info.server = args.device, DEVICE_CLASS, server
        db.add_device(info)
        db.put_device_property(args.device, properties)
        report = [f"registered {args.device} in {server} on {db.get_db_host()}:{db.get_db_port()}",
                  "properties: " + ", ".join(f"{k}={','.join(v)}" for k, v in properties.items())]
        if args.starter:
            report += _register_starter(db, args.starter, ds_path, args.auto_restart)
            server_info = tango.DbServerInfo()
            server_info.name, server_info.host = server, args.starter
            server_info.mode, server_info.level = (1 if args.level > 0 else 0), args.level
            db.put_server_info(server_info)
            report.append(f"{server} controlled by the Starter of {args.starter} at startup level {args.level}"
                          if args.level > 0 else f"{server} on {args.starter}, not controlled by its Starter")
    except tango.DevFailed as exc:
        raise SystemExit(f"the Tango database at {os.environ['TANGO_HOST']} refused: {exc.args[0].desc}") from exc
    print("\n".join(report))


if __name__ == "__main__":
    main()
