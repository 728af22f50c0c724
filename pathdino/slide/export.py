"""Slide-encoder folders: ``save_slide_encoder`` writes one, ``load_slide_encoder`` rebuilds the model from it.

::

    <dir>/model.safetensors   the SlideEncoder's state dict (float32)
    <dir>/config.json         {"format": "pathdino-slide-encoder", "format_version": 1, "slide_encoder": {config},
                              "tile_encoder": {identity of the tile encoder whose embeddings it reads}, ...}
    <dir>/README.md           model card: the architecture and the tile encoder it was trained on

The tile encoder's identity (name, weights hash, embedding recipe and width, tile px, µm/px) is part of the
folder because a slide encoder only means something on embeddings of that encoder: ``check_tile_encoder``
compares it with an embeddings store before use.
"""

from __future__ import annotations

import dataclasses
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pathdino.slide.config import SlideEncoderConfig
from pathdino.slide.model import SlideEncoder
from tiling import __version__
from tiling.configio import ConfigError, from_dict
from tiling.errors import PathdinoError
from tiling.fsio import atomic_write_json, atomic_write_text, now_iso, publish_dir, read_json

FORMAT_NAME = "pathdino-slide-encoder"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "README.md"
TILE_ENCODER_KEYS = ("name", "feature_dim", "weights_sha256", "recipe", "tile_px", "target_mpp")
MPP_TOLERANCE = 0.05  # relative µm/px difference accepted between the card and an embeddings store


class SlideEncoderFormatError(PathdinoError, ValueError):
    """A slide-encoder folder is missing a file or its config.json is not what ``save_slide_encoder`` writes."""


class TileEncoderMismatchError(PathdinoError, ValueError):
    """Tile embeddings from another tile encoder than the one a slide encoder was trained on."""


@dataclass(frozen=True)
class SlideEncoderInfo:
    """What a slide-encoder folder's config.json says."""

    path: Path
    config: SlideEncoderConfig
    tile_encoder: dict[str, Any]  # TILE_ENCODER_KEYS (+ architecture, embed_dim, ...)
    meta: dict[str, Any]  # the whole config.json (training provenance, pathdino version, created)


def tile_encoder_identity(encoder: dict[str, Any], *, feature_dim: int) -> dict[str, Any]:
    """The tile-encoder identity of a slide encoder, from an embeddings store's ``encoder`` attrs
    (``EmbeddingStore(...).encoder``) and the width of its tile features (``feature_dim``, e.g. 2 x embed_dim
    for the ``cls+mean_patch`` recipe)."""
    name = encoder.get("known_encoder") or encoder.get("name") or Path(str(encoder.get("dir", "unknown"))).name
    return {
        "name": str(name),
        "architecture": encoder.get("architecture"),
        "embed_dim": encoder.get("embed_dim"),
        "feature_dim": int(feature_dim),
        "weights_sha256": encoder.get("weights_sha256"),
        "recipe": encoder.get("recipe", "cls"),
        "tile_px": encoder.get("tile_px"),
        "target_mpp": encoder.get("target_mpp"),
    }


def check_tile_encoder(
    info: SlideEncoderInfo, encoder: dict[str, Any], *, feature_dim: int, where: str, force: bool = False
) -> list[str]:
    """What differs between the tile encoder ``info`` was trained on and an embeddings store's (``where``).

    Raises TileEncoderMismatchError listing the differences unless ``force`` (then returns them, for a warning).
    A width mismatch is always an error: the model cannot read such embeddings.
    """
    card = info.tile_encoder
    theirs = tile_encoder_identity(encoder, feature_dim=feature_dim)
    if feature_dim != info.config.in_dim:
        raise TileEncoderMismatchError(
            f"{where}: tile features are {feature_dim} wide but the slide encoder "
            f"{info.path} reads {info.config.in_dim} (tile encoder "
            f"{card.get('name')!r}); embed the slides with that tile encoder"
        )
    issues = []
    for key in ("weights_sha256", "recipe", "tile_px"):
        if card.get(key) is not None and theirs.get(key) is not None and card[key] != theirs[key]:
            issues.append(f"{key}: {theirs[key]!r} in the embeddings, {card[key]!r} in the slide encoder's card")
    mine, other = card.get("target_mpp"), theirs.get("target_mpp")
    if mine and other and abs(float(other) - float(mine)) > MPP_TOLERANCE * float(mine):
        issues.append(f"target_mpp: {other} µm/px in the embeddings, {mine} in the slide encoder's card")
    if issues and not force:
        raise TileEncoderMismatchError(
            f"{where} was embedded with another tile encoder ({theirs['name']!r}) than the slide encoder {info.path} "
            f"was trained on ({card.get('name')!r}): "
            + "; ".join(issues)
            + ". Embed the slides with that tile encoder, or pass --force to use them anyway"
        )
    return issues


