"""The layout rules of DEVELOPERS.md, checked by parsing the code (no imports executed):

- imports point downward: each package may import only the packages listed in ALLOWED (lazy imports inside
  functions count too);
- no function in pathdino/ or tiling/ is longer than MAX_FUNCTION_LINES.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = {"torch", "torchvision", "timm", "accelerate", "pathdino"}

# package -> the project packages (and heavy libraries) it may import; DEVELOPERS.md explains each line.
ALLOWED: dict[str, set[str]] = {
    "tiling": {"tiling"},
    "pathdino.data": {"tiling", "torch", "torchvision"},
    "pathdino.models": {"tiling", "torch", "timm"},
    "pathdino.losses": {"torch"},
    "pathdino.train": {"tiling", "torch", "accelerate", "pathdino.data", "pathdino.models", "pathdino.losses",
                       "pathdino.eval"},
    "pathdino.export": {"tiling", "torch", "timm", "pathdino.data", "pathdino.models"},
    "pathdino.embed": {"tiling", "torch", "timm", "pathdino.export"},
    "pathdino.eval": {"tiling", "torch", "torchvision", "timm", "pathdino.data", "pathdino.models",
                      "pathdino.export"},
    "pathdino.mil": {"tiling", "torch", "pathdino.eval"},
    "pathdino.cli": {"tiling", "torch", "pathdino.data", "pathdino.models", "pathdino.train", "pathdino.export",
                     "pathdino.embed", "pathdino.eval", "pathdino.mil"},
    "pathdino": {"tiling", "pathdino.export"},  # pathdino/__init__.py: load_encoder, imported on first use
}
# `python -m pathdino.<package>` entry points run the CLI's own command (the same arguments under a launcher)
ENTRY_POINT_MAY_IMPORT = {"pathdino.cli"}
# the bottom of the graph: both tiling and pathdino import these, so they import no other project module
LEAF_MODULES = ("tiling/fsio.py", "tiling/configio.py")

MAX_FUNCTION_LINES = 100
TOO_LONG_FOR_NOW: set[tuple[str, str]] = set()  # (file, function) pairs allowed over the limit: none


def _sources() -> list[Path]:
    return sorted([*ROOT.glob("pathdino/**/*.py"), *ROOT.glob("tiling/**/*.py")])


def _package(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    if parts[0] == "tiling":
        return "tiling"
    return "pathdino" if len(parts) == 2 else f"pathdino.{parts[1]}"


def _imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def _target(module: str) -> str | None:
    """The package an import lands in, or None for libraries the rules do not restrict."""
    parts = module.split(".")
    if parts[0] == "pathdino":
        return "pathdino" if len(parts) == 1 else f"pathdino.{parts[1]}"
    return parts[0] if parts[0] in HEAVY | {"tiling"} else None


def test_imports_point_downward():
    bad = []
    for path in _sources():
        package = _package(path)
        for line, module in _imports(path):
            target = _target(module)
            if target is None or target == package:
                continue
            if path.name == "__main__.py" and target in ENTRY_POINT_MAY_IMPORT:
                continue
            if target not in ALLOWED[package]:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {module} ({package} may import "
                           f"{sorted(ALLOWED[package])})")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("leaf", LEAF_MODULES)
def test_leaf_modules_import_no_project_module(leaf):
    path = ROOT / leaf
    project = [f"{leaf}:{line} imports {m}" for line, m in _imports(path) if _target(m) is not None]
    assert not project, project


def test_functions_are_short():
    long = []
    for path in _sources():
        rel = str(path.relative_to(ROOT))
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n_lines = node.end_lineno - node.lineno + 1
                if n_lines > MAX_FUNCTION_LINES and (rel, node.name) not in TOO_LONG_FOR_NOW:
                    long.append(f"{rel}:{node.lineno} {node.name} is {n_lines} lines")
    assert not long, "\n".join(long)


def test_the_rules_can_fail(tmp_path, monkeypatch):
    """The checks above see what they should: a torch import in tiling/ and a long function are both caught."""
    fake = tmp_path / "tiling"
    fake.mkdir()
    (fake / "bad.py").write_text("def f():\n    import torch\n" + "    x = 1\n" * 120)
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    with pytest.raises(AssertionError, match="imports torch"):
        test_imports_point_downward()
    with pytest.raises(AssertionError, match="f is 122 lines"):
        test_functions_are_short()
