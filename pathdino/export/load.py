"""Load an exported tile encoder: ``load_encoder(dir) -> (model, transform)``.

An encoder folder (written by ``pathdino export``, layout in docs/export-embed-eval.md) holds ``config.json`` (timm's
hub format: ``architecture``, ``model_args``, ``pretrained_cfg``, plus a ``pathdino`` section with the tile size and
µm/px the encoder was trained at), ``model.safetensors`` and a model card ``README.md``. The model is rebuilt by
plain timm, offline, so anything loaded here also loads without pathdino.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "README.md"
ENCODER_FORMAT = "pathdino-encoder"
ENCODER_FORMAT_VERSION = 1


class EncoderFormatError(ValueError):
    """An encoder folder is missing a file or its config.json is not what ``pathdino export`` writes."""


@dataclass(frozen=True)
class EncoderInfo:
    """What ``config.json`` says about an exported encoder."""

    path: Path
    architecture: str  # timm model name, e.g. "vit_small_patch14_reg4_dinov2"
    model_args: dict[str, Any]  # kwargs for timm.create_model that rebuild the exact backbone
    pretrained_cfg: dict[str, Any]  # timm pretrained_cfg: input_size, mean, std, interpolation, crop_pct, ...
    pathdino: dict[str, Any]  # tile_px, target_mpp, training provenance, export checks

    @property
    def input_px(self) -> int:
        """Side of the square input the model was trained at (its global crop size)."""
        return int(self.pretrained_cfg["input_size"][-1])

    @property
    def mean(self) -> tuple[float, float, float]:
        return tuple(float(v) for v in self.pretrained_cfg["mean"])  # type: ignore[return-value]

    @property
    def std(self) -> tuple[float, float, float]:
        return tuple(float(v) for v in self.pretrained_cfg["std"])  # type: ignore[return-value]

    @property
    def tile_px(self) -> int | None:
        """Side of the store tiles the encoder was trained on (None when unknown)."""
        value = self.pathdino.get("tile_px")
        return int(value) if value is not None else None

    @property
    def target_mpp(self) -> float | None:
        """µm/px of the tiles the encoder was trained on (None when unknown or mixed)."""
        value = self.pathdino.get("target_mpp")
        return float(value) if value is not None else None

    @property
    def embed_dim(self) -> int:
        return int(self.model_args["embed_dim"])

    @property
    def weights_sha256(self) -> str | None:
        return self.pathdino.get("export", {}).get("weights_sha256")

    def timm_overlay(self) -> dict[str, Any]:
        """``pretrained_cfg_overlay`` for ``timm.create_model``: this config's preprocessing plus the weights file.

        The registry's dinov2 entry says 518 px input and points at facebook's weights; every field that matters is
        replaced here so nothing is downloaded and timm's data config describes this encoder.
        """
        from timm.models import PretrainedCfg

        known = {f.name for f in dataclasses.fields(PretrainedCfg)}
        overlay = {k: (tuple(v) if isinstance(v, list) else v) for k, v in self.pretrained_cfg.items() if k in known}
        overlay.update(file=str(self.path / WEIGHTS_FILE), url="", hf_hub_id="", architecture=self.architecture)
        return overlay


def _require_files(path: Path) -> None:
    if not path.is_dir():
        raise EncoderFormatError(
            f"encoder folder {path} does not exist; create one with `pathdino export CHECKPOINT --out {path}`")
    missing = [name for name in (CONFIG_FILE, WEIGHTS_FILE) if not (path / name).is_file()]
    if missing:
        raise EncoderFormatError(
            f"encoder folder {path} is missing {', '.join(missing)}; an exported encoder holds {CONFIG_FILE}, "
            f"{WEIGHTS_FILE} and {CARD_FILE} (re-run `pathdino export`, or copy the whole folder)")


def read_encoder_config(path: str | Path) -> EncoderInfo:
    """Parse and check ``<path>/config.json`` (also checks that ``model.safetensors`` exists)."""
    path = Path(path).expanduser()
    _require_files(path)
    file = path / CONFIG_FILE
    try:
        cfg = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise EncoderFormatError(f"{file} is not valid JSON ({exc})") from exc
    missing = [k for k in ("architecture", "model_args", "pretrained_cfg") if not isinstance(cfg.get(k), (str, dict))]
    if missing:
        raise EncoderFormatError(f"{file} lacks {missing}: not a timm/pathdino encoder config")
    pretrained_cfg = dict(cfg["pretrained_cfg"])
    for key in ("input_size", "mean", "std"):
        if key not in pretrained_cfg:
            raise EncoderFormatError(f"{file}: pretrained_cfg has no {key!r}")
    meta = dict(cfg.get("pathdino") or {})
    version = meta.get("format_version", ENCODER_FORMAT_VERSION)
    if meta and version != ENCODER_FORMAT_VERSION:
        raise EncoderFormatError(f"{file}: pathdino encoder format version {version}; this pathdino reads "
                                 f"{ENCODER_FORMAT_VERSION}")
    return EncoderInfo(path=path, architecture=str(cfg["architecture"]), model_args=dict(cfg["model_args"]),
                       pretrained_cfg=pretrained_cfg, pathdino=meta)


@dataclass(frozen=True)
class TileTransform:
    """Tile → normalised model input: the preprocessing the encoder was trained with, as a picklable callable.

    ``transform(image)`` takes a PIL image, an RGB uint8 array (H, W, 3) or a uint8 tensor (H, W, 3) and returns a
    float32 tensor (3, input_px, input_px). Square tiles are resized to ``input_px`` (bicubic, antialiased) when
    their side differs; other images have their shorter side resized, then are centre-cropped (timm's
    ``crop_pct=1.0``). ``batch(uint8 [B, H, W, 3])`` does the same on a batch, on the batch's device (the embedding
    runner normalises on the GPU).
    """

    input_px: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __call__(self, image: Any):
        import numpy as np
        import torch

        if isinstance(image, torch.Tensor):
            array = image
        else:
            if hasattr(image, "convert"):  # PIL
                image = image.convert("RGB")
            array = torch.from_numpy(np.array(image, dtype=np.uint8, copy=True))
        if array.ndim != 3 or array.shape[-1] != 3:
            raise ValueError(f"TileTransform expects an RGB image (H, W, 3), got shape {tuple(array.shape)}")
        return self.batch(array[None])[0]

    def batch(self, tiles):
        """uint8 [B, H, W, 3] (any device) → float32 [B, 3, input_px, input_px], normalised."""
        import torch
        import torch.nn.functional as F

        if tiles.dtype != torch.uint8 or tiles.ndim != 4 or tiles.shape[-1] != 3:
            raise ValueError(f"TileTransform.batch expects uint8 [B, H, W, 3], got {tiles.dtype} {tuple(tiles.shape)}")
        x = tiles.permute(0, 3, 1, 2).float().div_(255.0)
        h, w = x.shape[-2:]
        if (h, w) != (self.input_px, self.input_px):
            scale = self.input_px / min(h, w)
            size = (max(self.input_px, round(h * scale)), max(self.input_px, round(w * scale)))
            x = F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False).clamp_(0.0, 1.0)
            top, left = (size[0] - self.input_px) // 2, (size[1] - self.input_px) // 2
            x = x[..., top:top + self.input_px, left:left + self.input_px]
        mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        return x.sub_(mean).div_(std).contiguous()


def encoder_transform(info: EncoderInfo) -> TileTransform:
    """The preprocessing recorded in an encoder's config.json."""
    return TileTransform(input_px=info.input_px, mean=info.mean, std=info.std)


