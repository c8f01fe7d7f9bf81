"""How a SIMPLON parameter becomes a Tango attribute: its name, type, format and limits.

Names: detector config keys keep their SIMPLON name (``count_time``); ``/`` becomes ``_``
(``threshold/1/energy`` → ``threshold_1_energy``); detector status ``state``/``error`` become
``detector_state``/``detector_error``; keys of the other modules carry the module as prefix
(``stream_mode``, ``filewriter_name_pattern``, ``stream_dropped``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import tango

from ..simplon.parameters import ParameterInfo

_DETECTOR_STATUS_RENAMES = {"state": "detector_state", "error": "detector_error"}

# 2-D values (flatfield, pixel mask) are megabytes and not parameters a scientist sets from a GUI.
_SKIPPED_VALUE_TYPES = {"float[][]", "uint[][]", "int[][]"}

_SCALAR_TYPES = {
    "bool": tango.CmdArgType.DevBoolean,
    "float": tango.CmdArgType.DevDouble,
    "int": tango.CmdArgType.DevLong64,
    "uint": tango.CmdArgType.DevLong64,
    "string": tango.CmdArgType.DevString,
    "date": tango.CmdArgType.DevString,
    "datetime": tango.CmdArgType.DevString,
    "State": tango.CmdArgType.DevString,
}
_SPECTRUM_TYPES = {
    "list": tango.CmdArgType.DevString,
    "string[]": tango.CmdArgType.DevString,
    "float[]": tango.CmdArgType.DevDouble,
    "int[]": tango.CmdArgType.DevLong64,
    "uint[]": tango.CmdArgType.DevLong64,
}
MAX_SPECTRUM_LENGTH = 4096


def attribute_name(module: str, task: str, key: str) -> str:
    """The Tango attribute name of a SIMPLON key (see the module docstring)."""
    flat = key.replace("/", "_").replace("-", "_")
    if module == "detector":
        if task == "status":
            return _DETECTOR_STATUS_RENAMES.get(key, flat)
        return flat
    return f"{module}_{flat}"


@dataclass(frozen=True)
class SimplonAttribute:
    """One SIMPLON parameter exposed as a Tango attribute."""

    name: str
    info: ParameterInfo
    dtype: tango.CmdArgType
    dformat: tango.AttrDataFormat
    access: tango.AttrWriteType
    enum_labels: tuple[str, ...] = ()

    @property
    def module(self) -> str:
        return self.info.module

    @property
    def key(self) -> str:
        return self.info.key

    def to_tango(self, value: Any) -> Any:
        """DCU value → the value Tango sends (enum index, empty list for null spectra...)."""
        if self.enum_labels:
            if value not in self.enum_labels:
                raise ValueError(f"the DCU reports {self.key} = {value!r}, which is not one of its "
                                 f"allowed values {list(self.enum_labels)}")
            return self.enum_labels.index(value)
        if self.dformat == tango.AttrDataFormat.SPECTRUM:
            return [] if value is None else list(value)
        if value is None:
            raise ValueError(f"the DCU reports no valid value for {self.key} (null)")
        return value

    def from_tango(self, value: Any) -> Any:
        """A written Tango value → the DCU value."""
        if self.enum_labels:
            return self.enum_labels[int(value)]
        if self.dformat == tango.AttrDataFormat.SPECTRUM:
            return [v.item() if hasattr(v, "item") else v for v in value]
        if hasattr(value, "item"):  # numpy scalar → plain Python for JSON
            return value.item()
        return value


def _limit(value: float | int | None) -> str:
    return "-inf" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def _usable_as_enum(values: tuple | list) -> bool:
    """Whether allowed values can be DevEnum labels. PyTango clients build a Python Enum from the
    labels (space-separated names), so a label that is empty, contains a space (filewriter
    ``format``: "hdf5 nexus legacy nxmx") or repeats would break every client of the device;
    such keys stay strings, and the DCU client checks the value against the allowed list."""
    labels = [str(v) for v in values]
    return (bool(labels) and len(set(labels)) == len(labels)
            and all(label and not any(c.isspace() for c in label) for label in labels))


def describe_attribute(info: ParameterInfo) -> SimplonAttribute | None:
    """The Tango description of a parameter, or None if it is not exposed (2-D arrays,
    unknown value types)."""
    if info.value_type in _SKIPPED_VALUE_TYPES:
        return None
    name = attribute_name(info.module, info.task, info.key)
    writable = info.task == "config" and info.writable
    access = tango.AttrWriteType.READ_WRITE if writable else tango.AttrWriteType.READ
    if info.value_type in _SPECTRUM_TYPES:
        return SimplonAttribute(name, info, _SPECTRUM_TYPES[info.value_type],
                                tango.AttrDataFormat.SPECTRUM, access)
    dtype = _SCALAR_TYPES.get(info.value_type)
    if dtype is None:
        return None
    labels: tuple[str, ...] = ()
    if dtype == tango.CmdArgType.DevString and writable and _usable_as_enum(info.allowed_values):
        labels = tuple(str(v) for v in info.allowed_values)
        dtype = tango.CmdArgType.DevEnum
    return SimplonAttribute(name, info, dtype, tango.AttrDataFormat.SCALAR, access, labels)


def tango_attribute_kwargs(attr: SimplonAttribute) -> dict[str, Any]:
    """Keyword arguments for ``tango.server.attribute`` (unit, limits, labels, description)."""
    info = attr.info
    kwargs: dict[str, Any] = {
        "name": attr.name,
        "dtype": attr.dtype,
        "dformat": attr.dformat,
        "access": attr.access,
        "doc": f"SIMPLON {info.module}/{info.task}/{info.key} ({info.value_type}, "
               f"access {info.access_mode})",
    }
    if info.allowed_values and not attr.enum_labels:
        kwargs["doc"] += "; allowed values: " + ", ".join(repr(v) for v in info.allowed_values)
    if attr.dformat == tango.AttrDataFormat.SPECTRUM:
        kwargs["max_dim_x"] = MAX_SPECTRUM_LENGTH
    if info.unit:
        kwargs["unit"] = info.unit
    # The DCU's limits are NOT set as Tango min_value/max_value: cppTango would then refuse an
    # out-of-range write itself, with a message that does not name the limit. The DCU client
    # refuses it instead ("count_time: 5000 s is above the maximum 3600 s"); the limits are in
    # the description for people and GUIs.
    if info.min is not None or info.max is not None:
        kwargs["doc"] += f"; range {_limit(info.min)} .. {_limit(info.max)} {info.unit}".rstrip()
    if attr.enum_labels:
        kwargs["enum_labels"] = list(attr.enum_labels)
    return kwargs
