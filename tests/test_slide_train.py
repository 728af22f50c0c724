"""Slide pretraining runs as the tile trainer does: 2 processes equal 1 on the same global batch, a run killed
with SIGKILL resumes bit for bit, checkpoints reshard across process counts, and the CLI prints the launch line.

Every run is a tiny encoder on a synthetic embeddings store (tests/slide_fixtures.py), fp32, one thread per
process. The 1-process reference runs in this process, and so do the 1-process resumes (a process start
costs more than these runs); the others are real `python -m pathdino.slide.train` processes (under `accelerate
launch` for two).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pathdino.slide.loop import train
from pathdino.slide.train_config import load_pretrain_config

sys.path.insert(0, str(Path(__file__).parent))
from slide_fixtures import random_store  # noqa: E402
from launch_helpers import accelerate_launch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SMALL = ROOT / "configs" / "slide" / "small.yaml"
TINY = [
    "model.embed_dim=32",
    "model.depth=2",
    "model.num_heads=4",
    "model.segment_lengths=[16,64]",
    "model.dilation_ratios=[1,2]",
    "objective.decoder_dim=16",
    "objective.decoder_depth=1",
    "objective.decoder_heads=2",
    "data.max_tokens_per_slide=40",
    "data.tokens_per_pack=100",
    "data.num_workers=0",
    "train.packs_per_step=4",
    "train.checkpoint_every_steps=2",
    "train.keep_checkpoints=10",
    "train.precision=fp32",
    "optim.warmup_steps=2",
    "optim.lr=0.002",
    "optim.ema_momentum=0.9",
    "log.every_steps=1",
    "log.trackers=[]",
]
TOL = 1e-5
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return random_store(tmp_path_factory.mktemp("emb") / "emb", n_slides=10, sizes=(3, 10))


def overrides(store: Path, out: Path, steps: int) -> list[str]:
    return [f"data.embeddings=[{store}]", f"train.output_dir={out}", f"train.total_steps={steps}", *TINY]


def records(out: Path) -> dict[int, dict]:
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in lines if "loss" in r}


def ckpt(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step_{step:09d}"


@pytest.fixture(scope="module")
def reference(store, tmp_path_factory, one_thread) -> Path:
    """The uninterrupted 1-process run: 6 steps, checkpoints at 2, 4, 6."""
    out = tmp_path_factory.mktemp("ref") / "run"
    train(load_pretrain_config(SMALL, overrides(store, out, 6)))
    return out


def test_loss_falls_and_checkpoints_hold_model_ema_and_state(reference):
    rec = records(reference)
    assert rec[6]["loss"] < rec[1]["loss"]
    assert all(r["skipped"] is False and r["masked_tiles"] > 0 for r in rec.values())
    state = json.loads((ckpt(reference, 6) / "trainer_state.json").read_text())
    assert state["kind"] == "slide-mae" and state["tile_encoder"]["dir"] == "synthetic-tile-encoder"
    assert state["loader_states"] == [{"next_step": 6, "packs_per_step": 4}]
    model, ema = load_file(ckpt(reference, 6) / "model.safetensors"), load_file(ckpt(reference, 6) / "ema.safetensors")
    assert set(ema) == {k.removeprefix("encoder.") for k in model if k.startswith("encoder.")}
    assert (reference / "done.json").is_file()


def test_sigkilled_run_resumes_bit_for_bit(reference, store, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "pathdino.slide.train", "--config", str(SMALL), *overrides(store, out, 6)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not (ckpt(out, 2) / "trainer_state.json").is_file():
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "done.json").exists() and not ckpt(out, 6).exists()  # killed mid-run
    # resumed in this process, as the reference ran (one thread): what is tested is what the killed run left
    train(load_pretrain_config(SMALL, overrides(store, out, 6)), resume=True)
    want, got = records(reference), records(out)
    assert [got[s]["loss"] for s in range(1, 7)] == [want[s]["loss"] for s in range(1, 7)]
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = load_file(ckpt(reference, 6) / name), load_file(ckpt(out, 6) / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    oa = torch.load(ckpt(reference, 6) / "optimizer.pt", weights_only=True)["state"]
    ob = torch.load(ckpt(out, 6) / "optimizer.pt", weights_only=True)["state"]
    assert all(torch.equal(torch.as_tensor(oa[n][k]), torch.as_tensor(ob[n][k])) for n in oa for k in oa[n])


def launch_two(store: Path, out: Path, steps: int, *extra: str) -> subprocess.CompletedProcess:
    cmd = accelerate_launch(
        2, "-m", "pathdino.slide.train", "--config", str(SMALL), *overrides(store, out, steps), *extra
    )
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    return proc


def assert_close(a: Path, b: Path, steps: list[int]) -> None:
    ra, rb = records(a), records(b)
    for step in steps:
        for key in ("loss", "loss_mean_baseline", "grad_norm"):
            assert abs(ra[step][key] - rb[step][key]) <= TOL * max(1.0, abs(ra[step][key])), (step, key)
        assert ra[step]["masked_tiles"] == rb[step]["masked_tiles"] and ra[step]["slides"] == rb[step]["slides"]
    last = max(steps)
    for name in ("model.safetensors", "ema.safetensors"):
        ta, tb = load_file(ckpt(a, last) / name), load_file(ckpt(b, last) / name)
        assert ta.keys() == tb.keys()
        assert max((_comparable(k, ta[k]) - _comparable(k, tb[k])).abs().max().item() for k in ta) <= TOL, name


def _comparable(name: str, value: torch.Tensor) -> torch.Tensor:
    """The key bias (middle third of qkv.bias) has a gradient of exactly zero in exact arithmetic (softmax ignores a
    shift shared by all keys), so AdamW, which divides by the gradient's size, turns rounding noise into updates of
    the order of the lr: it is left out of the comparison."""
    if name.endswith("attn.qkv.bias"):
        d = value.shape[0] // 3
        return torch.cat([value[:d], value[2 * d :]])
    return value


def test_two_processes_equal_one_and_reshard_both_ways(reference, store, tmp_path, caplog):
    two = tmp_path / "two"
    proc = launch_two(store, two, 6)
    assert "2 process(es)" in proc.stderr
    assert_close(reference, two, [1, 2, 3, 4, 5, 6])
    # a 2-process checkpoint resumed by 1 process (in this process, as the reference), and a 1-process one by 2
    for src, resume_with_two, name in ((two, False, "two_on_one"), (reference, True, "one_on_two")):
        out = tmp_path / name
        out.mkdir()
        (out / "checkpoints").mkdir()
        shutil.copytree(ckpt(src, 4), ckpt(out, 4))
        if resume_with_two:
            said = launch_two(store, out, 6, "--resume").stderr
        else:
            logger = logging.getLogger("pathdino")  # its own handler does not propagate: listen to it directly
            logger.addHandler(caplog.handler)
            try:
                train(load_pretrain_config(SMALL, overrides(store, out, 6)), resume=True)
            finally:
                logger.removeHandler(caplog.handler)
            said = caplog.text
        assert "resharded" in said
        assert_close(reference, out, [5, 6])


def test_cli_check_validates_config_and_stores(store, tmp_path):
    from typer.testing import CliRunner

    from pathdino.cli.main import app

    ok = CliRunner().invoke(app, ["slide-train", "--config", str(SMALL), f"data.embeddings=[{store}]", "--check"])
    assert ok.exit_code == 0 and "10 slides" in ok.output and "width 16" in ok.output, ok.output
    bad = CliRunner().invoke(
        app, ["slide-train", "--config", str(SMALL), f"data.embeddings=[{tmp_path / 'nope'}]", "--check"]
    )
    assert bad.exit_code == 2 and "data.embeddings" in bad.output


def test_cli_prints_the_launch_line(store, tmp_path, capsys):
    from pathdino.cli.train import plan_launch, train_command

    launch = plan_launch(
        config=SMALL,
        overrides=[f"data.embeddings=[{store}]"],
        resume=True,
        resume_from=None,
        check=False,
        num_processes=2,
        accelerate_config=None,
        module="pathdino.slide.train",
    )
    assert train_command(launch) == 0
    line = capsys.readouterr().out.strip()
    assert "-m pathdino.slide.train --config" in line and line.endswith("--resume")
    assert "--num_processes 2" in line


def test_export_writes_a_slide_encoder_folder_naming_the_tile_encoder(reference, store, tmp_path):
    from typer.testing import CliRunner

    import pathdino
    from pathdino.cli.main import app
    from pathdino.slide.data import SlideSource

    out = tmp_path / "slide_encoder"
    result = CliRunner().invoke(app, ["export", str(reference), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "ema weights, step 6" in result.output and "synthetic-tile-encoder" in result.output
    meta = json.loads((out / "config.json").read_text())
    assert meta["tile_encoder"]["name"] == "synthetic-tile-encoder" and meta["tile_encoder"]["feature_dim"] == 16
    assert meta["tile_encoder"]["weights_sha256"] == "0" * 64
    assert "synthetic-tile-encoder" in (out / "README.md").read_text()
    model = pathdino.load_slide_encoder(out)
    ema = load_file(ckpt(reference, 6) / "ema.safetensors")
    assert all(torch.equal(v, ema[k]) for k, v in model.state_dict().items())
    source = SlideSource([str(store)])
    with torch.no_grad():
        for i in range(len(source.slides)):  # a forward pass over each slide
            features, grid = source.read(i)
            cls = model(torch.from_numpy(features), torch.from_numpy(grid)).cls
            assert cls.shape == (1, 32) and torch.isfinite(cls).all()
    again = CliRunner().invoke(app, ["export", str(reference), "--out", str(out)])
    assert again.exit_code != 0 and "--overwrite" in again.output
