"""SIMPLON parameters: the DCU's metadata for one key, client-side validation, a value read with it."""
from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any

from .errors import (
    NotAllowedValueError,
    OutOfRangeError,
    ReadOnlyParameterError,
    WrongTypeError,
)

MODULES = ("detector", "stream", "filewriter", "monitor", "system")

_SCALAR_TYPES: dict[str, type] = {
    "bool": bool,
    "float": float,
    "int": int,
    "uint": int,
    "string": str,
    "date": str,
    "datetime": str,
    "State": str,
}
# "list" is how SIMPLON 1.8 names a list of strings (ADEiger maps it to string as well).
_ELEMENT_TYPES: dict[str, type] = {"list": str, "string[]": str, "float[]": float, "int[]": int, "uint[]": int}

# Images of the detector's size; a JSON read of them is a multi-megabyte darray that the 1.8 reference
# says is not properly supported (TIFF only), so the client never re-reads them on its own.
_IMAGE_PARAMETER_NAMES = ("flatfield", "pixel_mask")


def is_image_parameter(key: str) -> bool:
    """True for the 2-D parameters (``flatfield``, ``threshold/2/pixel_mask``, ...)."""
    return key.rsplit("/", 1)[-1] in _IMAGE_PARAMETER_NAMES


def _format_number(number: float | int) -> str:
    return repr(number) if isinstance(number, int) else f"{number:.6g}"


def _to_python(value: Any) -> Any:
    """NumPy scalars and arrays (as Tango hands them over) become plain Python values."""
    if getattr(value, "shape", None) == () and hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        return value.tolist()
    return value


def _infer_value_type(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, list):
        return "list"
    return "string"


def _limit(raw: Any) -> float | int | None:
    return raw if isinstance(raw, (int, float)) and not isinstance(raw, bool) else None


@dataclass(frozen=True)
class ParameterInfo:
    """What the DCU says about one parameter (SIMPLON §1.3/§1.4), without its value."""

    module: str
    task: str  # "config" | "status"
    key: str
    value_type: str
    access_mode: str = "rw"  # a config answer without access_mode means rw (SIMPLON §1.3)
    unit: str = ""
    min: float | int | None = None
    max: float | int | None = None
    allowed_values: tuple = ()

    @property
    def path(self) -> str:
        """``module/task/key``, the name used in messages."""
        return f"{self.module}/{self.task}/{self.key}"

    @property
    def readable(self) -> bool:
        return "r" in self.access_mode

    @property
    def writable(self) -> bool:
        return self.task == "config" and "w" in self.access_mode

    @property
    def is_array(self) -> bool:
        return self.value_type in _ELEMENT_TYPES or self.value_type.endswith("[]")

    @property
    def python_type(self) -> type:
        """bool, int, float, str or list; str for types this client does not know."""
        if self.is_array:
            return list
        return _SCALAR_TYPES.get(self.value_type, str)

    def validate(self, value: Any) -> Any:
        """Return ``value`` coerced to the parameter's type, or raise the specific client-side error."""
        if not self.writable:
            raise ReadOnlyParameterError(
                f"{self.path} is read-only on the DCU (access mode {self.access_mode!r}); it cannot be set"
            )
        value = _to_python(value)
        if self.is_array:
            return self._coerce_array(value)
        coerced = self._coerce_scalar(value)
        self._check_range(coerced)
        if self.allowed_values and coerced not in self.allowed_values:
            allowed = ", ".join(repr(v) for v in self.allowed_values)
            raise NotAllowedValueError(f"{self.path}: {coerced!r} is not allowed; allowed values: {allowed}")
        return coerced

    def _wrong_type(self, value: Any, expected: str) -> WrongTypeError:
        return WrongTypeError(
            f"{self.path} takes {expected} (value_type {self.value_type!r}), "
            f"got {value!r} of type {type(value).__name__}"
        )

    def _coerce_scalar(self, value: Any) -> Any:
        kind = self.python_type
        if kind is bool:
            if not isinstance(value, bool):
                raise self._wrong_type(value, "true or false")
            return value
        if kind is int:
            if isinstance(value, bool) or not isinstance(value, Real):
                raise self._wrong_type(value, "a whole number")
            if isinstance(value, Integral):
                return int(value)
            if not float(value).is_integer():
                raise self._wrong_type(value, "a whole number")
            return int(value)
        if kind is float:
            if isinstance(value, bool) or not isinstance(value, Real):
                raise self._wrong_type(value, "a number")
            if not math.isfinite(float(value)):
                raise OutOfRangeError(f"{self.path}: {value!r} is not a finite number")
            return float(value)
        if not isinstance(value, str):
            raise self._wrong_type(value, "text")
        return value

    def _coerce_array(self, value: Any) -> Any:
        if isinstance(value, dict):  # a darray ({"__darray__": ...}) goes to the DCU as it is
            return value
        if not isinstance(value, (list, tuple)):
            raise self._wrong_type(value, "a list")
        element_type = _ELEMENT_TYPES.get(self.value_type)
        if element_type is None:  # 2-D or unknown element type: the DCU checks the content
            return list(value)
        element_info = ParameterInfo(self.module, self.task, self.key, value_type=_TYPE_NAMES[element_type])
        return [element_info._coerce_scalar(_to_python(element)) for element in value]

    def _check_range(self, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return
        low = self.min if self.min is not None else (0 if self.value_type == "uint" else None)
        unit = f" {self.unit}" if self.unit else ""
        limits = ""
        if low is not None and self.max is not None:
            limits = f" (allowed {_format_number(low)}{unit} to {_format_number(self.max)}{unit})"
        if low is not None and value < low:
            raise OutOfRangeError(
                f"{self.path}: {_format_number(value)}{unit} is below the minimum {_format_number(low)}{unit}{limits}"
            )
        if self.max is not None and value > self.max:
            raise OutOfRangeError(
                f"{self.path}: {_format_number(value)}{unit} is above the maximum "
                f"{_format_number(self.max)}{unit}{limits}"
            )

    @classmethod
    def from_response(cls, module: str, task: str, key: str, body: dict) -> "ParameterInfo":
        """Build from the JSON object of a GET (SIMPLON §1.3 config, §1.4 status)."""
        value_type = body.get("value_type") or _infer_value_type(body.get("value"))
        # Status parameters are measurements; a status answer without access_mode is still read-only.
        access_mode = body.get("access_mode") or ("r" if task == "status" else "rw")
        return cls(
            module=module,
            task=task,
            key=key,
            value_type=str(value_type),
            access_mode=str(access_mode),
            unit=str(body.get("unit") or ""),
            min=_limit(body.get("min")),
            max=_limit(body.get("max")),
            allowed_values=tuple(body.get("allowed_values") or ()),
        )


_TYPE_NAMES = {bool: "bool", int: "int", float: "float", str: "string"}


@dataclass(frozen=True)
class ParameterValue:
    """One GET: the value with its metadata; ``time`` and ``state`` are present for status parameters."""

    info: ParameterInfo
    value: Any
    time: str | None = None
    state: str | None = None
