"""User errors around training, export and embed are one line and exit 2, never a traceback (issue 19, item 8):
a truncated newest checkpoint (resume falls back to the newest complete one), damaged weights in export and embed
(no output left behind), a changed model or changed stores on --resume, invalid YAML, an output_dir that is a
file; and the command line, not the YAML, is blamed for a bad key=value."""

from __future__ import annotations

import json
import logging
import shutil
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pathdino.cli import app

sys.path.insert(0, str(Path(__file__).parent))
from test_train_resume import SMOKE, make_tile_store  # noqa: E402

FAST = [
    "log.trackers=[]",
    "train.total_steps=4",
    "optim.warmup_steps=1",
    "train.checkpoint_every_steps=2",
    "train.keep_checkpoints=5",
    "model.backbone.depth=1",
]


@pytest.fixture(autouse=True)
def _restore_logging():
    """In-process training binds a handler to CliRunner's stream; undo it (as tests/test_cli_train.py does)."""
    logger = logging.getLogger("pathdino")
    handlers, propagate, level = list(logger.handlers), logger.propagate, logger.level
    train_level = logging.getLogger("pathdino.train").level
    yield
    logger.handlers[:] = handlers
    logger.propagate, logger.level = propagate, level
    logging.getLogger("pathdino.train").setLevel(train_level)


def _invoke(args: list[str]):
    """CliRunner.invoke, after dropping the log handler an earlier in-process run bound to its (closed) stream."""
    logger = logging.getLogger("pathdino")
    logger.handlers[:] = [h for h in logger.handlers if not getattr(h, "_pathdino", False)]
    return CliRunner().invoke(app, args)


def _train(*args: str):
    return _invoke(["train", "--config", str(SMOKE), *FAST, *args])


def _one_error_line(result, code: int = 2) -> str:
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output, result.output
    errors = [ln for ln in result.output.splitlines() if "error:" in ln]
    assert len(errors) == 1, result.output
    return errors[0]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A synthetic-data run stopped at step 4 with checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("run") / "run"
    result = _invoke(
        [
            "train",
            "--config",
            str(SMOKE),
            *FAST,
            "train.synthetic_data=true",
            f"train.output_dir={out}",
            "train.stop_at_step=4",
        ]
    )
    assert result.exit_code == 0, result.output
    return out


def _copy(run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(run, out)
    return out


def _truncate(file: Path, keep_bytes: int = 1000) -> None:
    file.write_bytes(file.read_bytes()[:keep_bytes])


def test_resume_falls_back_past_a_truncated_newest_checkpoint(run, tmp_path):
    out = _copy(run, tmp_path)
    newest = out / "checkpoints" / "step_000000004"
    _truncate(newest / "student.safetensors")
    damaged = _train("train.synthetic_data=true", f"train.output_dir={out}", "--resume-from", str(newest))
    assert "student.safetensors: truncated" in _one_error_line(damaged)
    resumed = _train("train.synthetic_data=true", f"train.output_dir={out}", "train.total_steps=6", "--resume")
    assert resumed.exit_code == 0, resumed.output
    warning = [ln for ln in resumed.output.splitlines() if "is damaged" in ln]
    assert len(warning) == 1 and "step_000000004 is damaged (student.safetensors: truncated" in warning[0]
    assert "resuming from the newest complete checkpoint, step_000000002" in warning[0]
    events = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if "loss" in e] == list(range(1, 7))  # steps 3-4 redone, none twice
    assert events[-1]["event"] == "done"


def test_export_and_embed_of_damaged_weights_are_one_line_and_leave_nothing(run, tmp_path):
    out = _copy(run, tmp_path)
    _truncate(out / "checkpoints" / "step_000000004" / "teacher.safetensors")
    one = _invoke(["export", str(out / "checkpoints" / "step_000000004"), "-o", str(tmp_path / "e")])
    assert "teacher.safetensors is damaged (truncated" in _one_error_line(one)
    assert not (tmp_path / "e").exists()
    whole = _invoke(["export", str(out), "-o", str(tmp_path / "enc")])  # the run folder: step 2
    assert whole.exit_code == 0, whole.output
    assert "(step 2)" in whole.output

    _truncate(tmp_path / "enc" / "model.safetensors", 50_000)
    store = make_tile_store(tmp_path / "tiles.zarr", n_side=2, tile_px=56)
    emb = _invoke(
        ["embed", str(store), "-e", str(tmp_path / "enc"), "-o", str(tmp_path / "emb"), "-j", "0", "--no-progress"]
    )
    assert "model.safetensors is damaged (truncated: 50,000 of" in _one_error_line(emb)
    assert not (tmp_path / "emb").exists()


