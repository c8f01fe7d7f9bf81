"""`simplon-sim` / `python -m sim` as a user starts them: one `listening:` line, clean exit on
SIGTERM and Ctrl-C."""
from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import requests

LISTENING = re.compile(r"listening: rest=(http://127\.0\.0\.1:(\d+)) stream=tcp://127\.0\.0\.1:(\d+) "
                       r"stream2=tcp://127\.0\.0\.1:(\d+)")
CONSOLE_SCRIPT = Path(sys.executable).parent / "simplon-sim"
ARGS = ["--host", "127.0.0.1", "--port", "0", "--stream-port", "0", "--stream2-port", "0"]


def _run_until_signal(command: list[str], stop_signal: signal.Signals) -> tuple[str, str, int]:
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline().strip()  # the test's timeout bounds this
        match = LISTENING.fullmatch(line)
        assert match, f"unexpected first line {line!r}"
        rest_url = match.group(1)
        assert int(match.group(2)) > 0
        version = requests.get(rest_url + "/detector/api/version", timeout=10)
        assert version.json() == {"value": "1.8.0", "value_type": "string"}
        assert requests.put(rest_url + "/detector/api/1.8.0/command/initialize", timeout=10).status_code == 200
        description = requests.get(rest_url + "/detector/api/1.8.0/config/description", timeout=10).json()
        process.send_signal(stop_signal)
        out, err = process.communicate(timeout=20)
        return description["value"], err, process.returncode
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()


@pytest.mark.timeout(60)
@pytest.mark.skipif(not CONSOLE_SCRIPT.exists(), reason=f"console script not installed at {CONSOLE_SCRIPT}")
def test_console_script_serves_and_stops_on_sigterm():
    description, err, code = _run_until_signal([str(CONSOLE_SCRIPT), *ARGS, "--model", "ARINA"], signal.SIGTERM)
    assert description == "Dectris ARINA Si 36K"
    assert code == 0
    assert err == ""  # quiet: no per-request log lines without --verbose


@pytest.mark.timeout(60)
def test_python_dash_m_sim_stops_on_ctrl_c():
    description, err, code = _run_until_signal([sys.executable, "-m", "sim", *ARGS], signal.SIGINT)
    assert description == "Dectris QUADRO Si 250K"
    assert code == 0 and err == ""


@pytest.mark.timeout(60)
def test_verbose_logs_requests():
    description, err, code = _run_until_signal([sys.executable, "-m", "sim", *ARGS, "--verbose"], signal.SIGTERM)
    assert code == 0
    assert '"GET /detector/api/version HTTP/1.1" 200' in err


def test_unknown_model_is_refused_by_the_parser():
    result = subprocess.run([sys.executable, "-m", "sim", "--model", "PILATUS"], capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 2
    assert "invalid choice: 'PILATUS'" in result.stderr
