"""Addresses of C functions in shared libraries this process has already loaded.

The compiled receiver and decoder call libzmq and dectris-compression through such addresses
instead of linking them at build time: no library path or header is needed to build, and the
process uses one copy of each library (the one pyzmq / dectris-compression loaded)."""
from __future__ import annotations

import ctypes
from collections.abc import Iterable


def function_addresses(library_path: str, names: Iterable[str], missing_hint: str) -> dict[str, int]:
    """``{name: address}`` of each function ``names`` in ``library_path``; RuntimeError naming the
    function and ``missing_hint`` (what version is needed) when one is not exported."""
    library = ctypes.CDLL(library_path)
    addresses = {}
    for name in names:
        try:
            addresses[name] = ctypes.cast(getattr(library, name), ctypes.c_void_p).value
        except AttributeError:
            raise RuntimeError(f"{library_path} does not export {name}: {missing_hint}") from None
    return addresses
