"""What third-party pathology encoders' config.json files leave out, by encoder.

A hub-style folder (``config.json`` + ``model.safetensors`` or ``pytorch_model.bin``) says how to build the timm
model, often not how to use it: which µm/px it was trained at, which tokens make a tile embedding, and sometimes
not even the layer types (Virchow's SwiGLU MLP cannot be written in JSON). An entry here fills those gaps. Entries
are matched on the folder name and the config's ``hf_hub_id`` (most specific first), then checked against the
config's architecture. Users override or extend the table with a JSON file (``--encoder-table FILE`` or
``$PATHDINO_ENCODER_TABLE``) holding a list of entries in the same shape; their entries win over these.

Sources: the public model cards and TRIDENT's encoder definitions (facts only).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from tiling.fsio import read_json

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HOPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
HOPTIMUS_STD = (0.211883, 0.230117, 0.177517)
RECIPES = ("cls", "cls+mean_patch", "mean_patch")
TABLE_ENV = "PATHDINO_ENCODER_TABLE"

# Layer classes that model cards pass to timm.create_model as Python objects; config.json files spell them as
# strings. Only these names are resolved (nothing is imported by name from a file).
_LAYERS = {
    "SwiGLUPacked": ("timm.layers", "SwiGLUPacked"),
    "timm.layers.SwiGLUPacked": ("timm.layers", "SwiGLUPacked"),
    "SwiGLU": ("timm.layers", "SwiGLU"),
    "timm.layers.SwiGLU": ("timm.layers", "SwiGLU"),
    "SiLU": ("torch.nn", "SiLU"),
    "torch.nn.SiLU": ("torch.nn", "SiLU"),
    "GELU": ("torch.nn", "GELU"),
    "torch.nn.GELU": ("torch.nn", "GELU"),
}


@dataclass(frozen=True)
class KnownEncoder:
    """One encoder's facts. ``patterns`` are regexes searched in the lower-cased folder name and hf_hub_id."""

    name: str
    patterns: tuple[str, ...]
    architectures: tuple[str, ...] = ()  # timm names it ships as; a different one is a warning, not a match
    input_px: int | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    target_mpp: float | None = None  # µm/px of its training tiles; None: unknown or several
    trained_mpps: tuple[float, ...] = ()  # several magnifications: any of these is accepted
    recipe: str = "cls"  # tile embedding: cls | cls+mean_patch | mean_patch (registers never included)
    model_args: dict[str, Any] = field(default_factory=dict)  # added to config.json's model_args (config wins)
    timm_loadable: bool = True  # False: a transformers model; named here only to explain the error
    note: str = ""

    def __post_init__(self) -> None:
        if self.recipe not in RECIPES:
            raise ValueError(f"encoder table entry {self.name!r}: recipe {self.recipe!r} is not one of {RECIPES}")


_SWIGLU = {"mlp_layer": "SwiGLUPacked", "act_layer": "SiLU"}
# H-optimus-0 and -1 share their architecture (only their weights differ); read only: load.py copies it.
_HOPTIMUS_ARGS = {
    "img_size": 224,
    "init_values": 1e-5,
    "num_classes": 0,
    "global_pool": "token",
    "dynamic_img_size": False,
}

