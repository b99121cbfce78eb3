"""The import structure: no circles, and each layer imports only the layers below it (DESIGN.md)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("traces", "policies", "frontend", "sim", "real", "experiments")
# package -> the project packages it may import (besides itself)
ALLOWED = {
    "traces": set(),
    "policies": {"traces"},
    "frontend": {"traces", "policies"},
    "sim": {"traces", "policies", "frontend"},
    "real": {"traces", "policies", "frontend"},
    "experiments": set(PACKAGES),
}


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules ``path`` imports anywhere in it (top level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: _imports(p, modules) - {m} for m, p in modules.items()}


def test_each_layer_imports_only_the_layers_below_it():
    wrong = [(m, d) for m, deps in _graph().items() for d in deps
             if d.split(".")[0] != m.split(".")[0] and d.split(".")[0] not in ALLOWED[m.split(".")[0]]]
    assert not wrong, f"imports that cross the layering: {wrong}"


def test_the_import_graph_has_no_circle():
    graph = _graph()
    state: dict[str, int] = {}
    circles = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph[m]):
            if d in graph and graph[d] is not None:
                if state.get(d) == 1:
                    circles.append(path[path.index(d):] + [d])
                elif d not in state:
                    visit(d, path + [d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not circles, f"import circles: {circles}"


def test_every_module_imports_on_its_own():
    """Each module in a fresh interpreter (so no module works only because another filled a registry first).
    A module whose optional extra (rl, real) is not installed is passed over."""
    bad = []
    for m in _modules():
        r = subprocess.run([sys.executable, "-c", f"import {m}"], capture_output=True, text=True, cwd=ROOT,
                           timeout=120)
        last = r.stderr.strip().splitlines()[-1] if r.returncode else ""
        extra_missing = last.startswith("ModuleNotFoundError") and not any(f"'{p}" in last for p in PACKAGES)
        if r.returncode and not extra_missing:
            bad.append((m, last))
    assert not bad, bad
