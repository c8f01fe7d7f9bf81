"""A worker pool that cannot start (too few file descriptors) fails with a clear error and leaves
nothing behind: the next pool starts and works."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from tango_dectris_live.processing.limits import MachineLimits, SettingRefused, check_workers

SCRIPT = textwrap.dedent("""
    import multiprocessing, resource, sys
    from tango_dectris_live.processing.runner import WorkerPool, WorkerStartError

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
    try:
        WorkerPool(60)
    except WorkerStartError as error:
        print("refused:", error)
    else:
        sys.exit("a pool of 60 workers started with 64 file descriptors")
    left = multiprocessing.active_children()
    if left:
        sys.exit(f"processes left behind: {left}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    pool = WorkerPool(2)
    pool.check_alive()
    pool.close()
    print("next pool ok")
""")


def test_a_pool_that_cannot_start_cleans_up_and_the_next_one_works():
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr + done.stdout
    assert "refused: could not start 60 worker processes" in done.stdout
    assert "next pool ok" in done.stdout


def _limits(**changes) -> MachineLimits:
    values = dict(cores=2, open_files_limit=1024, open_files=40, available_memory=8 << 30,
                  shared_memory_free=4 << 30)
    values.update(changes)
    return MachineLimits(**values)


def test_workers_are_checked_against_cores_and_file_descriptors():
    assert check_workers(8, _limits()) == 8
    with pytest.raises(SettingRefused, match="at most 8 on this machine"):
        check_workers(9, _limits())
    with pytest.raises(SettingRefused, match="file descriptors"):
        check_workers(8, _limits(open_files_limit=100))


ORPHAN_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from tango_dectris_live.processing.runner import WorkerPool

    pool = WorkerPool(2)
    pool.check_alive()
    with open(sys.argv[1], "w") as out:
        out.write(" ".join(str(p.pid) for p in pool._processes))
    os.kill(os.getpid(), signal.SIGKILL)  # as a server killed by its supervisor: no clean-up at all
""")


def test_workers_end_when_their_server_is_killed(tmp_path):
    import psutil

    from tango_dectris_live.testing import wait_for

    pid_file = tmp_path / "workers"
    # no pipes shared with the workers: a worker left behind must not hang this test
    done = subprocess.run([sys.executable, "-c", ORPHAN_SCRIPT, str(pid_file)], stdin=subprocess.DEVNULL,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)
    assert done.returncode == -9
    pids = [int(pid) for pid in pid_file.read_text().split()]
    assert len(pids) == 2

    def alive() -> list[int]:
        return [pid for pid in pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]

    try:
        wait_for(lambda: not alive(), 30, lambda: f"the workers {alive()} ended")
    finally:
        for pid in alive():
            psutil.Process(pid).kill()
