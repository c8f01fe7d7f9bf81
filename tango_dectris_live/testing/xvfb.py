"""A virtual X screen for the GUI tests: Xvfb on a free display number."""
from __future__ import annotations

import os
import select
import shutil
import subprocess
import time


class XvfbError(RuntimeError):
    """Xvfb is missing or did not start; the message says which."""


def start_xvfb(screen: str = "1400x900x24", timeout: float = 30.0,
               terminate: bool = False) -> tuple[str, subprocess.Popen]:
    """Xvfb on a display number it picks itself (``-displayfd``): returns (":N", its process).
    ``terminate``: Xvfb ends when its last client disconnects."""
    xvfb = shutil.which("Xvfb")
    if xvfb is None:
        raise XvfbError("Xvfb is not installed (Debian xvfb: tools/debian-packages/gui.txt)")
    read_end, write_end = os.pipe()
    proc = subprocess.Popen([xvfb, "-displayfd", str(write_end), "-screen", "0", screen, "-nolisten", "tcp", "-br",
                             *(["-terminate"] if terminate else [])],
                            pass_fds=(write_end,), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    os.close(write_end)
    deadline = time.monotonic() + timeout
    text = b""
    try:
        while not text.endswith(b"\n"):
            ready, _, _ = select.select([read_end], [], [], max(0.0, deadline - time.monotonic()))
            chunk = os.read(read_end, 64) if ready else b""
            if not chunk:
                proc.kill()
                raise XvfbError(f"Xvfb gave no display number: {proc.communicate()[1].decode(errors='replace')}")
            text += chunk
    finally:
        os.close(read_end)
    return f":{int(text)}", proc
