"""The layering of DESIGN.md: an arrow is "may import"; nothing below device/ imports tango;
sim/ is an independent implementation and imports nothing from tango_dectris_live."""
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
    "processing": {"receiver", "stream", "simplon"},
    "device": {"processing", "receiver", "stream", "simplon"},
}
TANGO_FREE = {"simplon", "stream", "receiver", "processing"}
_CYTHON_IMPORT = re.compile(r"^\s*(?:from\s+([\w.]+)\s+c?import|c?import\s+([\w.]+))", re.M)


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imported_modules(path: Path, module_name: str | None = None) -> set[str]:
    """Absolute names of the modules a .py or .pyx file imports (relative imports resolved
    against ``module_name``, by default the file's own dotted name)."""
    text = path.read_text()
    if path.suffix == ".pyx":
        return {a or b for a, b in _CYTHON_IMPORT.findall(text)}
    tree = ast.parse(text, filename=str(path))
    package = (module_name or _module_name(path)).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
                if node.module is None:
                    names.update(f"{module}.{alias.name}" for alias in node.names)
                else:
                    names.add(module)
            else:
                names.add(node.module or "")
    return names


def _layer_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != PKG or len(parts) < 2:
        return None
    return parts[1]


def _sources(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix in (".py", ".pyx"))


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


def test_the_checker_sees_a_violation(tmp_path):
    """The walker must catch relative and absolute upward imports (else the tests above prove nothing)."""
    probe = tmp_path / "probe.py"
    probe.write_text("from ..device import dectris_live\nimport tango_dectris_live.processing\nimport tango\n")
    found = imported_modules(probe, module_name=f"{PKG}.stream.probe")
    assert f"{PKG}.device" in found
    assert f"{PKG}.processing" in found
    assert "tango" in found
