"""The layering of docs/design.md: an arrow is "may import"; nothing below device/ imports tango;
sim/ is an independent implementation and imports nothing from tango_dectris_live. The compiled
sources (.pyx, .pxd) obey the same rules as the Python beside them."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = "tango_dectris_live"

# layer → the project layers it may import (besides itself)
ALLOWED = {
    "simplon": set(),
    "stream": set(),
    "receiver": {"stream"},
    "saving": {"receiver", "stream"},
    "processing": {"receiver", "stream", "simplon", "saving"},
    "component": {"processing", "receiver", "stream", "simplon", "saving"},
    "device": {"component", "processing", "receiver", "stream", "simplon", "saving"},
    # Client-side helpers of tests, demo and benchmarks: they talk to the device over Tango and to the
    # receiver over ZeroMQ, so a bug in the product cannot hide behind a helper sharing its code;
    # and being in ALLOWED, no product layer may import them.
    "testing": set(),
    # Sardana controllers and macros: clients of the device over Tango, like the tests' helpers
    "sardana": set(),
    # the stand-in device for GUI and macro developers: the real server on the simulator
    "standin": {"device", "testing"},
    # the ophyd-async detector: a client of the device over Tango
    "bluesky": set(),
    # the Taurus live panel: a client of the device over Tango
    "gui": set(),
}
TANGO_FREE = {"simplon", "stream", "receiver", "saving", "processing", "component"}
SOURCE_SUFFIXES = (".py", ".pyx", ".pxd")
# Cython: strings and comments first (a docstring may say "from pyzmq import ..."), then the imports.
_CYTHON_NOISE = re.compile(r'"""[\s\S]*?"""|\'\'\'[\s\S]*?\'\'\'|"[^"\n]*"|\'[^\'\n]*\'|#[^\n]*')
_CYTHON_FROM = re.compile(r"^[ \t]*from[ \t]+(\.*[\w.]*)[ \t]+c?import\b", re.M)
_CYTHON_IMPORT = re.compile(r"^[ \t]*c?import[ \t]+([\w. \t,]+)", re.M)


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _resolve(module: str, level: int, package: list[str]) -> str:
    """The absolute name of ``from <level dots><module> import``, written in ``package``."""
    if not level:
        return module
    base = package[: len(package) - level + 1]
    return ".".join(base + ([module] if module else []))


def _cython_imports(text: str, package: list[str]) -> set[str]:
    code = _CYTHON_NOISE.sub(lambda match: "\n" * match.group().count("\n"), text)
    names = set()
    for target in _CYTHON_FROM.findall(code):
        module = target.lstrip(".")
        names.add(_resolve(module, len(target) - len(module), package))
    for targets in _CYTHON_IMPORT.findall(code):
        names.update(item.split()[0] for item in targets.split(",") if item.strip())
    return names


def imported_modules(path: Path, module_name: str | None = None) -> set[str]:
    """Absolute names of the modules a .py, .pyx or .pxd file imports or cimports (relative imports
    resolved against ``module_name``, by default the file's own dotted name)."""
    text = path.read_text()
    package = (module_name or _module_name(path)).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    if path.suffix in (".pyx", ".pxd"):
        return _cython_imports(text, package)
    tree = ast.parse(text, filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = _resolve(node.module or "", node.level, package)
            if node.level and node.module is None:
                names.update(f"{module}.{alias.name}" for alias in node.names)
            else:
                names.add(module)
    return names


def _layer_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != PKG or len(parts) < 2:
        return None
    return parts[1]


def _sources(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix in SOURCE_SUFFIXES)


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_layer_imports_only_downward(layer):
    offences = []
    for path in _sources(ROOT / PKG / layer):
        for module in imported_modules(path):
            target = _layer_of(module)
            if target is not None and target in ALLOWED and target != layer and target not in ALLOWED[layer]:
                offences.append(f"{path.relative_to(ROOT)} imports {module}")
            if layer in TANGO_FREE and module.split(".")[0] == "tango":
                offences.append(f"{path.relative_to(ROOT)} imports tango")
    assert not offences, "upward or forbidden imports:\n" + "\n".join(offences)


def test_sim_is_independent_of_the_product():
    offences = [f"{p.relative_to(ROOT)} imports {m}"
                for p in _sources(ROOT / "sim") for m in imported_modules(p)
                if m.split(".")[0] == PKG]
    assert not offences, "\n".join(offences)


def test_every_compiled_source_is_inside_a_checked_package():
    """A .pyx or .pxd outside sim/ and the layers would escape the tests above."""
    skipped = {".git", ".venv", "build", "dist"}
    compiled = [p.relative_to(ROOT) for p in ROOT.rglob("*") if p.suffix in (".pyx", ".pxd")
                and not skipped & set(p.relative_to(ROOT).parts)]
    assert {"_receiver.pyx", "_stack_decode.pyx", "_pixel_sums.pyx", "_fastsend.pyx"} <= {p.name for p in compiled}
    outside = [str(p) for p in compiled
               if not (p.parts[0] == "sim" or (p.parts[0] == PKG and len(p.parts) > 2 and p.parts[1] in ALLOWED))]
    assert not outside, f"compiled sources outside sim/ and the layers of {PKG}: {outside}"


def test_the_checker_sees_a_violation(tmp_path):
    """The walker must catch relative and absolute upward imports (else the tests above prove nothing)."""
    probe = tmp_path / "probe.py"
    probe.write_text("from ..device import dectris_live\nimport tango_dectris_live.processing\nimport tango\n")
    found = imported_modules(probe, module_name=f"{PKG}.stream.probe")
    assert f"{PKG}.device" in found
    assert f"{PKG}.processing" in found
    assert "tango" in found


def test_the_checker_reads_cython_imports_and_skips_text(tmp_path):
    probe = tmp_path / "probe.pyx"
    probe.write_text('"""Docstring: from tango_dectris_live.device import nothing\nimport tango\n"""\n'
                     "# from tango_dectris_live.component import nothing\n"
                     "from libc.stdint cimport int64_t\n"
                     "from ..processing._pixel_sums cimport (frame_sums,\n    other)\n"
                     "cimport tango_dectris_live.device.dectris_live as device, numpy\n"
                     "from . import sibling\n"
                     'cdef extern from "pixel_kernels.h" nogil:\n    pass\n')
    found = imported_modules(probe, module_name=f"{PKG}.receiver._probe")
    assert found == {"libc.stdint", f"{PKG}.processing._pixel_sums", f"{PKG}.device.dectris_live", "numpy",
                     f"{PKG}.receiver"}