KNOWN_ENCODERS: tuple[KnownEncoder, ...] = (
    KnownEncoder(
        "UNI2-h",
        (r"uni[-_]?2", r"uni[-_]?v2"),
        ("vit_giant_patch14_224",),
        224,
        IMAGENET_MEAN,
        IMAGENET_STD,
        0.5,
        recipe="cls",
        model_args={
            "img_size": 224,
            "patch_size": 14,
            "depth": 24,
            "num_heads": 24,
            "init_values": 1e-5,
            "embed_dim": 1536,
            "mlp_ratio": 2.66667 * 2,
            "num_classes": 0,
            "no_embed_class": True,
            "reg_tokens": 8,
            "dynamic_img_size": True,
            **_SWIGLU,
        },
    ),
    KnownEncoder(
        "UNI",
        (r"(^|[^a-z])uni($|[^a-z0-9])", r"mahmoodlab/uni$"),
        ("vit_large_patch16_224",),
        224,
        IMAGENET_MEAN,
        IMAGENET_STD,
        0.5,
        recipe="cls",
        model_args={"init_values": 1e-5, "num_classes": 0, "dynamic_img_size": True},
    ),
    KnownEncoder(
        "Virchow2",
        (r"virchow[-_]?2",),
        ("vit_huge_patch14_224",),
        224,
        IMAGENET_MEAN,
        IMAGENET_STD,
        None,
        trained_mpps=(2.0, 1.0, 0.5, 0.25),
        recipe="cls+mean_patch",
        model_args={
            "img_size": 224,
            "init_values": 1e-5,
            "num_classes": 0,
            "reg_tokens": 4,
            "mlp_ratio": 5.3375,
            "global_pool": "",
            "dynamic_img_size": True,
            **_SWIGLU,
        },
        note="trained at 5x-40x; embedding = CLS ++ mean of patch tokens (4 registers excluded)",
    ),
    KnownEncoder(
        "Virchow",
        (r"virchow",),
        ("vit_huge_patch14_224",),
        224,
        IMAGENET_MEAN,
        IMAGENET_STD,
        0.5,
        recipe="cls+mean_patch",
        model_args={
            "img_size": 224,
            "init_values": 1e-5,
            "num_classes": 0,
            "mlp_ratio": 5.3375,
            "global_pool": "",
            "dynamic_img_size": True,
            **_SWIGLU,
        },
    ),
    KnownEncoder(
        "H-optimus-1",
        (r"h[-_]?optimus[-_]?1",),
        ("vit_giant_patch14_reg4_dinov2",),
        224,
        HOPTIMUS_MEAN,
        HOPTIMUS_STD,
        0.5,
        recipe="cls",
        model_args=_HOPTIMUS_ARGS,
    ),
    KnownEncoder(
        "H-optimus-0",
        (r"h[-_]?optimus[-_]?0",),
        ("vit_giant_patch14_reg4_dinov2",),
        224,
        HOPTIMUS_MEAN,
        HOPTIMUS_STD,
        0.5,
        recipe="cls",
        model_args=_HOPTIMUS_ARGS,
    ),
    KnownEncoder(
        "Prov-GigaPath",
        (r"gigapath",),
        ("vit_giant_patch14_dinov2",),
        224,
        IMAGENET_MEAN,
        IMAGENET_STD,
        0.5,
        recipe="cls",
        model_args={
            "img_size": 224,
            "in_chans": 3,
            "patch_size": 16,
            "embed_dim": 1536,
            "depth": 40,
            "num_heads": 24,
            "mlp_ratio": 5.33334,
            "num_classes": 0,
        },
        note="the model card resizes to 256 then centre-crops 224; pathdino resizes the tile to 224",
    ),
    KnownEncoder(
        "Hibou",
        (r"hibou",),
        timm_loadable=False,
        note="a transformers model (trust_remote_code), not timm: convert it to a timm ViT first",
    ),
    KnownEncoder(
        "Phikon",
        (r"phikon",),
        timm_loadable=False,
        note="a transformers ViT/DINOv2 model, not timm: convert it to a timm ViT first",
    ),
)


def _as_tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def entry_from_dict(raw: dict[str, Any], where: str) -> KnownEncoder:
    """A table entry from JSON (user overrides); names the file and the bad key."""
    known = {f.name for f in fields(KnownEncoder)}
    unknown = sorted(set(raw) - known)
    if unknown or "name" not in raw or "patterns" not in raw:
        raise ValueError(
            f"{where}: encoder table entry {raw.get('name', '?')!r} needs 'name' and 'patterns'"
            + (f"; unknown keys {unknown} (allowed: {sorted(known)})" if unknown else "")
        )
    return KnownEncoder(**{k: _as_tuple(v) for k, v in raw.items()})


def load_table(extra: str | Path | None = None) -> tuple[KnownEncoder, ...]:
    """User entries (``extra`` or ``$PATHDINO_ENCODER_TABLE``, a JSON list) first, then the built-in table."""
    source = extra or os.environ.get(TABLE_ENV)
    if not source:
        return KNOWN_ENCODERS
    path = Path(source).expanduser()
    raw = read_json(path, error=ValueError, expect=list, hint="the encoder table is a JSON list of entries")
    return tuple(entry_from_dict(e, str(path)) for e in raw) + KNOWN_ENCODERS


def match_encoder(folder: Path, hf_hub_id: str | None, table: tuple[KnownEncoder, ...]) -> KnownEncoder | None:
    """The first entry whose pattern occurs in the folder name or the hub id (lower-cased)."""
    names = [folder.name.lower()] + ([hf_hub_id.lower()] if hf_hub_id else [])
    for entry in table:
        if any(re.search(p, n) for p in entry.patterns for n in names):
            return entry
    return None


def resolve_layers(model_args: dict[str, Any]) -> dict[str, Any]:
    """Replace the layer names of ``_LAYERS`` by their classes; any other string for a ``*_layer`` key is an error."""
    import importlib

    out = dict(model_args)
    for key, value in model_args.items():
        if key.endswith("_layer") and isinstance(value, str):
            if value not in _LAYERS:
                raise ValueError(f"model_args[{key!r}] = {value!r}: pathdino builds only {sorted(_LAYERS)} from a name")
            module, attr = _LAYERS[value]
            out[key] = getattr(importlib.import_module(module), attr)
    return out
