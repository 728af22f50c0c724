"""Distribution is real: 2-process DDP and FSDP2 runs equal a 1-process run of the same global batch, resharded
resumes reload exactly what was saved, and one rank's non-finite step is skipped by every rank.

All runs use the synthetic loader, whose samples depend on the global sample index only (pathdino.train.synthetic),
so a 1-process run at batch 8 and a 2-process run at 4 per process see the same 8 samples per step. With drop path
0 and the uniformity term off (KoLeo is a per-process batch statistic) the two objectives are the same function of
the weights, and with gradients averaged across processes the runs must agree to float rounding. A run whose
processes trained alone (no gradient all-reduce) leaves step 1 equal and then drifts by ~1e-3 at once.

2-process runs go through `accelerate launch` (gloo on CPU) with tests/train_driver.py, the real command-line entry
point plus digests of each rank's weights and dumps of what a resume reloaded.

Each launch costs several seconds of process start-up against well under one of training, so one launch serves
several tests where its run can: the fresh DDP and FSDP2 runs also accumulate gradients (2 micro-steps per step,
which must still equal the 1-process batch), and the tile-store run is also the one where a rank's loss turns NaN.
The plain (1 micro-step) DDP and FSDP2 steps are compared with the reference by the resumes onto 2 processes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import pathdino.train.loop as loop
import pathdino.train.run as run_module
from pathdino.train.config import load_config
from pathdino.train.loop import LOSS_TERMS, train

sys.path.insert(0, str(Path(__file__).parent))
import train_driver  # noqa: E402
from launch_helpers import accelerate_launch  # noqa: E402
from test_train_probe import make_labelled_folder  # noqa: E402
from test_train_resume import make_tile_store  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "train" / "cpu_smoke.yaml"
FSDP2 = ROOT / "configs" / "accelerate" / "fsdp2.yaml"
DRIVER = Path(__file__).parent / "train_driver.py"
EXACT = [
    "train.synthetic_data=true",
    "model.backbone.drop_path_rate=0.0",
    "loss.uniformity=none",
    "train.total_steps=4",
    "optim.warmup_steps=1",
    "train.checkpoint_every_steps=2",
    "train.keep_checkpoints=5",
    "log.trackers=[]",
    "log.every_steps=1",
    "train.precision=fp32",
]
LOSS_TOL = 1e-5
WEIGHT_TOL = 1e-5


def launch(
    out: Path,
    dump: Path,
    *overrides: str,
    resume: bool = False,
    fsdp: bool = False,
    poison: str | None = None,
    expect_code: int = 0,
    timeout_s: int = 240,
) -> subprocess.CompletedProcess:
    cmd = accelerate_launch(
        2,
        str(DRIVER),
        "--config",
        str(SMOKE),
        f"train.output_dir={out}",
        *EXACT,
        *overrides,
        config_file=FSDP2 if fsdp else None,
    )
    if resume:
        cmd.append("--resume")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PATHDINO_TEST_DUMP": str(dump)}
    env.pop("PATHDINO_TEST_POISON", None)
    if poison:
        env["PATHDINO_TEST_POISON"] = poison
    # A hung launch (ranks waiting in mismatched collectives) ends by the workers' own deadline (train_driver.py).
    env["PATHDINO_TEST_DEADLINE_S"] = str(timeout_s)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s + 60)
    if "PATHDINO_TEST_DEADLINE" in proc.stderr or proc.returncode == 124 or "exitcode  : 124" in proc.stderr:
        raise AssertionError(f"launch hung for {timeout_s} s (ranks out of step?):\n{proc.stderr[-4000:]}")
    if (proc.returncode == 0) != (expect_code == 0):
        raise AssertionError(f"launch exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-6000:]}")
    return proc


def records(out: Path) -> dict[int, dict]:
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in lines if "loss" in r}


def ckpt(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step_{step:09d}"


def assert_close_losses(a: dict[int, dict], b: dict[int, dict], steps: list[int], world_b: int = 2) -> None:
    """Steps of run ``a`` (1 process, 1 micro-step) and ``b`` agree; masked_tokens is logged per process and
    micro-step, so ``world_b`` is b's processes x micro-steps."""
    for step in steps:
        assert a[step]["masked_tokens"] == pytest.approx(b[step]["masked_tokens"] * world_b)
        for key in (*[k for k in LOSS_TERMS if k != "masked_tokens"], "grad_norm"):
            x, y = a[step][key], b[step][key]
            assert abs(x - y) <= LOSS_TOL * max(1.0, abs(x)), (step, key, x, y)
        assert a[step]["skipped"] is b[step]["skipped"] is False


