"""SIMPLON parameters with their metadata: validation of written values and the GET JSON shapes.

A :class:`Parameter` knows its type, access mode, unit, limits and allowed values, checks a value
a client wants to write and renders itself as the JSON a DCU answers for a config (SIMPLON.md
§1.3) or status (§1.4) GET. A :class:`ParameterStore` holds the parameters of one module's config
or status. Neither knows anything about the detector's state or interdependencies.
"""
from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

READ_ONLY = "r"
WRITE_ONLY = "w"
READ_WRITE = "rw"


class ParameterNotFound(LookupError):
    """The module has no parameter of that name (HTTP 404)."""

    def __init__(self, key: str) -> None:
        super().__init__(f"Parameter {key} does not exist")
        self.key = key

    def __str__(self) -> str:
        return str(self.args[0])


class InvalidParameterValue(ValueError):
    """A written value was refused: wrong type, out of range, not allowed, read-only (HTTP 400)."""


def now_iso() -> str:
    """The current time as ISO-8601 with milliseconds and UTC offset (what a DCU reports)."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def format_value(value: Any) -> str:
    """A value as it appears in an error message: the JSON spelling (strings quoted)."""
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


def _is_number(value: Any) -> bool:
    # bool is an int subclass in Python, but `true` is not a number in SIMPLON
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class Parameter:
    """One SIMPLON parameter (config or status) and its metadata."""

    key: str
    value: Any
    value_type: str
    access_mode: str = READ_WRITE
    unit: str | None = None
    min: float | None = None
    max: float | None = None
    allowed_values: list[Any] | None = None
    # SIMPLON quirk: some keys work but a real DCU leaves them out of `.../keys` (wavelength, error)
    listed: bool = True
    # status parameters only
    critical_limits: tuple[float | None, float | None] | None = None
    critical_values: list[Any] | None = None
    time: str = field(default_factory=now_iso)

    def config_json(self) -> dict[str, Any]:
        """The body of a config GET: only the metadata keys that apply are present."""
        body: dict[str, Any] = {"value": self.value, "value_type": self.value_type,
                                "access_mode": self.access_mode}
        if self.unit is not None:
            body["unit"] = self.unit
        if self.min is not None:
            body["min"] = self.min
        if self.max is not None:
            body["max"] = self.max
        if self.allowed_values is not None:
            body["allowed_values"] = list(self.allowed_values)
        return body

    def status_json(self) -> dict[str, Any]:
        """The body of a status GET, with the state (`normal` / `critical`) worked out."""
        body: dict[str, Any] = {"value": self.value, "value_type": self.value_type,
                                "time": self.time, "state": self.health()}
        if self.unit is not None:
            body["unit"] = self.unit
        if self.critical_limits is not None:
            body["critical_limits"] = list(self.critical_limits)
        if self.critical_values is not None:
            body["critical_values"] = list(self.critical_values)
        if self.allowed_values is not None:
            body["allowed_values"] = list(self.allowed_values)
        return body

    def health(self) -> str:
        """`critical` when the value is outside its critical limits or one of its critical values."""
        if self.critical_values is not None and self.value in self.critical_values:
            return "critical"
        if self.critical_limits is not None and _is_number(self.value):
            low, high = self.critical_limits
            if (low is not None and self.value < low) or (high is not None and self.value > high):
                return "critical"
        return "normal"

    def check_write(self, raw: Any) -> Any:
        """Return ``raw`` converted to this parameter's type, or raise InvalidParameterValue."""
        if self.access_mode == READ_ONLY:
            raise InvalidParameterValue(
                f"{self.key}: read-only parameter, cannot be set to {format_value(raw)}")
        value = self._convert(raw)
        self._check_limits(value)
        if self.allowed_values and value not in self.allowed_values:
            allowed = ", ".join(format_value(v) for v in self.allowed_values)
            raise InvalidParameterValue(
                f"{self.key}: {format_value(raw)} is not one of the allowed values {allowed}")
        return value

    def _convert(self, raw: Any) -> Any:
        kind = self.value_type
        shown = format_value(raw)
        if kind == "bool":
            if not isinstance(raw, bool):
                raise InvalidParameterValue(f"{self.key}: {shown} is not a bool (true or false)")
            return raw
        if kind == "float":
            if not _is_number(raw) or not math.isfinite(raw):
                raise InvalidParameterValue(f"{self.key}: {shown} is not a finite number (float)")
            return float(raw)
        if kind in ("int", "uint"):
            if not _is_number(raw):
                raise InvalidParameterValue(f"{self.key}: {shown} is not a whole number ({kind})")
            if isinstance(raw, float) and not (math.isfinite(raw) and raw.is_integer()):
                raise InvalidParameterValue(f"{self.key}: {shown} is not a whole number ({kind})")
            value = int(raw)
            if kind == "uint" and value < 0:
                raise InvalidParameterValue(f"{self.key}: {shown} is negative, a uint must be >= 0")
            return value
        if kind == "string":
            if not isinstance(raw, str):
                raise InvalidParameterValue(f"{self.key}: {shown} is not a string")
            return raw
        if kind in ("list", "string[]"):
            if not isinstance(raw, list) or not all(isinstance(item, str) for item in raw):
                raise InvalidParameterValue(f"{self.key}: {shown} is not a list of strings")
            return list(raw)
        if kind in ("float[]", "int[]", "uint[]"):
            if not isinstance(raw, list) or not all(_is_number(item) for item in raw):
                raise InvalidParameterValue(f"{self.key}: {shown} is not a list of numbers ({kind})")
            return [float(item) if kind == "float[]" else int(item) for item in raw]
        raise InvalidParameterValue(f"{self.key}: values of type {kind} cannot be written here")

    def _check_limits(self, value: Any) -> None:
        if not _is_number(value):
            return
        unit = f" {self.unit}" if self.unit else ""
        if self.min is not None and value < self.min:
            raise InvalidParameterValue(
                f"{self.key}: {format_value(value)} is below the minimum {format_value(self.min)}{unit}")
        if self.max is not None and value > self.max:
            raise InvalidParameterValue(
                f"{self.key}: {format_value(value)} is above the maximum {format_value(self.max)}{unit}")


class ParameterStore:
    """The parameters of one module's config or status, by key (keys may contain slashes)."""

    def __init__(self, parameters: Iterable[Parameter]) -> None:
        self._parameters: dict[str, Parameter] = {}
        for parameter in parameters:
            if parameter.key in self._parameters:
                raise ValueError(f"parameter {parameter.key} is defined twice")
            self._parameters[parameter.key] = parameter

    def __contains__(self, key: object) -> bool:
        return key in self._parameters

    def __getitem__(self, key: str) -> Parameter:
        try:
            return self._parameters[key]
        except KeyError:
            raise ParameterNotFound(key) from None

    def value(self, key: str) -> Any:
        return self[key].value

    def set(self, key: str, value: Any) -> bool:
        """Set a value without validation (the simulator's own updates); True if it changed."""
        parameter = self[key]
        changed = parameter.value != value
        parameter.value = value
        parameter.time = now_iso()
        return changed

    def listed_keys(self) -> list[str]:
        """What `.../keys` answers: every key a real DCU lists, sorted."""
        return sorted(key for key, parameter in self._parameters.items() if parameter.listed)

    def snapshot(self) -> dict[str, Any]:
        """Every value by key (listed or not), e.g. for the stream header's detector config."""
        return {key: parameter.value for key, parameter in self._parameters.items()}
