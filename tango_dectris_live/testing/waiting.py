"""Polling with a deadline: how tests, the demo and the benchmarks wait for something to happen."""
from __future__ import annotations

import time
from typing import Callable, TypeVar

T = TypeVar("T")


def wait_for(condition: Callable[[], T], timeout: float = 20.0, what: str | Callable[[], str] = "condition",
             interval: float = 0.05) -> T:
    """Return the first truthy value of ``condition()``, polled every ``interval`` seconds.

    After ``timeout`` seconds raise :class:`TimeoutError` naming ``what`` and the last value seen;
    ``what`` may be a callable, called only then (so that a status it reads is the one at the end).
    """
    deadline = time.monotonic() + timeout
    while True:
        last = condition()
        if last:
            return last
        if time.monotonic() > deadline:
            described = what() if callable(what) else what
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {described} (last: {last!r})")
        time.sleep(interval)