def assert_close_weights(a: Path, b: Path) -> None:
    for name in ("student.safetensors", "teacher.safetensors", "losses.safetensors"):
        ta, tb = load_file(a / name), load_file(b / name)
        assert ta.keys() == tb.keys(), name
        for key in ta:
            diff = (ta[key] - tb[key]).abs().max().item() if ta[key].numel() else 0.0
            assert diff <= WEIGHT_TOL, (name, key, diff)


def assert_ranks_equal(dump: Path, fields: tuple[str, ...]) -> None:
    r0 = [json.loads(line) for line in (dump / "hashes_rank0.jsonl").read_text().splitlines()]
    r1 = [json.loads(line) for line in (dump / "hashes_rank1.jsonl").read_text().splitlines()]
    assert [r["step"] for r in r0] == [r["step"] for r in r1] and r0
    for a, b in zip(r0, r1):
        for field in fields:
            assert a[field] == b[field], (a["step"], field)


def assert_reloaded(dump: Path, saved: Path, world: int) -> None:
    """What a resume put into the model, optimizer, loss buffers and loader is what the checkpoint holds."""
    for role in ("student", "teacher"):
        got, want = load_file(dump / f"reloaded_{role}.safetensors"), load_file(saved / f"{role}.safetensors")
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want), role
    want_centers = load_file(saved / "losses.safetensors")
    assert want_centers["dino.targets.center"].abs().sum() > 0  # centers had moved: reloading them matters
    for rank in range(world):
        got = load_file(dump / f"reloaded_losses_rank{rank}.safetensors")
        assert all(torch.equal(got[k], want_centers[k]) for k in want_centers), rank
    got_optim = torch.load(dump / "reloaded_optimizer.pt", weights_only=True)["state"]
    want_optim = torch.load(saved / "optimizer.pt", weights_only=True)["state"]
    assert got_optim.keys() == want_optim.keys() and want_optim
    for name, entries in want_optim.items():
        for key, value in entries.items():
            assert torch.equal(torch.as_tensor(got_optim[name][key]), torch.as_tensor(value)), (name, key)
    saved_position = json.loads((saved / "trainer_state.json").read_text())["loader_states"][0]["next_sample"]
    for rank in range(world):
        assert json.loads((dump / f"loader_rank{rank}.json").read_text())["next_sample"] == saved_position


def truncate_at(src: Path, dst: Path, step: int) -> Path:
    """A copy of run ``src`` as it was right after checkpoint ``step`` (later checkpoints and done.json removed)."""
    shutil.copytree(src, dst)
    for path in (dst / "checkpoints").iterdir():
        if int(path.name.split("_")[1]) > step:
            shutil.rmtree(path)
    (dst / "done.json").unlink(missing_ok=True)
    return dst


@pytest.fixture(scope="module", autouse=True)
def restore_logging():
    """In-process train() installs pathdino's log handler (propagate off); later tests' caplog needs it undone."""
    import logging

    logger = logging.getLogger("pathdino")
    handlers, propagate, level = list(logger.handlers), logger.propagate, logger.level
    yield
    logger.handlers[:] = handlers
    logger.propagate, logger.level = propagate, level


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The 1-process run at global batch 8 (in-process): checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("ref") / "run"
    train(load_config(SMOKE, [f"train.output_dir={out}", *EXACT]))
    return out


# ---- gradient accumulation: 2 micro-steps of 4 are one step of 8 ---------------------------------------------
# The synthetic loader's samples of one optimizer step do not depend on the micro-step split (synthetic.py), every
# loss term is a mean over its micro-batch, and the teacher centers take ONE EMA step per optimizer step over all
# micro-batches' rows (step.apply_update): so the losses, gradients, weights and centers equal the 1 x 8 reference.

ACCUM = "train.grad_accum_steps=2"


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> tuple[Path, Path]:
    """2-process DDP run, 2 micro-steps of 2 images per process and step (global batch 8, as the reference)."""
    base = tmp_path_factory.mktemp("ddp")
    launch(base / "run", base / "dump", ACCUM)
    return base / "run", base / "dump"


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory) -> tuple[Path, Path]:
    """2-process FSDP2 run, 2 micro-steps per step, with in-training probes (sharded embedding): they must not
    change the run either."""
    base = tmp_path_factory.mktemp("fsdp")
    labelled = make_labelled_folder(base / "labelled")
    proc = launch(base / "run", base / "dump", ACCUM, f"eval.probe={{data: {labelled}, every_steps: 2}}", fsdp=True)
    assert "FSDP2" in proc.stderr
    return base / "run", base / "dump"


