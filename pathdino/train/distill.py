"""Distillation teachers (``train.distill``): a frozen model whose outputs the student learns.

Two kinds, told apart by what ``train.distill.teacher`` names:

* a pathdino checkpoint (a ``step_*`` folder, or a run folder: its newest checkpoint): the EMA teacher of that run,
  heads included, rebuilt from the checkpoint's own config at this run's crop size. Its DINO and iBOT outputs
  replace the EMA teacher's as targets (centering or Sinkhorn as ``loss.targets`` says), as dinov3's distillation
  does; the student keeps its iBOT masks (dinov3 unmasks the student when distilling; here the losses stay the
  DINOv2 ones, and DDP's graph the same) and its EMA is what gets exported.
* an encoder folder (``pathdino export`` output, or a third-party timm folder of the known-encoder table): a
  headless ViT. The student's global-crop CLS and patch tokens learn the teacher's by cosine (through a linear
  projection when the widths differ; the teacher's patch grid resampled to the student's when patch sizes
  differ); the DINO/iBOT objective with the EMA teacher runs beside it (set loss.dino_weight / ibot_weight to 0
  for pure feature distillation). The crops are re-normalised to the teacher's mean/std; the encoder's µm/px
  must match the stores'.

Either way the teacher is frozen (no grad, eval mode; bf16 weights when ``train.precision`` is bf16) and never
saved: checkpoints record its path and the SHA-256 of its weights, and a resume with other weights is an error.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from pathdino.losses import resample_patch_grid
from pathdino.train.checkpoint import CheckpointError, latest_checkpoint, load_model_file, read_trainer_state
from pathdino.train.config import ModelConfig, RunConfig
from pathdino.train.model import SSLModel
from tiling.configio import ConfigError, from_dict
from tiling.fsio import file_sha256
from tiling.store import TileStore, slide_mpp

log = logging.getLogger("pathdino.train")
MPP_TOLERANCE = 0.05  # relative µm/px difference between the teacher's and the stores' still accepted
KEY = "train.distill.teacher"


class EncoderTeacher(nn.Module):
    """A headless timm encoder as a distillation teacher: ``forward(crops)`` -> (CLS [B, D_t], patch tokens
    [B, side*side, D_t] on the student's grid). Crops arrive normalised for the student and are re-normalised for
    the teacher; ``forward`` (not ``forward_features``) so that FSDP2 gathers the root's parameters."""

    def __init__(self, encoder: nn.Module, *, scale: torch.Tensor, shift: torch.Tensor, patch_size: int):
        super().__init__()
        self.encoder = encoder
        self.register_buffer("scale", scale.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", shift.view(1, 3, 1, 1), persistent=False)
        self.patch_size = patch_size

    def forward(self, crops: torch.Tensor, side: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = crops * self.scale.to(crops.dtype) + self.shift.to(crops.dtype)
        px = x.shape[-1]
        fit = max(self.patch_size, round(px / self.patch_size) * self.patch_size)
        if fit != px:  # the teacher's patch size does not divide the crop: nearest multiple, same field of view
            x = F.interpolate(x, size=(fit, fit), mode="bicubic", align_corners=False)
        tokens = self.encoder.forward_features(x)
        n_prefix = getattr(self.encoder, "num_prefix_tokens", 1)
        return tokens[:, 0], resample_patch_grid(tokens[:, n_prefix:], side)


@dataclass(frozen=True)
class DistillTeacher:
    kind: Literal["checkpoint", "encoder"]
    model: nn.Module  # SSLModel (checkpoint) or EncoderTeacher (encoder); frozen, eval
    path: str  # the folder it was read from
    sha256: str  # of its weights file
    embed_dim: int

    def record(self) -> dict[str, str]:
        """What a checkpoint keeps of the teacher (never its weights)."""
        return {"kind": self.kind, "path": self.path, "sha256": self.sha256}


def distill_units(teacher: DistillTeacher) -> list[nn.Module]:
    """The modules FSDP2 shards one by one in a teacher (each ViT block, then the heads)."""
    if isinstance(teacher.model, SSLModel):
        return teacher.model.fsdp_units()
    return list(teacher.model.encoder.blocks)


def check_resumed_teacher(saved: dict | None, teacher: DistillTeacher | None) -> None:
    """A resume uses the teacher the checkpoint was trained with (same weights), or fails naming the key."""
    if saved is None and teacher is None:
        return
    if saved is None or teacher is None or saved.get("sha256") != teacher.sha256:
        was = f"{saved['path']} (sha256 {saved['sha256'][:12]})" if saved else "no teacher"
        now = f"{teacher.path} (sha256 {teacher.sha256[:12]})" if teacher else "no teacher"
        raise CheckpointError(
            f"{KEY}: the checkpoint was trained distilling from {was}, this run names {now}; "
            "resume with the same teacher weights, or start a new output_dir"
        )


def build_distill_teacher(cfg: RunConfig, device: torch.device) -> DistillTeacher | None:
    """The frozen teacher ``train.distill.teacher`` names (None when unset), on ``device``."""
    path = cfg.train.distill.teacher
    if not path:
        return None
    folder = Path(path)
    if (folder / "checkpoints").is_dir():
        folder = latest_checkpoint(folder) or folder
    if (folder / "trainer_state.json").is_file():
        teacher = _checkpoint_teacher(cfg, folder)
    elif (folder / "config.json").is_file():
        teacher = _encoder_teacher(cfg, folder)
    else:
        raise ConfigError(
            f"{KEY}={path} is neither a pathdino checkpoint (a step_* folder or a run folder with "
            "checkpoints/) nor an encoder folder (config.json + weights)",
            key=KEY,
        )
    teacher.model.requires_grad_(False).eval()
    if cfg.train.precision == "bf16":
        teacher.model.to(torch.bfloat16)
    teacher.model.to(device)
    log.info(
        "distilling from %s teacher %s (sha256 %s, width %d)",
        teacher.kind,
        teacher.path,
        teacher.sha256[:12],
        teacher.embed_dim,
    )
    return teacher


def _checkpoint_teacher(cfg: RunConfig, folder: Path) -> DistillTeacher:
    saved = read_trainer_state(folder).get("config", {}).get("model")
    if not isinstance(saved, dict):
        raise ConfigError(f"{KEY}: {folder} holds no model config in trainer_state.json", key=KEY)
    tm = from_dict(ModelConfig, saved, f"{folder}/trainer_state.json model")
    mc = cfg.model
    for key, theirs, ours in (
        ("model.backbone.patch_size", tm.backbone.patch_size, mc.backbone.patch_size),
        ("model.dino_head.n_prototypes", tm.dino_head.n_prototypes, mc.dino_head.n_prototypes),
        (
            "model.ibot_head.n_prototypes",
            (tm.ibot_head_ or tm.dino_head).n_prototypes,
            (mc.ibot_head_ or mc.dino_head).n_prototypes,
        ),
    ):
        if theirs != ours:
            raise ConfigError(
                f"{KEY}: the teacher's {key} is {theirs}, the student's {ours}; its outputs are the "
                f"student's targets, so set {key}={theirs}",
                key=key,
            )
    backbone = replace(tm.backbone, img_size=mc.backbone.img_size, drop_path_rate=0.0)
    model = SSLModel(backbone, tm.dino_head, tm.ibot_head_)
    weights = folder / "teacher.safetensors"
    load_model_file(model, weights)
    return DistillTeacher(
        kind="checkpoint",
        model=model,
        path=str(folder),
        sha256=file_sha256(weights),
        embed_dim=model.backbone.embed_dim,
    )


def _encoder_teacher(cfg: RunConfig, folder: Path) -> DistillTeacher:
    from pathdino.export.load import load_encoder, read_encoder_config

    info = read_encoder_config(folder)
    _check_mpp(cfg, info.target_mpp, folder)
    encoder, _ = load_encoder(info)
    if not getattr(encoder, "dynamic_img_size", False) and info.input_px != cfg.augment.global_crop_px:
        raise ConfigError(
            f"{KEY}: {folder} takes {info.input_px} px inputs only (no dynamic image size) and the "
            f"global crops are {cfg.augment.global_crop_px} px; set augment.global_crop_px="
            f"{info.input_px}",
            key="augment.global_crop_px",
        )
    mean_s, std_s = torch.tensor(cfg.augment.mean), torch.tensor(cfg.augment.std)
    mean_t, std_t = torch.tensor(info.mean), torch.tensor(info.std)
    # x_student = (rgb - mean_s) / std_s  ->  x_teacher = (rgb - mean_t) / std_t
    scale, shift = std_s / std_t, (mean_s - mean_t) / std_t
    patch = int(encoder.patch_embed.patch_size[0])
    model = EncoderTeacher(encoder, scale=scale.float(), shift=shift.float(), patch_size=patch)
    return DistillTeacher(
        kind="encoder",
        model=model,
        path=str(folder),
        sha256=file_sha256(info.weights_path),
        embed_dim=int(encoder.embed_dim),
    )


def _check_mpp(cfg: RunConfig, teacher_mpp: float | None, folder: Path) -> None:
    """The teacher saw tissue at the stores' µm/px (synthetic data and unknown µm/px are not checked)."""
    if teacher_mpp is None or cfg.train.synthetic_data:
        return
    for url in cfg.data.stores:
        store = TileStore(url)
        for sid in store.slide_ids:
            mpp = slide_mpp(store.slide(sid))
            if mpp is not None and abs(mpp - teacher_mpp) > MPP_TOLERANCE * teacher_mpp:
                raise ConfigError(
                    f"{KEY}: {folder} was trained at {teacher_mpp:g} µm/px but slide {sid!r} of {url} "
                    f"is tiled at {mpp:g} µm/px; tile the slides at {teacher_mpp:g} µm/px or choose "
                    "a teacher trained at the stores' resolution",
                    key=KEY,
                )
