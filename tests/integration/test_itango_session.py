"""docs/itango.md, run as written: its session typed into the real ``itango`` console (fed by stdin)
against the stand-in, every output compared with the one the page shows; and its tab-completion
table, asked of IPython's completer with itango's extension loaded. The page is the test's input,
so the two cannot drift apart."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tango_dectris_live.standin.realistic import RealisticStandIn

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PAGE = Path(__file__).resolve().parents[2] / "docs" / "itango.md"
ITANGO = Path(sys.executable).parent / "itango"
SESSION_TIMEOUT = 240.0

_FENCE = re.compile(r"^```ipythonconsole\n(.*?)^```", re.MULTILINE | re.DOTALL)
_INPUT = re.compile(r"^In \[(\d+)\]: (.*)$")
_CONTINUATION = re.compile(r"^ *\.\.\.:(?: (.*))?$")
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_PROMPT = re.compile(r"In \[(\d+)\]: ")
_CONTINUATION_PROMPTS = re.compile(r"^(?: *\.\.\.: ?)+")
_COMPLETION_ROW = re.compile(r"^\| `([^`]+)` \| (`.+`) \|$", re.MULTILINE)


@dataclass(frozen=True)
class Cell:
    """One input of the session: its number, the code typed, the output the page shows."""

    number: int
    source: str
    expected: str


def session_cells(markdown: str) -> list[Cell]:
    """The ``ipythonconsole`` blocks of the page, in order, as cells numbered 1, 2, ..."""
    cells: list[Cell] = []
    for block in _FENCE.findall(markdown):
        number, source, output = None, [], []
        for line in block.splitlines():
            if (start := _INPUT.match(line)) is not None:
                if number is not None:
                    cells.append(Cell(number, "\n".join(source), _trimmed("\n".join(output))))
                number, source, output = int(start.group(1)), [start.group(2)], []
            elif (more := _CONTINUATION.match(line)) is not None and not output and number is not None:
                source.append(more.group(1) or "")
            elif number is not None:
                output.append(line)
        if number is not None:
            cells.append(Cell(number, "\n".join(source), _trimmed("\n".join(output))))
    numbers = [cell.number for cell in cells]
    assert numbers == list(range(1, len(cells) + 1)), f"{PAGE.name}: cells must be numbered 1, 2, ...: {numbers}"
    return cells


def completion_rows(markdown: str) -> dict[str, list[str]]:
    """The tab-completion table: what is typed -> the names offered."""
    return {typed: re.findall(r"`([^`]+)`", offered) for typed, offered in _COMPLETION_ROW.findall(markdown)}


def _trimmed(text: str) -> str:
    """Trailing spaces and surrounding blank lines do not count (a terminal does not show them)."""
    return "\n".join(line.rstrip() for line in text.splitlines()).strip("\n")


def outputs_by_cell(stdout: str) -> dict[int, str]:
    """What itango printed after each prompt ``In [n]:``, its continuation prompts removed (a
    blank line typed after a block prompts the same number again: its text is added)."""
    pieces = _PROMPT.split(_ANSI.sub("", stdout))
    outputs: dict[int, str] = {}
    for number, text in zip(pieces[1::2], pieces[2::2]):
        text = _CONTINUATION_PROMPTS.sub("", text)
        outputs[int(number)] = _trimmed(outputs.get(int(number), "") + text)
    return outputs


def matches(expected: str, actual: str) -> bool:
    """``actual`` equals ``expected``, where each ``...`` of ``expected`` stands for any text."""
    parts = expected.split("...")
    if len(parts) == 1:
        return expected == actual
    if not (actual.startswith(parts[0]) and actual.endswith(parts[-1])):
        return False
    position, end = len(parts[0]), len(actual) - len(parts[-1])
    for part in parts[1:-1]:
        found = actual.find(part, position, end)
        if found < 0:
            return False
        position = found + len(part)
    return position <= end


def test_the_page_parser_reads_cells_outputs_and_ellipses():
    """The helpers above on a small page (else the session test could pass by comparing nothing)."""
    page = ("```ipythonconsole\nIn [1]: x = [1,\n   ...:      2]\n\nIn [2]: x\nOut[2]: [1, 2]\n```\ntext\n"
            "```ipythonconsole\nIn [3]: for i in x:\n   ...:     print(i)\n   ...:\n1\n2\n```\n"
            "| `x.app` | `append` |\n")
    assert session_cells(page) == [Cell(1, "x = [1,\n     2]", ""), Cell(2, "x", "Out[2]: [1, 2]"),
                                   Cell(3, "for i in x:\n    print(i)\n", "1\n2")]
    assert completion_rows(page) == {"x.app": ["append"]}
    printed = "banner\nIn [1]:    ...: \nIn [1]: \nIn [2]: Out[2]: [1, 2]\n\nIn [3]:    ...:    ...: 1\n2\n\nIn [4]: "
    assert outputs_by_cell(printed) == {1: "", 2: "Out[2]: [1, 2]", 3: "1\n2", 4: ""}
    assert matches("'saved .../a.h5: 3 frames, ... MB'", "'saved /tmp/x/a.h5: 3 frames, 0.1 MB'")
    assert not matches("'saved .../a.h5: 3 frames'", "'saved /tmp/x/b.h5: 3 frames'")
    assert not matches("(256, 0)", "(255, 0)")


# ---- against the stand-in --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def standin():
    """A fresh stand-in: the page's session starts from a device that has run no series yet."""
    stand_in = RealisticStandIn()
    with stand_in:
        yield stand_in
    shutil.rmtree(stand_in.saving_base, ignore_errors=True)


