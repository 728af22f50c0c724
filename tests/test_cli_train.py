"""`pathdino train`: one process trains in this process (same arguments as `python -m pathdino.train`); more print
the `accelerate launch` line to run."""

from __future__ import annotations

import json
import logging
import shlex
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pathdino.cli import app

sys.path.insert(0, str(Path(__file__).parent))
from test_train_resume import make_tile_store  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "train" / "cpu_smoke.yaml"


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return make_tile_store(tmp_path_factory.mktemp("store") / "tiles.zarr", n_side=4)


@pytest.fixture(autouse=True)
def _restore_logging():
    """Training in this process adds a handler to the 'pathdino' logger (bound to CliRunner's stream, closed after
    invoke) and stops propagation; undo both so later tests' caplog sees pathdino's records again."""
    logger = logging.getLogger("pathdino")
    handlers, propagate, level = list(logger.handlers), logger.propagate, logger.level
    train_level = logging.getLogger("pathdino.train").level
    yield
    logger.handlers[:] = handlers
    logger.propagate, logger.level = propagate, level
    logging.getLogger("pathdino.train").setLevel(train_level)


def _run(*args: str):
    return CliRunner().invoke(app, ["train", *args])


def _events(out: Path) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "event" in r]


def test_one_process_trains_in_process_then_resumes(store, tmp_path):
    out = tmp_path / "run"
    common = [
        "--config",
        str(SMOKE),
        f"data.stores=[{store}]",
        f"train.output_dir={out}",
        "log.trackers=[]",
        "train.total_steps=4",
        "optim.warmup_steps=1",
        "train.checkpoint_every_steps=2",
    ]
    first = _run(*common, "train.stop_at_step=2")
    assert first.exit_code == 0, first.output
    assert (out / "checkpoints" / "step_000000002").is_dir()
    assert _events(out)[-1]["event"] == "stopped"

    again = _run(*common)  # no --resume: the output folder holds a checkpoint, so pathdino.train refuses (exit 2)
    assert again.exit_code == 2 and "already holds checkpoints" in again.output

    resumed = _run(*common, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert _events(out)[-1]["event"] == "done"
    assert (out / "checkpoints" / "step_000000004").is_dir()
    steps = [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert steps == sorted(set(steps)) and max(steps) == 4  # steps 3-4 continue the run; none repeated


def test_check_validates_without_training(store, tmp_path):
    ok = _run("--config", str(SMOKE), f"data.stores=[{store}]", f"train.output_dir={tmp_path / 'r'}", "--check")
    assert ok.exit_code == 0, ok.output
    assert not (tmp_path / "r").exists()
    bad = _run("--config", str(SMOKE), f"data.stores=[{store}]", "augment.global_crop_px=50", "--check")
    assert bad.exit_code == 2


def test_bad_override_names_the_key(tmp_path):
    result = _run("--config", str(SMOKE), "train.no_such_key=1", f"train.output_dir={tmp_path}")
    assert result.exit_code == 2
    assert "no_such_key" in result.output


def test_several_processes_print_the_accelerate_line(tmp_path):
    result = _run("--config", str(SMOKE), "data.stores=[a b]", "train.batch_size=16", "-n", "4", "--resume")
    assert result.exit_code == 0, result.output
    line = next(ln for ln in result.stdout.splitlines() if ln.startswith("accelerate launch"))
    argv = shlex.split(line)
    assert argv[:2] == ["accelerate", "launch"] and "--multi_gpu" in argv
    assert argv[argv.index("--num_processes") + 1] == "4"
    tail = argv[argv.index("-m") :]
    assert tail == [
        "-m",
        "pathdino.train",
        "--config",
        str(SMOKE),
        "data.stores=[a b]",
        "train.batch_size=16",
        "--resume",
    ]


def test_accelerate_config_sets_the_process_count():
    cfg = ROOT / "configs" / "accelerate" / "cpu_2proc.yaml"
    result = _run("--config", str(SMOKE), "--accelerate-config", str(cfg), "--resume-from", "runs/x/step_000000002")
    assert result.exit_code == 0, result.output
    argv = shlex.split(next(ln for ln in result.stdout.splitlines() if ln.startswith("accelerate launch")))
    assert argv[argv.index("--config_file") + 1] == str(cfg)
    assert argv[argv.index("--num_processes") + 1] == "2"
    assert argv[-2:] == ["--resume", "runs/x/step_000000002"]


def test_resume_and_resume_from_conflict():
    result = _run("--config", str(SMOKE), "--resume", "--resume-from", "x")
    assert result.exit_code == 2 and "--resume-from" in result.output
