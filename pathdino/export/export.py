"""``pathdino export``: a training checkpoint's teacher backbone → a hub-ready timm encoder folder.

The folder holds ``model.safetensors`` (the timm ViT's state dict), ``config.json`` (timm's hub format plus a
``pathdino`` section: tile size and µm/px trained at, provenance, the export check) and ``README.md`` (model card).
It is built in a temporary sibling folder, reloaded with plain timm and compared with the checkpoint's own forward
pass, and only then renamed into place: a folder at the output path is always a checked export.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from pathdino.export.card import model_card
from pathdino.export.load import (
    CARD_FILE,
    CONFIG_FILE,
    ENCODER_FORMAT,
    ENCODER_FORMAT_VERSION,
    WEIGHTS_FILE,
    load_encoder,
)
from pathdino.export.source import (
    ExportError,
    TrainingGeometry,
    backbone_config_from,
    read_teacher_backbone,
    read_trainer_state,
    resolve_checkpoint_dir,
    training_cwd,
    training_geometry,
)
from tiling import __version__
from tiling.fsio import file_sha256, now_iso, publish_dir


@dataclass(frozen=True)
class ExportOptions:
    """Knobs of :func:`export_checkpoint`."""

    tile_px: int | None = None  # tile side trained at; None: read from the training stores
    target_mpp: float | None = None  # µm/px trained at; None: read from the training stores
    model_name: str | None = None  # title of the model card; None: the output folder's name
    license: str = "other"  # model-card / pretrained_cfg license (the weights inherit the training data's terms)
    overwrite: bool = False  # replace an existing output folder
    pick: str = "latest"  # of a run folder: latest (newest step_*), best (eval.probe.keep_best) or a step number
    atol: float = 1e-5  # largest |reloaded - checkpoint| output difference accepted (fp32, same machine: 0)

    def __post_init__(self) -> None:
        if self.tile_px is not None and self.tile_px < 1:
            raise ValueError(f"ExportOptions.tile_px must be positive, got {self.tile_px}")
        if self.target_mpp is not None and not self.target_mpp > 0:
            raise ValueError(f"ExportOptions.target_mpp must be > 0, got {self.target_mpp}")
        if self.pick not in ("latest", "best") and not str(self.pick).isdigit():
            raise ValueError(
                f"ExportOptions.pick (--checkpoint) must be latest, best or a step number, got {self.pick!r}"
            )


@dataclass(frozen=True)
class ExportResult:
    out_dir: Path
    architecture: str
    step: int | None
    tile_px: int | None
    target_mpp: float | None
    max_abs_diff: float  # reloaded timm model vs the checkpoint's forward on the check inputs
    notes: tuple[str, ...]


def export_checkpoint(
    checkpoint: str | Path, out_dir: str | Path, options: ExportOptions = ExportOptions()
) -> ExportResult:
    """Export the teacher backbone of a training checkpoint: a checkpoint folder, or a run folder and the checkpoint
    ``options.pick`` names (``latest``, ``best``, a step number)."""
    from pathdino.models import build_backbone

    ckpt = resolve_checkpoint_dir(checkpoint, options.pick)
    state = read_trainer_state(ckpt)
    config = state.get("config") or state.get("resolved_config") or {}
    cfg = backbone_config_from(config, str(ckpt / "trainer_state.json"))
    tensors, left_out = read_teacher_backbone(ckpt)
    backbone = build_backbone(replace(cfg, drop_path_rate=0.0))
    where = f"{ckpt / 'teacher.safetensors'} does not fit model.backbone of {ckpt / 'trainer_state.json'}"
    try:
        result = backbone.load_state_dict(tensors, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise ExportError(f"{where}: {exc}") from exc
    if result.missing_keys or result.unexpected_keys:
        raise ExportError(f"{where} (missing {result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]})")
    geometry = training_geometry(
        config, tile_px=options.tile_px, target_mpp=options.target_mpp, base_dir=training_cwd(ckpt, config)
    )
    provenance = {
        "checkpoint": str(ckpt.resolve()),
        "step": state.get("step"),
        "stores": list(geometry.stores),
        "world_size": state.get("world_size"),
        "batch_size": state.get("batch_size"),
        "left_out": _summarise_keys(left_out),
        "config": config,
    }
    return export_backbone(backbone, cfg, out_dir, geometry=geometry, provenance=provenance, options=options)


def export_backbone(
    backbone,
    backbone_cfg,
    out_dir: str | Path,
    *,
    geometry: TrainingGeometry,
    provenance: dict[str, Any],
    options: ExportOptions = ExportOptions(),
) -> ExportResult:
    """Write, reload-check and publish an encoder folder for a timm ViT built from ``backbone_cfg``."""
    import timm
    import torch
    from safetensors.torch import save_file

    from pathdino.models import timm_create_kwargs

    out_dir = Path(out_dir).expanduser()
    if out_dir.exists() and (out_dir.is_file() or any(out_dir.iterdir())) and not options.overwrite:
        raise ExportError(f"output folder {out_dir} already exists; pass --overwrite to replace it")
    arch, kwargs = timm_create_kwargs(backbone_cfg)
    backbone = backbone.eval()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        weights = {
            k: v.detach().to("cpu", torch.float32).contiguous().clone() for k, v in backbone.state_dict().items()
        }
        save_file(weights, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        os.chmod(tmp / WEIGHTS_FILE, 0o644)  # a folder meant for sharing: readable like the JSON next to it
        n_prefix = 1 + backbone_cfg.num_register_tokens
        meta: dict[str, Any] = {
            "format": ENCODER_FORMAT,
            "format_version": ENCODER_FORMAT_VERSION,
            "tile_px": geometry.tile_px,
            "target_mpp": geometry.target_mpp,
            "effective_mpp_range": list(geometry.effective_mpp_range) if geometry.effective_mpp_range else None,
            "input_px": backbone_cfg.img_size,
            "patch_size": backbone_cfg.patch_size,
            "embed_dim": backbone_cfg.embed_dim_,
            "num_register_tokens": backbone_cfg.num_register_tokens,
            "num_prefix_tokens": n_prefix,
            "backbone_config": asdict(backbone_cfg),
            "training": provenance,
            "export": {
                "created": now_iso(),
                "pathdino_version": __version__,
                "timm_version": timm.__version__,
                "torch_version": torch.__version__,
                "weights_sha256": file_sha256(tmp / WEIGHTS_FILE),
            },
            "notes": list(geometry.notes),
        }
        config = _timm_config(arch, kwargs, backbone_cfg, geometry, options.license, meta)
        _write_json(tmp / CONFIG_FILE, config)
        max_diff = verify_export(backbone, tmp)
        if not max_diff <= options.atol:
            raise ExportError(
                f"export check failed: the encoder reloaded from {tmp} differs from the checkpoint by "
                f"{max_diff:.3g} (> atol {options.atol:g}); the export was not written"
            )
        meta["export"]["check"] = {
            "max_abs_diff": max_diff,
            "atol": options.atol,
            "compared": "all weights; CLS and patch tokens of the timm reload vs the "
            "checkpoint's forward at 2 input sizes",
        }
        _write_json(tmp / CONFIG_FILE, config)
        (tmp / CARD_FILE).write_text(model_card(config, options.model_name or out_dir.name))
        publish_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ExportResult(
        out_dir=out_dir,
        architecture=arch,
        step=provenance.get("step"),
        tile_px=geometry.tile_px,
        target_mpp=geometry.target_mpp,
        max_abs_diff=max_diff,
        notes=geometry.notes,
    )


def _summarise_keys(keys: list[str]) -> list[str]:
    """Checkpoint keys not exported, grouped: ``dino_head.*`` rather than every prototype tensor."""
    return sorted({k if k.endswith("mask_token") else k.split(".")[0] + ".*" for k in keys})


def _timm_config(
    arch: str, kwargs: dict[str, Any], cfg, geometry: TrainingGeometry, license_: str, meta: dict[str, Any]
) -> dict[str, Any]:
    # timm's hub layout (timm.models._hub.save_config_for_hf): `hf-hub:` / `local-dir:` loading reads it as is.
    return {
        "architecture": arch,
        "num_classes": 0,
        "num_features": cfg.embed_dim_,
        "global_pool": "token",
        "model_args": kwargs,
        "pretrained_cfg": {
            "tag": "pathdino",
            "custom_load": False,
            "input_size": [3, cfg.img_size, cfg.img_size],
            "fixed_input_size": False,
            # crop_pct 1.0: a tile is already the field of view the encoder was trained on; resize, never crop.
            "interpolation": "bicubic",
            "crop_pct": 1.0,
            "crop_mode": "center",
            "mean": list(geometry.mean),
            "std": list(geometry.std),
            "num_classes": 0,
            "first_conv": "patch_embed.proj",
            "classifier": "head",
            "license": license_,
            "description": (
                f"pathdino DINOv2 tile encoder for H&E tiles of {geometry.tile_px} px at {geometry.target_mpp} µm/px"
            ),
        },
        "pathdino": meta,
    }


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")


def verify_export(reference, out_dir: str | Path) -> float:
    """Largest |difference| between ``reference`` (the checkpoint's backbone) and the encoder reloaded from
    ``out_dir`` with plain timm: over every weight (keys must match), and over CLS and patch tokens with the
    reference run as the trainer runs it, at the training size and one patch larger (interpolated positions).

    Weights are compared too because outputs alone are a weak check early in training: with LayerScale at 1e-5 a
    block's weights barely move the output. Returns ``inf`` when keys or shapes differ.
    """
    import torch

    from pathdino.models import MaskedViT

    model, _ = load_encoder(out_dir)
    ref_sd, new_sd = reference.state_dict(), model.state_dict()
    if ref_sd.keys() != new_sd.keys() or any(ref_sd[k].shape != new_sd[k].shape for k in ref_sd):
        return float("inf")
    worst = max(
        (float((ref_sd[k].float() - new_sd[k].float()).abs().max()) for k in ref_sd if ref_sd[k].numel()), default=0.0
    )
    teacher = MaskedViT(reference).eval()
    patch = teacher.patch_size
    size = reference.patch_embed.img_size[0]
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for batch, side in ((2, size), (1, size + patch)):
            x = torch.randn(batch, 3, side, side, generator=gen)
            ref = teacher(x)
            tokens = model.forward_features(x)
            n_prefix = model.num_prefix_tokens
            pooled = model(x)
            for a, b in ((ref["cls"], tokens[:, 0]), (ref["patch"], tokens[:, n_prefix:]), (ref["cls"], pooled)):
                if a.shape != b.shape:
                    return float("inf")
                worst = max(worst, float((a - b).abs().max()))
    return worst
