"""DCU (SIMPLON REST) client: typed parameters with metadata, commands, specific errors. Tango-free."""
from .client import SUPPORTED_API_VERSIONS, ChangedCallback, DetectorClient, Timeouts
from .errors import (
    DcuConnectionError,
    DcuRequestError,
    DcuTimeoutError,
    DetectorNotInitializedError,
    InvalidValueError,
    NotAllowedValueError,
    OutOfRangeError,
    ReadOnlyParameterError,
    SimplonError,
    UnknownParameterError,
    WrongTypeError,
)
from .parameters import MODULES, ParameterInfo, ParameterValue, is_image_parameter

__all__ = [
    "MODULES",
    "SUPPORTED_API_VERSIONS",
    "ChangedCallback",
    "DcuConnectionError",
    "DcuRequestError",
    "DcuTimeoutError",
    "DetectorClient",
    "DetectorNotInitializedError",
    "InvalidValueError",
    "NotAllowedValueError",
    "OutOfRangeError",
    "ParameterInfo",
    "ParameterValue",
    "ReadOnlyParameterError",
    "SimplonError",
    "Timeouts",
    "UnknownParameterError",
    "WrongTypeError",
    "is_image_parameter",
]
