"""Exceptions of the DCU client: one class per way a SIMPLON call can fail.

Each message says what was asked, of which DCU, and what to do about it, so the Tango device can put
it into its Status unchanged.
"""
from __future__ import annotations


class SimplonError(Exception):
    """Base class of every error raised by :mod:`tango_dectris_live.simplon`."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class DcuConnectionError(SimplonError):
    """The DCU could not be reached: connection refused, unknown host, broken connection."""


class DcuTimeoutError(DcuConnectionError):
    """A call took longer than its timeout (the message names the call and the timeout)."""


class DcuRequestError(SimplonError):
    """The DCU answered with a non-2xx status; ``dcu_message`` is its body text."""

    def __init__(self, message: str, *, status_code: int, dcu_message: str, url: str, method: str) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.dcu_message = dcu_message
        self.url = url
        self.method = method


class UnknownParameterError(DcuRequestError):
    """HTTP 404: the DCU has no such parameter, listing or command."""


class InvalidValueError(DcuRequestError):
    """HTTP 400 on a PUT: the DCU refused the value (type, range, allowed values, read-only)."""


class DetectorNotInitializedError(DcuRequestError):
    """The detector is in state ``na``: its configuration does not exist until Initialize."""


class ReadOnlyParameterError(SimplonError):
    """Refused before sending: the DCU's metadata says the parameter is read-only."""


class WrongTypeError(SimplonError, TypeError):
    """Refused before sending: the value does not have the parameter's type (e.g. text for a float)."""


class OutOfRangeError(SimplonError, ValueError):
    """Refused before sending: the value lies outside the DCU's min/max for the parameter."""


class NotAllowedValueError(SimplonError, ValueError):
    """Refused before sending: the value is not one of the DCU's allowed values for the parameter."""