def test_ddp_matches_one_process(reference, ddp_run):
    out, dump = ddp_run
    assert_close_losses(records(reference), records(out), [1, 2, 3, 4], world_b=4)
    assert_close_weights(ckpt(reference, 4), ckpt(out, 4))
    # every rank holds the same student, teacher and centers at every checkpoint (DDP keeps full replicas)
    assert_ranks_equal(dump, ("student", "teacher", "centers"))


def test_fsdp2_matches_one_process(reference, fsdp_run):
    out, dump = fsdp_run
    assert_close_losses(records(reference), records(out), [1, 2, 3, 4], world_b=4)
    assert_close_weights(ckpt(reference, 4), ckpt(out, 4))
    assert_ranks_equal(dump, ("centers",))  # weights are sharded; the gathered checkpoint is compared above
    probed = [
        json.loads(line)["step"]
        for line in (out / "metrics.jsonl").read_text().splitlines()
        if "probe_knn_accuracy" in line
    ]
    assert probed == [0, 2, 4]


@pytest.fixture(scope="module")
def store_run(tmp_path_factory) -> tuple[Path, Path, subprocess.CompletedProcess]:
    """2-process DDP run on a real 16-tile store, 6 steps with a checkpoint each, where rank 1 alone has a NaN loss
    value at step 2 and both ranks at steps 4 and 5 (see the non-finite test): it stops with exit code 3 after
    step 5. Sinkhorn targets: why, see that test."""
    base = tmp_path_factory.mktemp("store_run")
    store = make_tile_store(base / "tiles.zarr", n_side=4)
    out, dump = base / "run", base / "dump"
    proc = launch(
        out,
        dump,
        "train.synthetic_data=false",
        f"data.stores=[{store}]",
        "train.total_steps=6",
        "train.checkpoint_every_steps=1",
        "train.max_nonfinite_steps=2",
        "loss.targets=sinkhorn",
        poison="1:2,4,5;0:4,5",
        expect_code=3,
        timeout_s=150,
    )
    return out, dump, proc


def test_ddp_on_a_tile_store_gives_each_rank_its_own_tiles_and_every_tile_once_an_epoch(store_run):
    """The real tile-store loader under DDP: at every step the ranks train on different tiles, and over an epoch
    (16 tiles, 8 per step: 2 steps) the ranks together see every tile of the store exactly once. (Skipped steps
    still consume their batches: the loader is what is tested here.)"""
    epoch = {("cmu1", i) for i in range(16)}
    _, dump, _ = store_run
    per_rank = [
        [[tuple(t) for t in json.loads(line)] for line in (dump / f"batches_rank{r}.jsonl").read_text().splitlines()]
        for r in (0, 1)
    ]
    assert len(per_rank[0]) == len(per_rank[1]) == 5  # steps 1-5, one batch of 4 tiles per rank each
    for step, (a, b) in enumerate(zip(*per_rank), start=1):
        assert len(set(a)) == len(set(b)) == 4 and not set(a) & set(b), (step, a, b)
    for first in (0, 2):  # epochs 1 and 2
        seen = [t for rank in per_rank for batch in rank[first : first + 2] for t in batch]
        assert sorted(seen) == sorted(epoch), first


def test_resume_two_processes_on_one(reference, ddp_run, tmp_path, monkeypatch):
    out = truncate_at(ddp_run[0], tmp_path / "run", 2)
    dump = tmp_path / "dump"
    monkeypatch.setattr(loop, "save_checkpoint", loop.save_checkpoint)  # all three restored after the test
    for name in ("load_checkpoint", "build_loader"):
        monkeypatch.setattr(run_module, name, getattr(run_module, name))
    train_driver.install(dump)
    summary = train(load_config(SMOKE, [f"train.output_dir={out}", *EXACT]), resume=True)
    assert summary["done"]
    assert_reloaded(dump, ckpt(out, 2), world=1)
    assert_close_losses(records(reference), records(out), [3, 4], world_b=1)
    assert_close_weights(ckpt(reference, 4), ckpt(out, 4))


