"""DectrisLive's interface as a tango-simlib description: a fandango ``.fgo`` export of the device.

The description is read from a running device (the realistic stand-in, so that the SIMPLON
attributes of a real detector model are there with the DCU's types, units, ranges and enum
labels), not written by hand: every attribute with its Tango type, format, access, unit,
description, enum labels and the value it had, and every command with its argument types and
documentation. tango-simlib's ``FandangoExportDeviceParser`` reads it (``--simlib`` builds a
device from it); the tests hold it against the docs and against a running device.

Regenerate after changing the device's interface::

    python -m tango_dectris_live.standin.description            # writes DectrisLive_ARINA.fgo here
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import tango

from .realistic import DEFAULT_MODEL, MODEL_NAMES, RealisticStandIn

DESCRIPTION_DIRECTORY = Path(__file__).resolve().parent
# Attributes and commands every Tango device has (not part of DectrisLive's own interface).
TANGO_STANDARD_ATTRIBUTES = frozenset({"State", "Status"})
TANGO_STANDARD_COMMANDS = frozenset({"Init", "State", "Status"})
# The fields that make the interface (a value or a timestamp is not part of it).
ATTRIBUTE_INTERFACE_FIELDS = ("data_type", "data_format", "writable", "unit", "description", "enum_labels",
                              "max_dim_x", "max_dim_y")
COMMAND_INTERFACE_FIELDS = ("in_type", "out_type", "in_type_desc", "out_type_desc")
_NOT_SPECIFIED = "Not specified"


def description_path(model: str = DEFAULT_MODEL) -> Path:
    """The committed description of DectrisLive on a simulated ``model``."""
    return DESCRIPTION_DIRECTORY / f"DectrisLive_{model}.fgo"


def _json_value(value: Any, info: tango.AttributeInfoEx) -> Any:
    """An attribute's value as the .fgo holds it (enum and state as their index, arrays as lists);
    images are left empty: tango-simlib would otherwise build a max_dim_x × max_dim_y list."""
    if info.data_format == tango.AttrDataFormat.IMAGE:
        return []
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (tuple, list)):
        return [_json_value(item, info) for item in value]
    if isinstance(value, (tango.DevState, int, np.integer)) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def _attribute_entry(proxy: tango.DeviceProxy, info: tango.AttributeInfoEx, simplon_key: str | None) -> dict:
    entry: dict[str, Any] = {
        "name": info.name,
        "label": info.label,
        "description": info.description,
        "data_type": str(tango.CmdArgType.values[info.data_type]),
        "data_format": str(info.data_format),
        "writable": str(info.writable),
        "unit": info.unit,
        "display_unit": info.display_unit,
        "standard_unit": info.standard_unit,
        "format": info.format,
        "enum_labels": list(info.enum_labels),
        "max_dim_x": info.max_dim_x,
        "max_dim_y": info.max_dim_y,
        "min_value": info.min_value,
        "max_value": info.max_value,
        "min_alarm": info.min_alarm,
        "max_alarm": info.max_alarm,
        "memorized": str(info.memorized),
        "polling": 0,
        "events": {"per_event": {"period": _NOT_SPECIFIED},
                   "ch_event": {"abs_change": _NOT_SPECIFIED, "rel_change": _NOT_SPECIFIED},
                   "arch_event": {"archive_abs_change": _NOT_SPECIFIED, "archive_rel_change": _NOT_SPECIFIED,
                                  "archive_period": _NOT_SPECIFIED}},
        "alarms": {"min_warning": _NOT_SPECIFIED, "max_warning": _NOT_SPECIFIED, "delta_t": _NOT_SPECIFIED,
                   "delta_val": _NOT_SPECIFIED},
    }
    if simplon_key is not None:
        entry["simplon_key"] = simplon_key
    try:
        reading = proxy.read_attribute(info.name)
    except tango.DevFailed as exc:  # e.g. a DCU key that cannot be read now: the interface is still there
        entry["read_error"] = exc.args[0].desc
    else:
        entry["value"] = _json_value(reading.value, info)
        entry["quality"] = str(reading.quality)
    return entry


def describe_device(proxy: tango.DeviceProxy, generated_by: str = "") -> dict[str, Any]:
    """The .fgo description of the device behind ``proxy`` (attributes sorted by name)."""
    simplon = dict(line.split(" ", 1) for line in proxy.ListSimplonAttributes())
    attributes = {info.name: _attribute_entry(proxy, info, simplon.get(info.name))
                  for info in sorted(proxy.attribute_list_query_ex(), key=lambda i: i.name)}
    commands = {}
    for info in sorted(proxy.command_list_query(), key=lambda i: i.cmd_name):
        commands[info.cmd_name] = {
            "name": info.cmd_name, "cmd_name": info.cmd_name, "in_type": str(info.in_type),
            "out_type": str(info.out_type), "in_type_desc": info.in_type_desc, "out_type_desc": info.out_type_desc,
            "disp_level": str(info.disp_level), "cmd_tag": info.cmd_tag}
    device_info = proxy.info()
    return {"generated_by": generated_by, "name": proxy.dev_name(), "dev_class": device_info.dev_class,
            "server": device_info.server_id, "host": "", "level": "", "properties": {}, "class_properties": {},
            "attributes": attributes, "commands": commands}


def interface_of(description: dict[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """What two descriptions must agree on: per attribute and command, the interface fields."""
    return {
        "attributes": {name: {field: entry[field] for field in ATTRIBUTE_INTERFACE_FIELDS}
                       for name, entry in description["attributes"].items()},
        "commands": {name: {field: entry[field] for field in COMMAND_INTERFACE_FIELDS}
                     for name, entry in description["commands"].items()},
    }


def live_attributes(description: dict[str, Any]) -> list[str]:
    """DectrisLive's own attributes: neither a SIMPLON parameter nor a Tango standard one."""
    return sorted(name for name, entry in description["attributes"].items()
                  if "simplon_key" not in entry and name not in TANGO_STANDARD_ATTRIBUTES)


def device_commands(description: dict[str, Any]) -> list[str]:
    return sorted(set(description["commands"]) - TANGO_STANDARD_COMMANDS)


def load_description(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def write_description(description: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(description, indent=1, sort_keys=False) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL, choices=MODEL_NAMES,
                        help=f"simulated detector (default {DEFAULT_MODEL})")
    parser.add_argument("--output", type=Path, default=None,
                        help="file to write (default: DectrisLive_<MODEL>.fgo beside this module)")
    args = parser.parse_args(argv)
    output = args.output or description_path(args.model)
    with tempfile.TemporaryDirectory(prefix="dectris-describe-") as saving, \
            RealisticStandIn(model=args.model, saving_base=Path(saving)) as standin:
        description = describe_device(
            standin.proxy, generated_by=f"python -m tango_dectris_live.standin.description --model {args.model}")
    write_description(description, output)
    print(f"wrote {output}: {len(description['attributes'])} attributes, {len(description['commands'])} commands")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
