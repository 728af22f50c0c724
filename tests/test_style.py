"""The lint and format rules of pyproject.toml (``[tool.ruff]``) hold over the whole tree: ``ruff check .`` finds
nothing and ``ruff format --check .`` changes nothing.

ruff comes with the dev extra (``pip install -e ".[dev]"``); without it these tests skip.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _ruff() -> list[str]:
    if importlib.util.find_spec("ruff") is not None:
        return [sys.executable, "-m", "ruff"]
    if (exe := shutil.which("ruff")) is not None:
        return [exe]
    pytest.skip("ruff is not installed (it comes with the dev extra: pip install -e '.[dev]')")


def _check(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*_ruff(), "check", "--no-cache", *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def test_ruff_check_finds_nothing():
    proc = _check(".")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_ruff_format_changes_nothing():
    """The tree is written as ``ruff format`` writes it (``[tool.ruff.format]``): run ``ruff format .`` to fix."""
    proc = subprocess.run(
        [*_ruff(), "format", "--check", "--no-cache", "."], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_project_rules_catch_a_long_line_and_an_unused_import(tmp_path):
    """The check above reads the project's configuration: 121 columns and an unused import fail it."""
    bad = tmp_path / "bad.py"
    bad.write_text("import os\n\nx = '" + "a" * 115 + "'\n")
    proc = _check("--config", str(ROOT / "pyproject.toml"), str(bad), cwd=tmp_path)
    assert proc.returncode == 1 and "F401" in proc.stdout and "E501" in proc.stdout, proc.stdout + proc.stderr
    bad.write_text("x = '" + "a" * 114 + "'\n")  # 120 columns: within the limit
    assert _check("--config", str(ROOT / "pyproject.toml"), str(bad), cwd=tmp_path).returncode == 0