def test_resume_one_process_on_two(reference, tmp_path):
    out = truncate_at(reference, tmp_path / "run", 2)
    proc = launch(out, tmp_path / "dump", resume=True)
    assert "resharded: checkpoint saved with 1 processes, resumed with 2" in proc.stderr
    assert_reloaded(tmp_path / "dump", ckpt(out, 2), world=2)
    assert_close_losses(records(reference), records(out), [3, 4])
    assert_close_weights(ckpt(reference, 4), ckpt(out, 4))
    assert_ranks_equal(tmp_path / "dump", ("student", "teacher", "centers"))


def test_resume_one_process_into_fsdp2(reference, tmp_path):
    out = truncate_at(reference, tmp_path / "run", 2)
    proc = launch(out, tmp_path / "dump", resume=True, fsdp=True)
    assert "FSDP2" in proc.stderr and "resharded: checkpoint saved with 1 processes, resumed with 2" in proc.stderr
    assert_reloaded(tmp_path / "dump", ckpt(out, 2), world=2)
    assert_close_losses(records(reference), records(out), [3, 4])
    assert_close_weights(ckpt(reference, 4), ckpt(out, 4))
    assert_ranks_equal(tmp_path / "dump", ("centers",))


def test_resume_fsdp2_into_fsdp2(reference, fsdp_run, tmp_path):
    out = truncate_at(fsdp_run[0], tmp_path / "run", 2)
    proc = launch(out, tmp_path / "dump", resume=True, fsdp=True)
    assert "FSDP2" in proc.stderr and "resharded" not in proc.stderr
    assert_reloaded(tmp_path / "dump", ckpt(out, 2), world=2)
    assert_close_losses(records(reference), records(out), [3, 4])
    assert_close_weights(ckpt(reference, 4), ckpt(out, 4))
    assert_ranks_equal(tmp_path / "dump", ("centers",))


def test_resume_fsdp2_checkpoint_with_ddp(reference, fsdp_run, tmp_path):
    out = truncate_at(fsdp_run[0], tmp_path / "run", 2)
    proc = launch(out, tmp_path / "dump", resume=True)
    assert "DDP" in proc.stderr
    assert_reloaded(tmp_path / "dump", ckpt(out, 2), world=2)
    assert_close_losses(records(reference), records(out), [3, 4])
    assert_close_weights(ckpt(reference, 4), ckpt(out, 4))


def test_one_rank_nonfinite_skips_the_step_on_every_rank_and_exits_3(store_run):
    """Rank 1 alone has a NaN loss value at step 2 (gradients finite, so DDP's all-reduce cannot spread it): every
    rank skips the step and the weights stay equal across ranks. Both ranks' values are NaN at steps 4 and 5: two
    non-finite steps in a row exit with code 3 through the command line.

    A broken consensus (each rank deciding on its own flag) must fail the assertions below, not hang: so the
    targets are Sinkhorn's, whose collectives run every step whatever is skipped, instead of centering, whose
    center all-reduce runs only on applied steps (one rank in it, the other in the next step's gradient
    all-reduce: a hang until the watchdog)."""
    out, dump, proc = store_run
    assert "exitcode  : 3" in proc.stdout + proc.stderr
    log = records(out)  # written by rank 0, whose own values were finite at step 2
    assert [log[s]["skipped"] for s in sorted(log)] == [False, True, False, True, True]
    assert_ranks_equal(dump, ("student", "teacher", "centers"))
    # AdamW stepped at steps 1 and 3 only, on both ranks alike (same weights): 2 steps in the step-3 checkpoint
    optim = torch.load(ckpt(out, 3) / "optimizer.pt", weights_only=True)["state"]
    assert {int(s["step"]) for s in optim.values()} == {2}
    assert "too many" in proc.stderr or "consecutive steps had a non-finite loss" in proc.stderr