def save_slide_encoder(
    model: SlideEncoder,
    cfg: SlideEncoderConfig,
    out_dir: str | Path,
    *,
    tile_encoder: dict[str, Any],
    training: dict[str, Any] | None = None,
) -> Path:
    """Write ``out_dir`` (model.safetensors, config.json, README.md) atomically: staged beside it, then renamed.

    ``tile_encoder`` names the tile encoder whose embeddings the model reads (``tile_encoder_identity``); it
    needs at least ``name``, and ``feature_dim`` (default: ``cfg.in_dim``) must equal ``cfg.in_dim``.
    ``training``: provenance for the card (run dir, step, objective, data), stored as given.
    """
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    tile_encoder = {"feature_dim": cfg.in_dim, **tile_encoder}
    if not tile_encoder.get("name"):
        raise ConfigError(
            "save_slide_encoder: tile_encoder needs a 'name' (the tile encoder the embeddings came from)",
            key="tile_encoder.name",
        )
    if int(tile_encoder["feature_dim"]) != cfg.in_dim:
        raise ConfigError(
            f"save_slide_encoder: tile_encoder.feature_dim={tile_encoder['feature_dim']} differs from "
            f"SlideEncoderConfig.in_dim={cfg.in_dim}",
            key="tile_encoder.feature_dim",
        )
    if out_dir.exists() and not (out_dir / CONFIG_FILE).is_file() and any(out_dir.iterdir()):
        raise SlideEncoderFormatError(f"{out_dir} exists and is not a slide-encoder folder: choose another output")
    meta = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "slide_encoder": dataclasses.asdict(cfg),
        "tile_encoder": tile_encoder,
        "training": training or {},
        "pathdino_version": __version__,
        "created": now_iso(),
    }
    staged = out_dir.parent / f".{out_dir.name}.staging-{uuid.uuid4().hex[:8]}"
    staged.mkdir(parents=True)
    state = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(staged / WEIGHTS_FILE), metadata={"format": FORMAT_NAME})
    atomic_write_json(staged / CONFIG_FILE, meta, fsync=False)
    atomic_write_text(staged / CARD_FILE, model_card(meta, name=out_dir.name), fsync=False)
    return publish_dir(staged, out_dir)


def read_slide_encoder_config(path: str | Path) -> SlideEncoderInfo:
    """Read and check a slide-encoder folder's config.json (no torch work)."""
    path = Path(path)
    if not path.is_dir():
        raise SlideEncoderFormatError(
            f"no slide-encoder folder at {path} (write one with `pathdino export` of a slide-encoder run)"
        )
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (path / name).is_file():
            raise SlideEncoderFormatError(f"{path} has no {name}: not a complete slide-encoder folder")
    meta = read_json(path / CONFIG_FILE, error=SlideEncoderFormatError)
    if meta.get("format") != FORMAT_NAME:
        raise SlideEncoderFormatError(
            f"{path / CONFIG_FILE} is not a slide encoder's config (format "
            f"{meta.get('format')!r}, expected {FORMAT_NAME!r}); a tile encoder folder "
            "is loaded with `pathdino.load_encoder`"
        )
    if meta.get("format_version") != FORMAT_VERSION:
        raise SlideEncoderFormatError(
            f"{path / CONFIG_FILE} has format version {meta.get('format_version')!r}; this "
            f"pathdino reads {FORMAT_VERSION}: install the release that wrote it"
        )
    config = from_dict(SlideEncoderConfig, dict(meta.get("slide_encoder", {})), where=str(path / CONFIG_FILE))
    return SlideEncoderInfo(path=path, config=config, tile_encoder=dict(meta.get("tile_encoder", {})), meta=meta)


def load_slide_encoder(path: str | Path, *, device: str | torch.device | None = None) -> SlideEncoder:
    """The SlideEncoder of a folder, in eval mode; ``model.info`` holds its ``SlideEncoderInfo``."""
    from safetensors.torch import load_file

    info = read_slide_encoder_config(path)
    model = SlideEncoder(info.config)
    state = load_file(str(info.path / WEIGHTS_FILE))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise SlideEncoderFormatError(
            f"{info.path / WEIGHTS_FILE} does not fit its config.json: missing "
            f"{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    model.info = info
    return model.to(device or "cpu").eval()


def _fmt(value: Any, unit: str = "") -> str:
    return "unknown" if value is None else f"{value}{unit}"


def model_card(meta: dict[str, Any], *, name: str) -> str:
    """The README.md of a slide-encoder folder."""
    cfg, tile, training = meta["slide_encoder"], meta["tile_encoder"], meta.get("training") or {}
    branches = ", ".join(f"({w}, {r})" for w, r in zip(cfg["segment_lengths"], cfg["dilation_ratios"]))
    lines = [
        f"# {name}: a pathdino LongNet slide encoder",
        "",
        f"A {cfg['depth']}-block, {cfg['embed_dim']}-wide LongNet transformer ({cfg['num_heads']} heads, dilated "
        f"attention branches (segment length, dilation ratio): {branches}) over the tile embeddings of one slide, "
        "with 2D sin-cos positions from each tile's place on the slide's tile grid and a CLS token.",
        "",
        "## Tile encoder",
        "",
        "It reads tile embeddings of this tile encoder only (`pathdino slide-embed` refuses others unless --force):",
        "",
        f"- name: {_fmt(tile.get('name'))}",
        f"- architecture: {_fmt(tile.get('architecture'))}",
        f"- embedding: {_fmt(tile.get('recipe'))}, {_fmt(tile.get('feature_dim'))} wide "
        f"(encoder width {_fmt(tile.get('embed_dim'))})",
        f"- weights sha256: {_fmt(tile.get('weights_sha256'))}",
        f"- tiles: {_fmt(tile.get('tile_px'), ' px')} at {_fmt(tile.get('target_mpp'), ' µm/px')}",
        "",
        "## Use",
        "",
        "```python",
        "import pathdino",
        "",
        f'model = pathdino.load_slide_encoder("{name}")',
        "out = model(tile_embeddings, grid_xy)  # [N, in_dim] float, [N, 2] (col, row) on the tile grid",
        "out.cls, out.tiles  # [1, D] slide vector, [N, D] contextualised tiles",
        "```",
        "",
        f"or `pathdino slide-embed EMBEDDINGS --slide-encoder {name} --out OUT`.",
        "",
        "## Provenance",
        "",
        f"- written by pathdino {meta.get('pathdino_version')} on {meta.get('created')}",
    ]
    lines += [f"- {key}: {value}" for key, value in sorted(training.items())]
    return "\n".join(lines) + "\n"
