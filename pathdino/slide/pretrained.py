"""A slide-pretraining checkpoint -> a slide-encoder folder (``pathdino export`` of a ``pathdino.slide.train`` run).

The encoder's weights are the EMA's when the run kept one (``optim.ema_momentum``), else the trained encoder's;
its config is the run's resolved ``model`` section (``in_dim`` = the tile embeddings' width). The model card names
the tile encoder the embeddings came from, as the embeddings store recorded it (the checkpoint keeps a copy), so
``pathdino slide-embed`` can refuse embeddings of another tile encoder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from pathdino.slide.config import SlideEncoderConfig
from pathdino.slide.export import load_slide_encoder, save_slide_encoder, tile_encoder_identity
from pathdino.slide.model import SlideEncoder
from pathdino.train.checkpoint import STATE_FILE, read_trainer_state
from tiling.configio import ConfigError, from_dict

CHECKPOINT_KIND = "slide-mae"  # trainer_state["kind"] of a slide-pretraining checkpoint


def is_slide_checkpoint(checkpoint: str | Path) -> bool:
    """Whether a ``step_*`` folder was written by the slide pretrainer (reads trainer_state.json only)."""
    path = Path(checkpoint) / STATE_FILE
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text()).get("kind") == CHECKPOINT_KIND
    except (OSError, ValueError):
        return False


@dataclass(frozen=True)
class SlideExportResult:
    out_dir: Path
    step: int
    weights: str  # "ema" or "trained"
    tile_encoder: str  # the tile encoder's name in the card
    max_abs_diff: float  # reloaded folder vs the checkpoint's encoder on a random slide


def export_slide_checkpoint(
    checkpoint: str | Path, out_dir: str | Path, *, overwrite: bool = False, use_ema: bool = True
) -> SlideExportResult:
    """Write the slide encoder of ``checkpoint`` (a ``step_*`` folder of a slide-pretraining run) to ``out_dir``,
    then reload it and check that it computes what the checkpoint's encoder does."""
    from safetensors.torch import load_file

    ckpt = Path(checkpoint)
    state = read_trainer_state(ckpt)
    config = state.get("config", {})
    cfg = from_dict(SlideEncoderConfig, dict(config.get("model", {})), where=f"{ckpt / STATE_FILE} model")
    out_dir = Path(out_dir).expanduser()
    if out_dir.exists() and (out_dir.is_file() or any(out_dir.iterdir())) and not overwrite:
        raise ConfigError(f"output folder {out_dir} already exists; pass --overwrite to replace it", key="--out")
    ema = use_ema and (ckpt / "ema.safetensors").is_file()
    if ema:
        weights = load_file(ckpt / "ema.safetensors")
    else:
        weights = {
            k.removeprefix("encoder."): v
            for k, v in load_file(ckpt / "model.safetensors").items()
            if k.startswith("encoder.")
        }
    model = SlideEncoder(cfg)
    model.load_state_dict(weights)
    model.eval()
    feature = config.get("data", {}).get("feature", "features")
    tile = tile_encoder_identity(state.get("tile_encoder", {}), feature_dim=cfg.in_dim)
    if feature != "features":  # trained on one array of a recipe (e.g. CLS of a CLS + mean-patch encoder)
        tile["recipe"] = feature
    training = {
        "checkpoint": str(ckpt.resolve()),
        "step": state.get("step"),
        "objective": f"masked autoencoding (mask ratio {config.get('objective', {}).get('mask_ratio')})",
        "weights": "EMA" if ema else "trained",
        "embeddings": ", ".join(state.get("embeddings", [])),
        "world_size": state.get("world_size"),
    }
    save_slide_encoder(model, cfg, out_dir, tile_encoder=tile, training=training)
    reloaded = load_slide_encoder(out_dir)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(37, cfg.in_dim, generator=gen)
    grid = torch.stack([torch.arange(37) % 7, torch.arange(37) // 7], 1)
    with torch.no_grad():
        a, b = model(x, grid), reloaded(x, grid)
    diff = max((a.cls - b.cls).abs().max().item(), (a.tiles - b.tiles).abs().max().item())
    return SlideExportResult(
        out_dir=out_dir,
        step=int(state.get("step", 0)),
        weights="ema" if ema else "trained",
        tile_encoder=str(tile["name"]),
        max_abs_diff=diff,
    )