def test_cli_exits_3_after_consecutive_nonfinite_steps(tmp_path):
    """End to end through `python -m pathdino.train` with no test hooks: an absurd lr blows the weights up."""
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "pathdino.train",
        "--config",
        str(SMOKE),
        f"train.output_dir={out}",
        "train.synthetic_data=true",
        "log.trackers=[]",
        "optim.base_lr=1e30",
        "optim.warmup_steps=1",
        "optim.freeze_last_layer_steps=0",
        "optim.clip_grad=0",
        "train.total_steps=10",
        "train.max_nonfinite_steps=2",
    ]
    proc = subprocess.run(
        cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "consecutive steps had a non-finite loss" in proc.stderr
    assert not (out / "done.json").exists()


def test_accumulation_two_by_four_equals_one_by_eight(reference, tmp_path):
    out = tmp_path / "run"
    train(load_config(SMOKE, [f"train.output_dir={out}", *EXACT, ACCUM]))
    assert_close_losses(records(reference), records(out), [1, 2, 3, 4], world_b=2)
    assert_close_weights(ckpt(reference, 4), ckpt(out, 4))  # losses.safetensors: the centers


def _skipped_syncs(dump: Path, rank: int) -> list[dict]:
    return [json.loads(line)["skipped_syncs"] for line in (dump / f"hashes_rank{rank}.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp2"])
def test_accumulation_under_ddp_and_fsdp2_equals_one_batch(reference, request, fsdp):
    """2 processes x 2 micro-steps x 2 images: the first micro-step of each optimizer step skips the gradient
    all-reduce (DDP ``no_sync`` / FSDP2's requires-sync flag), the second reduces."""
    out, dump = request.getfixturevalue("fsdp_run" if fsdp else "ddp_run")
    assert_close_losses(records(reference), records(out), [1, 2, 3, 4], world_b=4)
    assert_close_weights(ckpt(reference, 4), ckpt(out, 4))
    key, other = ("fsdp2_no_sync", "ddp_no_sync") if fsdp else ("ddp_no_sync", "fsdp2_no_sync")
    for rank in (0, 1):  # checkpoints at steps 2 and 4: one skipped all-reduce per optimizer step so far
        assert [c[key] for c in _skipped_syncs(dump, rank)] == [2, 4]
        assert [c[other] for c in _skipped_syncs(dump, rank)] == [0, 0]


# ---- bf16 against fp32 over several steps with real updates -------------------------------------------------


def _student_init() -> dict[str, torch.Tensor]:
    from pathdino.train.model import build_student_teacher

    cfg = load_config(SMOKE, EXACT)
    torch.manual_seed(cfg.train.seed)  # as run.py builds the initial weights
    student, _ = build_student_teacher(cfg.model.backbone, cfg.model.dino_head, cfg.model.ibot_head_)
    return student.state_dict()


def test_bf16_tracks_fp32_over_several_steps(reference, tmp_path):
    """bf16 autocast (fp32 master weights, fp32 losses) against the fp32 reference over 4 steps (lr > 0 from step 2).

    Tolerances: bf16 keeps 8 significant bits (relative rounding 2^-9 = 0.2% per value). Through 2 blocks, the
    heads and a teacher softmax at temperature 0.04 (logit errors are multiplied by 25 before the exponential),
    the step-1 losses differ by ~0.1% and, once the updated weights differ, by up to ~4% (measured on a 2-core
    AMD EPYC Zen 4: 2% on the total at step 4, 4.4% on one DINO term): 10% on each term leaves room for another
    CPU's bf16 kernels while a loss off by a training step's change (10-40% here) fails. The weights' update
    after 4 steps must point the same way as fp32's (measured 0.2 relative difference, bound 0.5): with bf16
    master weights most updates (~1e-4) are below bf16's spacing at the weights' size and are lost or rounded."""
    out = tmp_path / "bf16"
    train(load_config(SMOKE, [f"train.output_dir={out}", *EXACT, "train.precision=bf16"]))
    fp32, bf16 = records(reference), records(out)
    assert bf16[1]["loss"] != fp32[1]["loss"]  # autocast really ran in bf16
    assert all(bf16[s]["lr"] > 0 for s in (2, 3, 4))
    for step in (1, 2, 3, 4):
        for key in ("loss", "dino_global", "dino_local", "ibot"):
            a, b = fp32[step][key], bf16[step][key]
            assert abs(a - b) <= 0.10 * abs(a), (step, key, a, b)
        assert bf16[step]["skipped"] is False
    init = _student_init()
    want = load_file(ckpt(reference, 4) / "student.safetensors")
    got = load_file(ckpt(out, 4) / "student.safetensors")
    assert all(got[k].dtype == torch.float32 for k in got)
    diff = sum((got[k].double() - want[k].double()).square().sum() for k in want).sqrt()
    update = sum((want[k].double() - init[k].double()).square().sum() for k in want).sqrt()
    assert update > 0.01 and diff <= 0.5 * update, (float(diff), float(update))