def test_resume_with_another_model_names_the_keys(run, tmp_path):
    out = _copy(run, tmp_path)
    result = _train(
        "train.synthetic_data=true",
        f"train.output_dir={out}",
        "model.backbone.embed_dim=96",
        "model.backbone.num_heads=4",
        "train.total_steps=6",
        "--resume",
    )
    line = _one_error_line(result)
    assert "the model config differs from the checkpoint's (model.backbone.embed_dim: 64 -> 96)" in line


def test_resume_after_slides_were_added_names_the_override_that_continues(tmp_path):
    from tiling.store import TileStore
    from tiling.store_write import TileStoreWriter

    store = make_tile_store(tmp_path / "tiles.zarr", n_side=4)
    out = tmp_path / "run"
    first = _train(f"data.stores=[{store}]", f"train.output_dir={out}", "train.stop_at_step=2")
    assert first.exit_code == 0, first.output
    assert f"training on 1 store(s) ({store}): 1 slide(s), 16 tiles" in first.output
    src = TileStore(store).slide("cmu1")
    added = TileStoreWriter(store).begin_slide("cmu1-copy", src.tile_px, tiles_per_shard=32)
    added.add(src.read_encoded(0, src.n_tiles), src.coords, src.tissue_fraction)
    added.commit({"source_path": "copy", "source_fingerprint": "copy"})
    refused = _train(f"data.stores=[{store}]", f"train.output_dir={out}", "--resume")
    assert "data.resume_changed_stores=true" in _one_error_line(refused)
    resumed = _train(f"data.stores=[{store}]", f"train.output_dir={out}", "--resume", "data.resume_changed_stores=true")
    assert resumed.exit_code == 0, resumed.output
    assert "2 slide(s), 32 tiles" in resumed.output


def test_bad_yaml_overrides_and_output_dirs_are_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {total_steps: [1\n")
    line = _one_error_line(_invoke(["train", "--config", str(bad), "--check"]))
    assert f"config file {bad} is not valid YAML at line 2" in line
    line = _one_error_line(_train("train.synthetic_data=true", "optim.base_lr=[1", "--check"))
    assert "override 'optim.base_lr=[1': the value is not valid YAML" in line
    line = _one_error_line(_train("train.synthetic_data=true", "train.no_such_key=1", "--check"))
    assert "override 'train.no_such_key=1' (command line): train: unknown key(s) ['no_such_key']" in line
    assert str(SMOKE) not in line  # the YAML is not blamed for a key it does not hold
    line = _one_error_line(_train("train.synthetic_data=true", "train.batch_size=abc", "--check"))
    assert "override 'train.batch_size=abc' (command line): train.batch_size: expected an integer" in line
    (tmp_path / "afile").write_text("x")
    for out, what in ((tmp_path / "afile", "is a file"), (tmp_path / "afile" / "run", "is under")):
        line = _one_error_line(_train("train.synthetic_data=true", f"train.output_dir={out}"))
        assert f"train.output_dir={str(out)!r} {what}" in line


def test_resume_of_a_finished_run_says_so_in_one_line(run, tmp_path):
    out = _copy(run, tmp_path)
    before = (out / "metrics.jsonl").read_text()
    result = _train("train.synthetic_data=true", f"train.output_dir={out}", "--resume")
    assert result.exit_code == 0, result.output
    assert (
        f"nothing to do: the run in {out} already finished (checkpoint step_000000004, step 4 of train.total_steps=4)"
    ) in result.output
    assert "Traceback" not in result.output and (out / "metrics.jsonl").read_text() == before
