"""A tiny, untrained encoder folder for examples and tests when no trained checkpoint is at hand.

It goes through the real export path (``export_backbone``: safetensors, config.json, model card, reload check), so
everything downstream (``load_encoder``, ``pathdino embed``, the notebooks) runs exactly as with a trained one. Its
weights are random: features from it carry no meaning beyond the plumbing.
"""

from __future__ import annotations

from pathlib import Path

from pathdino.data.config import IMAGENET_MEAN, IMAGENET_STD
from pathdino.export.export import ExportOptions, ExportResult, export_backbone
from pathdino.export.source import TrainingGeometry


def export_untrained_encoder(
    out_dir: str | Path,
    tile_px: int = 224,
    target_mpp: float = 0.5,
    embed_dim: int = 64,
    depth: int = 2,
    num_heads: int = 2,
    seed: int = 0,
    overwrite: bool = False,
) -> ExportResult:
    """Export a randomly initialised ViT (patch 14, input = ``tile_px`` rounded to a multiple of 14)."""
    import torch

    from pathdino.models import BackboneConfig, build_backbone

    img_size = max(14, round(tile_px / 14) * 14)
    cfg = BackboneConfig(
        arch="custom",
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        patch_size=14,
        img_size=img_size,
        drop_path_rate=0.0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        backbone = build_backbone(cfg)
    geometry = TrainingGeometry(
        tile_px=tile_px,
        target_mpp=target_mpp,
        effective_mpp_range=None,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        stores=(),
        notes=("UNTRAINED: random initial weights, for examples and tests only",),
    )
    provenance = {"checkpoint": None, "step": 0, "weights": f"random initialisation (seed {seed})", "stores": []}
    return export_backbone(
        backbone,
        cfg,
        out_dir,
        geometry=geometry,
        provenance=provenance,
        options=ExportOptions(model_name="pathdino untrained sample encoder", overwrite=overwrite),
    )
