"""DCU (SIMPLON REST) client: typed parameters with metadata, commands, specific errors. Tango-free."""
from .client import (
    ACTIVITY_EVENTS,
    SUPPORTED_API_VERSIONS,
    ActivityListener,
    ChangedCallback,
    DetectorClient,
    Timeouts,
)
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
    "ACTIVITY_EVENTS",
    "MODULES",
    "SUPPORTED_API_VERSIONS",
    "ActivityListener",
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
