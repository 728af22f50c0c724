"""The quickstart contract: CI runs exactly the README's quickstart commands, and plain `pytest` can import tests."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.conftest import REPO

# Shell lines of .ci/run that only set the script up; everything else must be a README quickstart command.
_SETUP = re.compile(r"^(set |cd |export |#!)")


def readme_quickstart() -> list[str]:
    """The commands of the README's Quickstart block, without their comments."""
    text = (REPO / "README.md").read_text()
    section = text.split("## Quickstart", 1)[1]
    block = re.search(r"```(?:bash|sh)?\n(.*?)```", section, re.S)
    assert block, "README.md: the Quickstart section has no code block"
    return [line.split("#", 1)[0].strip() for line in block.group(1).splitlines() if line.split("#", 1)[0].strip()]


def ci_commands() -> list[str]:
    lines = (REPO / ".ci" / "run").read_text().splitlines()
    return [
        s
        for s in (line.split(" #", 1)[0].strip() for line in lines)
        if s and not s.startswith("#") and not _SETUP.match(s)
    ]


def test_ci_runs_the_readme_quickstart_verbatim():
    assert readme_quickstart() == ['pip install -e ".[dev]"', "pathdino demo", "pytest"]
    assert ci_commands() == readme_quickstart(), (
        ".ci/run and README.md's Quickstart block drifted apart: CI must run exactly the commands a new user types"
    )


def test_plain_pytest_imports_test_helpers(tmp_path):
    # `pytest` (not `python -m pytest`) does not put the working directory on sys.path; the ini's pythonpath must.
    test = tmp_path / "test_probe.py"
    test.write_text("from tests.synthetic import write_pyramid\n\ndef test_ok():\n    assert write_pyramid\n")
    env_free = {k: v for k, v in __import__("os").environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, pytest; sys.exit(pytest.main(sys.argv[1:]))",
            "-q",
            "-p",
            "no:cacheprovider",
            "--rootdir",
            str(REPO),
            "-c",
            str(REPO / "pyproject.toml"),
            str(test),
        ],
        cwd=tmp_path,
        env=env_free,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
