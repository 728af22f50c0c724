"""Benchmarks are not run by the suite (they take minutes), so a renamed or moved project name would only break them
when someone needs a figure. Every project import they make, lazy ones included, must
resolve: the module imports and has the name."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "benchmarks").glob("*.py"))


def _project_imports(path: Path) -> list[tuple[int, str, str | None]]:
    """(line, module, name or None) for every `import pathdino...` / `from tiling... import name` in the file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] in ("pathdino", "tiling"):
                found += [(node.lineno, node.module, alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [
                (node.lineno, alias.name, None)
                for alias in node.names
                if alias.name.split(".")[0] in ("pathdino", "tiling")
            ]
    return found


@pytest.mark.parametrize("script", SCRIPTS, ids=[p.name for p in SCRIPTS])
def test_benchmark_project_imports_resolve(script):
    missing = []
    for line, module, name in _project_imports(script):
        try:
            mod = importlib.import_module(module)
        except ImportError as exc:
            missing.append(f"{script.name}:{line}: import {module}: {exc}")
            continue
        if name is not None and name != "*" and not hasattr(mod, name):
            try:  # a submodule imported by name (from pathdino.train import loop)
                importlib.import_module(f"{module}.{name}")
            except ImportError:
                missing.append(f"{script.name}:{line}: {module} has no {name}")
    assert not missing, "\n".join(missing)