@pytest.fixture
def console_env(standin, tmp_path):
    """itango's environment: the stand-in's database, and IPython's profile and jupyter's files in
    a scratch folder (itango installs its profile on first start)."""
    return dict(os.environ, TANGO_HOST=standin.tango_host, IPYTHONDIR=str(tmp_path / "ipython"),
                JUPYTER_DATA_DIR=str(tmp_path / "jupyter"), PYTHONWARNINGS="ignore")


def test_completion_offers_what_the_page_shows(console_env):
    if not ITANGO.exists():
        pytest.skip(f"itango is not installed in this environment ({ITANGO})")
    markdown = PAGE.read_text()
    rows = completion_rows(markdown)
    assert len(rows) >= 5, "the tab-completion table of docs/itango.md was not found"
    setup = session_cells(markdown)[0].source  # dev = Device("...")
    script = (
        "import json, sys\n"
        "import itango\n"
        "from IPython.core.completer import provisionalcompleter\n"
        "from IPython.core.interactiveshell import InteractiveShell\n"
        "shell = InteractiveShell.instance()\n"
        "itango.load_ipython_extension(shell)\n"
        "setup, texts = json.load(sys.stdin)\n"
        "shell.run_cell(setup).raise_error()\n"
        "with provisionalcompleter():\n"
        "    offered = {t: sorted({c.text for c in shell.Completer.completions(t, len(t))}) for t in texts}\n"
        "print(json.dumps(offered))\n")
    done = subprocess.run([sys.executable, "-c", script], input=json.dumps([setup, list(rows)]), text=True,
                          capture_output=True, env=console_env, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    offered = json.loads(done.stdout.strip().splitlines()[-1])
    wrong = {typed: {"page": sorted(names), "IPython": offered[typed]}
             for typed, names in rows.items() if sorted(names) != offered[typed]}
    assert not wrong, f"tab completion differs from docs/itango.md: {json.dumps(wrong, indent=1)}"


def test_the_session_runs_in_itango_as_written(console_env):
    if not ITANGO.exists():
        pytest.skip(f"itango is not installed in this environment ({ITANGO})")
    cells = session_cells(PAGE.read_text())
    assert len(cells) >= 30, "the session of docs/itango.md was not found"
    # a block's input ends with a blank line, as typed in a terminal; "exit" ends the console
    typed = "".join(cell.source + ("\n\n" if "\n" in cell.source else "\n") for cell in cells) + "exit\n"
    done = subprocess.run([str(ITANGO), "--colors=nocolor"], input=typed, text=True, capture_output=True,
                          env=console_env, timeout=SESSION_TIMEOUT, check=False)
    assert done.returncode == 0, f"itango exited with {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    printed = outputs_by_cell(done.stdout)
    differences = [f"In [{cell.number}]: {cell.source}\n  page:   {cell.expected!r}\n"
                   f"  itango: {printed.get(cell.number)!r}"
                   for cell in cells if not matches(cell.expected, printed.get(cell.number, "<not run>"))]
    assert not differences, ("the itango session differs from docs/itango.md:\n" + "\n".join(differences)
                             + f"\n\nstderr:\n{done.stderr[-2000:]}")
