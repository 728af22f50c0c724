"""Trainer recipes (docs/training.md, "Recipes"): continued pretraining with a backbone freeze and lr ramp, Gram
anchoring, distillation. Each recipe resumes bit for bit; 2-process DDP / FSDP2 runs are in test_train_recipes_dist.

All runs are the CPU smoke preset (2 blocks of width 64, 56 px crops) on synthetic pixels, 4 steps.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pathdino.models import BackboneConfig, build_backbone
from pathdino.models.init_checkpoint import InitCheckpointError
from pathdino.train.config import load_config
from pathdino.train.loop import train
from tiling.configio import ConfigError

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "train" / "cpu_smoke.yaml"
BASE = [
    "train.synthetic_data=true",
    "log.trackers=[]",
    "train.total_steps=4",
    "train.checkpoint_every_steps=1",
    "train.keep_checkpoints=10",
    "log.every_steps=1",
    "optim.warmup_steps=1",
    "optim.freeze_last_layer_steps=0",
]


@pytest.fixture(scope="module", autouse=True)
def restore_logging():
    """In-process train() installs pathdino's log handler (propagate off); later tests' caplog needs it undone."""
    import logging

    logger = logging.getLogger("pathdino")
    handlers, propagate, level = list(logger.handlers), logger.propagate, logger.level
    yield
    logger.handlers[:] = handlers
    logger.propagate, logger.level = propagate, level


def config(out: Path, *overrides: str):
    return load_config(SMOKE, [*BASE, f"train.output_dir={out}", *overrides])


def ckpt(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step_{step:09d}"


def records(out: Path) -> dict[int, dict]:
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in lines if "loss" in r}


def assert_same_checkpoint(a: Path, b: Path, names=("student", "teacher", "losses")) -> None:
    for name in names:
        ta, tb = load_file(a / f"{name}.safetensors"), load_file(b / f"{name}.safetensors")
        assert ta.keys() == tb.keys(), name
        assert all(torch.equal(ta[k], tb[k]) for k in ta), name
    oa = torch.load(a / "optimizer.pt", weights_only=True)["state"]
    ob = torch.load(b / "optimizer.pt", weights_only=True)["state"]
    assert oa.keys() == ob.keys()
    assert all(torch.equal(torch.as_tensor(v), torch.as_tensor(ob[n][k])) for n in oa for k, v in oa[n].items())


def assert_resumes_exactly(tmp_path: Path, *overrides: str, stop_at: int = 2) -> Path:
    """A run stopped at ``stop_at`` and resumed ends with the uninterrupted run's checkpoint and losses."""
    ref, run = tmp_path / "ref", tmp_path / "resumed"
    train(config(ref, *overrides))
    train(config(run, *overrides, f"train.stop_at_step={stop_at}"))
    train(config(run, *overrides), resume=True)
    a, b = records(ref), records(run)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        assert a[step]["loss"] == b[step]["loss"] and a[step]["grad_norm"] == b[step]["grad_norm"], step
    assert_same_checkpoint(ckpt(ref, 4), ckpt(run, 4))
    return ref


def smoke_backbone(tmp_path: Path, *, seed: int = 7, **changes) -> Path:
    """A timm-layout backbone checkpoint with the smoke preset's shape (or ``changes``), random weights."""
    cfg = load_config(SMOKE, ["train.synthetic_data=true"]).model.backbone
    fields = {
        "arch": cfg.arch,
        "embed_dim": cfg.embed_dim,
        "depth": cfg.depth,
        "num_heads": cfg.num_heads,
        "patch_size": cfg.patch_size,
        "img_size": cfg.img_size,
        "num_register_tokens": cfg.num_register_tokens,
        "layerscale_init": 0.3,
        **changes,
    }
    torch.manual_seed(seed)
    model = build_backbone(BackboneConfig(**fields))
    path = tmp_path / f"backbone_{seed}_{'_'.join(changes)}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


# ---- continued pretraining: freeze, ramp ----------------------------------------------------------------------