def load_encoder(path: str | Path, device: str | None = None):
    """Load an exported encoder folder; returns ``(model, transform)``.

    ``model`` is a plain timm ``VisionTransformer`` in eval mode built with ``timm.create_model(architecture,
    pretrained=True, pretrained_cfg_overlay=dict(file=...), **model_args)`` (offline); ``model(x)`` gives the CLS
    embedding [B, D] and ``model.forward_features(x)`` all tokens. ``transform`` is a :class:`TileTransform`.
    ``model.pathdino_info`` records the folder and the encoder's tile size and µm/px (evaluation reports show it).
    """
    import timm

    info = read_encoder_config(path)
    try:
        model = timm.create_model(info.architecture, pretrained=True, pretrained_cfg_overlay=info.timm_overlay(),
                                  **info.model_args)
    except RuntimeError as exc:  # shape or key mismatch between config.json and model.safetensors
        raise EncoderFormatError(
            f"{info.path / WEIGHTS_FILE} does not fit {info.path / CONFIG_FILE} ({exc}); the two files must come "
            "from the same export") from exc
    model.eval()
    if device is not None:
        model.to(device)
    model.pathdino_info = {
        "encoder_dir": str(info.path), "architecture": info.architecture, "tile_px": info.tile_px,
        "target_mpp": info.target_mpp, "weights_sha256": info.weights_sha256,
        "training_step": info.pathdino.get("training", {}).get("step"),
    }
    return model, encoder_transform(info)
