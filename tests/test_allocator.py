"""The allocator thresholds (tango_dectris_live.allocator): set once per process, observable in
where glibc places a block, and switched off by the environment variable."""
from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys

import pytest

from tango_dectris_live import allocator

glibc_only = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the thresholds are glibc's")

# In a fresh interpreter: tune (or not), then report whether a 4 MiB block was mmap'd: glibc marks
# such a chunk with IS_MMAPPED (0x2) in the size word right before the pointer it returns.
_PROBE = """
import ctypes, json, sys
from tango_dectris_live import allocator
mode = sys.argv[1]
if mode == "receiver":  # starting a receiver tunes its process
    from tango_dectris_live.receiver import StreamReceiver
    StreamReceiver("tcp://127.0.0.1:" + sys.argv[2], timeout=1.0).start().stop()
elif mode == "worker":  # so does a worker process' main function (here told to stop at once)
    import queue
    from tango_dectris_live.processing import runner
    tasks = queue.Queue()
    tasks.put(None)
    runner._worker_main(tasks, None, None)
outcome = allocator.tune_allocator() if mode == "tune" else allocator._outcome
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
block = libc.malloc(4 << 20)
size_word = ctypes.c_size_t.from_address(block - ctypes.sizeof(ctypes.c_size_t)).value
libc.free(block)
print(json.dumps({"outcome": outcome, "again": allocator.tune_allocator() if mode == "tune" else None,
                  "mmapped": bool(size_word & 2)}))
"""


def _probe(mode: str, *args: str, **env: str) -> dict:
    result = subprocess.run([sys.executable, "-c", _PROBE, mode, *args], capture_output=True, text=True, timeout=120,
                            env={**os.environ, **env})
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


@glibc_only
def test_tuned_allocator_keeps_large_blocks_on_the_heap():
    untouched = _probe("plain", **{allocator.ENV_VARIABLE: "tuned"})
    tuned = _probe("tune", **{allocator.ENV_VARIABLE: "tuned"})
    assert untouched["mmapped"], "glibc's default threshold (128 KiB) should mmap a 4 MiB block"
    assert untouched["outcome"] is None
    assert tuned == {"outcome": "tuned", "again": "tuned", "mmapped": False}


@glibc_only
def test_environment_variable_leaves_glibc_defaults():
    disabled = _probe("tune", **{allocator.ENV_VARIABLE: "default"})
    assert disabled == {"outcome": "disabled", "again": "disabled", "mmapped": True}


@glibc_only
@pytest.mark.parametrize("entry", ["receiver", "worker"])
def test_receiver_and_workers_tune_their_process(entry):
    with socket.socket() as probe_socket:  # a free loopback port for the receiver to connect to
        probe_socket.bind(("127.0.0.1", 0))
        port = probe_socket.getsockname()[1]
    probe = _probe(entry, str(port), **{allocator.ENV_VARIABLE: "tuned"})
    assert probe == {"outcome": "tuned", "again": None, "mmapped": False}