def test_frozen_backbone_gets_no_update_then_ramps(tmp_path):
    init = smoke_backbone(tmp_path)
    start = load_file(init)
    out = tmp_path / "run"
    train(
        config(
            out,
            f"model.init_checkpoint={init}",
            "train.freeze_backbone_steps=2",
            "train.backbone_lr_ramp_steps=2",
            "optim.weight_decay=0.5",
        )
    )
    log = records(out)
    assert [log[s]["backbone_lr_mult"] for s in (1, 2, 3, 4)] == [0.0, 0.0, 0.5, 1.0]
    for step in (1, 2):
        student, teacher = (
            load_file(ckpt(out, step) / "student.safetensors"),
            load_file(ckpt(out, step) / "teacher.safetensors"),
        )
        for name, value in start.items():  # weight decay 0.5 would have moved them: no AdamW step at all
            assert torch.equal(student[f"backbone.backbone.{name}"], value), (step, name)
            assert torch.equal(teacher[f"backbone.backbone.{name}"], value), (step, name)
        optim = torch.load(ckpt(out, step) / "optimizer.pt", weights_only=True)["state"]
        assert not [n for n in optim if n.startswith("backbone.backbone.")] and "dino_head.mlp.0.weight" in optim
    heads = [load_file(ckpt(out, s) / "teacher.safetensors")["dino_head.mlp.0.weight"] for s in (1, 2)]
    assert not torch.equal(heads[0], heads[1])  # the teacher's heads follow the student's by EMA meanwhile
    moved = load_file(ckpt(out, 3) / "student.safetensors")
    assert not torch.equal(moved["backbone.backbone.blocks.0.attn.qkv.weight"], start["blocks.0.attn.qkv.weight"])


def test_freeze_resumes_exactly_across_the_boundary(tmp_path):
    init = smoke_backbone(tmp_path)
    assert_resumes_exactly(
        tmp_path,
        f"model.init_checkpoint={init}",
        "train.freeze_backbone_steps=2",
        "train.backbone_lr_ramp_steps=1",
        stop_at=2,
    )


def test_init_checkpoint_layout_must_match(tmp_path):
    cases = {
        "model.backbone.num_register_tokens": {"num_register_tokens": 0},
        "model.backbone.layerscale_init": {"layerscale_init": None},
        "model.backbone.patch_size": {"patch_size": 16, "img_size": 64},
    }
    for key, changes in cases.items():
        init = smoke_backbone(tmp_path, **changes)
        with pytest.raises(InitCheckpointError, match=key.replace(".", r"\.")):
            train(config(tmp_path / key, f"model.init_checkpoint={init}"))
    with pytest.raises(ConfigError, match="model.init_checkpoint"):
        train(config(tmp_path / "nofreeze", "train.freeze_backbone_steps=2"))


