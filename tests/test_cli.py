"""The `pathdino` command as a whole: every command's help shows its defaults (the commands are discovered from
the app, not listed here), each options dataclass is built from its flags in one call, and errors split in two:
a project error prints one line and exits 2, anything else (a bug) keeps its traceback."""

from __future__ import annotations

import re

import pytest
import typer
from typer.testing import CliRunner

from pathdino.cli import app


def _commands() -> list[str]:
    return sorted(typer.main.get_command(app).commands)


def _help(command: str) -> str:
    result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "250", "TERMINAL_WIDTH": "250"})
    assert result.exit_code == 0, result.output
    return result.output


def _options_without_default(text: str) -> tuple[list[str], list[str]]:
    """The options of a rendered help text, and those that show neither ``[default: ...]`` nor ``[required]``."""
    blocks = re.split(r"\n(?=\s*│\s*(?:\*\s*)?--)", text)
    found = [
        (m.group(1), "[required]" in b or "[default:" in b)
        for b in blocks
        if (m := re.match(r"\s*│\s*(?:\*\s*)?(--[\w-]+)", b))
    ]
    names = [name for name, _ in found if name != "--help"]
    return names, [name for name, ok in found if not ok and name != "--help"]


def test_the_app_has_the_commands_the_docs_name():
    assert {"tile", "info", "train", "demo", "export", "embed", "eval", "mil"} <= set(_commands())


@pytest.mark.parametrize("command", _commands())
def test_every_command_shows_every_default(command):
    """Every option of every command says its default (or that it is required), `pathdino train` included."""
    names, missing = _options_without_default(_help(command))
    assert names, f"pathdino {command}: no options parsed from its help"
    assert missing == [], f"pathdino {command}: no default shown for {missing}"


def test_help_defaults_come_from_the_options_dataclasses():
    from pathdino.embed import EmbedOptions
    from pathdino.mil import MILConfig

    embed, mil = _help("embed"), _help("mil")
    assert f"[default: ({EmbedOptions().batch_size})]" in embed and "[default: (auto)]" in embed
    assert f"[default: ({MILConfig().max_epochs})]" in mil and f"[default: ({MILConfig().hidden_dim})]" in mil


def test_options_are_built_from_the_flags_in_one_call():
    from pathdino.cli.options import EMBED, EVAL, EXPORT, MIL
    from pathdino.embed import EmbedOptions
    from pathdino.eval import EvalOptions
    from pathdino.export import ExportOptions
    from pathdino.mil import MILConfig
    from tiling.configio import ConfigError

    # nothing given: the dataclass defaults, exactly
    assert EMBED.build({}, command="embed") == EmbedOptions()
    assert EVAL.build({"no_progress": False}, command="eval") == EvalOptions()
    assert EXPORT.build({"overwrite": False}, command="export") == ExportOptions()
    assert MIL.build({}, command="mil") == MILConfig()
    # flags land on their fields (renamed, negated, lists as tuples)
    built = EMBED.build(
        {"workers": 0, "no_progress": True, "formats": ["h5"], "slides": ["a*"], "shard": "1/2"}, command="embed"
    )
    assert (built.num_workers, built.progress, built.formats, built.slides, built.shard) == (
        0,
        False,
        ("zarr", "h5"),
        ("a*",),
        (1, 2),
    )
    assert MIL.build({"skip_missing": True, "lr": 1e-3}, command="mil") == MILConfig(skip_missing_slides=True, lr=1e-3)
    with pytest.raises(ConfigError, match=r"pathdino embed: .*--format"):
        EMBED.build({"formats": ["tiff"]}, command="embed")


def test_a_project_error_is_one_line_and_exit_2(tmp_path):
    result = CliRunner().invoke(app, ["eval", str(tmp_path), "--out", str(tmp_path / "r.json")])
    assert result.exit_code == 2
    assert "error: give exactly one of --encoder" in result.output and "Traceback" not in result.output


def test_a_bug_keeps_its_traceback(tmp_path, monkeypatch):
    """A KeyError (or any exception that is not a PathdinoError) is a bug: not turned into a one-line `error:`."""
    import pathdino.cli.use as use

    def broken(*args, **kwargs):
        raise KeyError("some_internal_key")

    monkeypatch.setattr(use, "eval_command", broken)
    result = CliRunner().invoke(
        app, ["eval", str(tmp_path), "--arch", "vit_tiny_patch16_224", "--out", str(tmp_path / "r.json")]
    )
    assert result.exit_code == 1 and isinstance(result.exception, KeyError)
    assert "error:" not in result.output
