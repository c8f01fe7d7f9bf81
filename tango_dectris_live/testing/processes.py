"""Ending what a demo or a benchmark started: its processes and theirs, by pid, never by name."""
from __future__ import annotations

import psutil


def stop_leftovers(started: list[psutil.Process], timeout: float = 15.0) -> list[str]:
    """Wait for ``started`` (taken with ``psutil.Process().children(recursive=True)`` before
    stopping them) to end; kill what does not, by pid. Returns ``"pid command"`` of each killed."""
    _, alive = psutil.wait_procs(started, timeout=timeout)
    killed = []
    for proc in alive:
        try:
            killed.append(f"{proc.pid} {' '.join(proc.cmdline())[:80]}")
            proc.kill()
        except psutil.NoSuchProcess:
            continue
    psutil.wait_procs(alive, timeout=5)
    return killed