def test_continue_preset_takes_a_dinov2_release_layout(tmp_path):
    """The preset's backbone fits a dinov2-layout ViT-S/14-reg4 release (518 px grid, CLS position slot, chunked
    blocks) and a timm-layout one: every tensor loads, nothing stays random."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from test_models import _dinov2_style

    from pathdino.models import MaskedViT, load_init_checkpoint

    cfg = load_config(ROOT / "configs" / "train" / "continue_vits14.yaml", ["train.synthetic_data=true"])
    assert cfg.train.freeze_backbone_steps > 0 and cfg.model.init_checkpoint
    release = MaskedViT(build_backbone(BackboneConfig(**{**cfg.model.backbone.__dict__, "img_size": 518})))
    torch.save({"model": _dinov2_style(release)}, tmp_path / "dinov2_vits14_reg4_pretrain.pth")
    save_file({k: v.contiguous() for k, v in release.backbone.state_dict().items()}, str(tmp_path / "timm.safetensors"))
    for name in ("dinov2_vits14_reg4_pretrain.pth", "timm.safetensors"):
        model = build_backbone(cfg.model.backbone)
        report = load_init_checkpoint(model, tmp_path / name, strict=True, layout=True)
        assert report.pos_embed_resized == ((37, 37), (16, 16)) and not report.missing_keys
        assert torch.equal(model.blocks[11].mlp.fc2.weight, release.backbone.blocks[11].mlp.fc2.weight)


# ---- Gram anchoring ---------------------------------------------------------------------------------------------


def _gram_by_hand(student, teacher, remove_negative):
    """dinov3's Gram loss written out entry by entry in float64: per image, cosine similarity of every patch pair,
    negatives to 0 (both sides), squared difference, mean over images and pairs."""
    total, count = 0.0, 0
    for s_img, t_img in zip(student.double(), teacher.double()):
        n = s_img.shape[0]
        for i in range(n):
            for j in range(n):
                s = float(s_img[i] @ s_img[j] / (s_img[i].norm() * s_img[j].norm()))
                t = float(t_img[i] @ t_img[j] / (t_img[i].norm() * t_img[j].norm()))
                if remove_negative:
                    s, t = max(s, 0.0), max(t, 0.0)
                total += (s - t) ** 2
                count += 1
    return total / count


def test_gram_loss_matches_the_formula():
    from pathdino.losses import gram_loss, resample_patch_grid

    torch.manual_seed(0)
    student, teacher = torch.randn(3, 9, 5), torch.randn(3, 9, 7)  # widths may differ: only similarities compare
    for remove_negative in (True, False):
        got = gram_loss(student, teacher, remove_negative=remove_negative).item()
        assert got == pytest.approx(_gram_by_hand(student, teacher, remove_negative), rel=1e-5)
    assert gram_loss(student, student * 3.0).item() == pytest.approx(0.0, abs=1e-6)  # scale-free: cosines
    # a teacher grid twice as fine, resampled to the student's: constant features stay constant
    fine = torch.ones(2, 16, 4) * torch.arange(4.0)
    assert torch.allclose(resample_patch_grid(fine, 2), torch.ones(2, 4, 4) * torch.arange(4.0), atol=1e-5)
    with pytest.raises(ValueError, match="same B and N"):
        gram_loss(student, teacher[:, :4])


GRAM = [
    "loss.gram.weight=1.0",
    "loss.gram.start_step=1",
    "loss.gram.refresh_every_steps=2",
    "loss.gram.input_scale=2.0",
]


def test_gram_teacher_is_copied_from_the_ema_teacher_on_schedule(tmp_path):
    out = tmp_path / "run"
    train(config(out, *GRAM))
    log = records(out)
    assert log[1]["gram"] == 0.0 and all(log[s]["gram"] > 0 for s in (2, 3, 4))

    def part(step, name, prefix=""):
        sd = load_file(ckpt(out, step) / f"{name}.safetensors")
        return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}

    # refreshed before optimizer steps 1 and 3 (0-based): checkpoint 2 holds teacher 1's backbone, 4 holds 3's
    for gram_step, teacher_step in ((2, 1), (3, 1), (4, 3)):
        gram, teacher = part(gram_step, "gram_teacher"), part(teacher_step, "teacher", "backbone.")
        assert gram.keys() == teacher.keys()
        assert all(torch.equal(gram[k], teacher[k]) for k in gram), (gram_step, teacher_step)
    gram2, teacher2 = part(2, "gram_teacher"), part(2, "teacher", "backbone.")
    assert not all(torch.equal(gram2[k], teacher2[k]) for k in gram2)  # the EMA teacher has moved on


def test_gram_resumes_exactly_across_a_refresh(tmp_path):
    ref = assert_resumes_exactly(tmp_path, *GRAM, stop_at=2)  # the refresh before step 3 happens after the resume
    assert_same_checkpoint(ckpt(ref, 4), ckpt(tmp_path / "resumed", 4), names=("gram_teacher",))


# ---- distillation -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wide_teacher_run(tmp_path_factory) -> Path:
    """A 1-step run of a wider model (96 wide, same prototypes): a pathdino checkpoint with heads."""
    out = tmp_path_factory.mktemp("teacher") / "run"
    train(config(out, "model.backbone.embed_dim=96", "model.backbone.num_heads=4", "train.total_steps=1"))
    return out


@pytest.fixture(scope="module")
def encoder_teacher(tmp_path_factory) -> Path:
    """An exported encoder 96 wide with 16 px patches (the student: 64 wide, 14 px): projection and grid resampling
    (84 px crops: a 6 x 6 student grid, 5 x 5 for the teacher at 80 px)."""
    from pathdino.data.config import IMAGENET_MEAN, IMAGENET_STD
    from pathdino.export.export import ExportOptions, export_backbone
    from pathdino.export.source import TrainingGeometry

    out = tmp_path_factory.mktemp("encoder") / "enc"
    cfg = BackboneConfig(
        arch="custom", embed_dim=96, depth=1, num_heads=2, patch_size=16, img_size=64, drop_path_rate=0.0
    )
    torch.manual_seed(3)
    geometry = TrainingGeometry(
        tile_px=64,
        target_mpp=0.5,
        effective_mpp_range=None,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        stores=(),
        notes=("test teacher",),
    )
    export_backbone(
        build_backbone(cfg),
        cfg,
        out,
        geometry=geometry,
        provenance={"checkpoint": None, "step": 0, "weights": "random", "stores": []},
        options=ExportOptions(model_name="test teacher"),
    )
    return out


def test_distil_from_a_checkpoint_teacher(tmp_path, wide_teacher_run):
    from tiling.fsio import file_sha256

    teacher_ckpt = ckpt(wide_teacher_run, 1)
    before = file_sha256(teacher_ckpt / "teacher.safetensors")
    ref = assert_resumes_exactly(tmp_path, f"train.distill.teacher={wide_teacher_run}")
    assert file_sha256(teacher_ckpt / "teacher.safetensors") == before
    saved = json.loads((ckpt(ref, 4) / "trainer_state.json").read_text())["distill_teacher"]
    assert saved == {"kind": "checkpoint", "path": str(teacher_ckpt), "sha256": before}
    files = sorted(p.name for p in ckpt(ref, 4).iterdir())
    assert not [f for f in files if "distill" in f] and "teacher.safetensors" in files  # the EMA, not the frozen one
    assert load_file(ckpt(ref, 4) / "teacher.safetensors")["backbone.backbone.cls_token"].shape[-1] == 64
    # the targets are the frozen teacher's: the same student without it sees other losses from step 1
    plain = tmp_path / "plain"
    train(config(plain, "train.total_steps=1"))
    assert records(plain)[1]["dino_global"] != records(ref)[1]["dino_global"]
    # resuming with other teacher weights is refused, naming the key
    other = tmp_path / "other_teacher"
    train(
        config(
            other, "model.backbone.embed_dim=96", "model.backbone.num_heads=4", "train.total_steps=1", "train.seed=5"
        )
    )
    with pytest.raises(Exception, match="train.distill.teacher"):
        train(config(tmp_path / "resumed", f"train.distill.teacher={other}"), resume=True)
    with pytest.raises(ConfigError, match="model.dino_head.n_prototypes"):
        train(config(tmp_path / "k", f"train.distill.teacher={wide_teacher_run}", "model.dino_head.n_prototypes=128"))


def test_feature_distillation_from_an_encoder_folder(tmp_path, encoder_teacher):
    ref = assert_resumes_exactly(tmp_path, f"train.distill.teacher={encoder_teacher}", "augment.global_crop_px=84")
    log = records(ref)
    assert all(0 < log[s]["distill"] <= 4 for s in log)  # two cosine distances, each in [0, 2]
    student = load_file(ckpt(ref, 4) / "student.safetensors")
    assert student["distill_proj.weight"].shape == (96, 64)  # student width 64 -> teacher width 96
    saved = json.loads((ckpt(ref, 4) / "trainer_state.json").read_text())["distill_teacher"]
    assert saved["kind"] == "encoder" and saved["path"] == str(encoder_teacher)
    # the loss is the teacher's: a student trained against it gets closer than at step 1
    assert log[4]["distill"] < log[1]["distill"]


def test_encoder_teacher_mpp_must_match_the_stores(tmp_path, encoder_teacher):
    """The encoder teacher saw tissue at 0.5 µm/px (its config.json); a store tiled at 0.25 µm/px is refused."""
    import numpy as np

    from pathdino.train.distill import build_distill_teacher
    from tiling.store import encode_tile
    from tiling.store_write import TileStoreWriter

    def store(url: Path, mpp: float) -> Path:
        sw = TileStoreWriter(url).begin_slide("s1", 64, encoding="png", tiles_per_shard=32)
        rng = np.random.default_rng(0)
        tiles = [encode_tile(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8), encoding="png") for _ in range(4)]
        sw.add(tiles, np.arange(8, dtype=np.int64).reshape(4, 2), np.ones(4, np.float32))
        sw.commit({"source_path": "synthetic", "source_fingerprint": "test", "target_mpp": mpp})
        return url

    def cfg(url: Path):
        return load_config(SMOKE, [f"data.stores=[{url}]", f"train.distill.teacher={encoder_teacher}"])

    with pytest.raises(ConfigError, match=r"0\.5 µm/px.*0\.25 µm/px"):
        build_distill_teacher(cfg(store(tmp_path / "fine.zarr", 0.25)), torch.device("cpu"))
    teacher = build_distill_teacher(cfg(store(tmp_path / "same.zarr", 0.51)), torch.device("cpu"))
    assert teacher.kind == "encoder" and not any(p.requires_grad for p in teacher.model.parameters())


def test_init_checkpoint_from_a_pathdino_checkpoint_file(tmp_path):
    """A pathdino run's teacher.safetensors (backbone.backbone.*, mask token, heads) starts a backbone directly."""
    from pathdino.models import load_init_checkpoint

    src = load_file(smoke_backbone(tmp_path))
    path = tmp_path / "teacher.safetensors"
    save_file(
        {
            **{f"backbone.backbone.{k}": v for k, v in src.items()},
            "backbone.mask_token": torch.zeros(1, 64),
            "dino_head.last_layer.weight": torch.zeros(4, 4),
        },
        str(path),
    )
    cfg = load_config(SMOKE, ["train.synthetic_data=true"]).model.backbone
    model = build_backbone(BackboneConfig(**{**cfg.__dict__, "layerscale_init": 0.3}))
    report = load_init_checkpoint(model, path, strict=True, layout=True)
    assert not report.missing_keys and all(torch.equal(model.state_dict()[k], v) for k, v in src.items())
