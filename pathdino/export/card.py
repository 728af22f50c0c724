"""The model card (README.md) of an exported encoder, generated from its config.json.

Hugging Face model-card layout: YAML front matter (``library_name: timm`` lets the hub show timm's loading
snippet), then what the model is, what input it expects (tile size, µm/px, normalisation), how to load it with and
without pathdino, and where it came from.
"""

from __future__ import annotations

import json
from typing import Any


def _fmt(value: Any, unit: str = "") -> str:
    return "unknown" if value is None else f"{value}{unit}"


def model_card(config: dict[str, Any], model_name: str) -> str:
    """Markdown model card for an encoder folder whose config.json is ``config``."""
    pcfg = config["pretrained_cfg"]
    front = [
        "---",
        "library_name: timm",
        f"license: {pcfg.get('license', 'other')}",
        "pipeline_tag: image-feature-extraction",
        "tags:",
        *[
            f"- {t}"
            for t in (
                "image-feature-extraction",
                "timm",
                "pathdino",
                "dinov2",
                "histopathology",
                "computational-pathology",
            )
        ],
        "---",
    ]
    return "\n".join(front) + _intro(config, model_name) + _use(config) + _provenance(config)


def _intro(config: dict[str, Any], model_name: str) -> str:
    meta, pcfg = config.get("pathdino", {}), config["pretrained_cfg"]
    tile_px, mpp, eff = meta.get("tile_px"), meta.get("target_mpp"), meta.get("effective_mpp_range")
    arch, args = config["architecture"], config["model_args"]
    return f"""

# {model_name}

A tile encoder for H&E histopathology, pretrained with the DINOv2 objective (DINO + iBOT + KoLeo) with
pathdino and exported from the EMA teacher. It is a plain timm `{arch}`
(ViT, patch {args.get("patch_size")}, width {args.get("embed_dim")}, depth {args.get("depth")},
{args.get("num_heads")} heads, {args.get("reg_tokens", 0)} register tokens) with no classifier: the output is the
CLS embedding ({config.get("num_features")} values per tile).

## Input

| | |
|---|---|
| tile size | {_fmt(tile_px, " px")} (the tiles it was trained on) |
| resolution | {_fmt(mpp, " µm/px")} (effective µm/px of training tiles: {_fmt(eff)}) |
| model input | {pcfg["input_size"][-1]} × {pcfg["input_size"][-1]} px; tiles of another size are resized (bicubic) |
| normalisation | mean {pcfg["mean"]}, std {pcfg["std"]} |

Embed tiles cut at the same µm/px: the encoder has only seen that field of view (`pathdino embed` refuses
stores more than 5% off unless `--force`).

"""


def _use(config: dict[str, Any]) -> str:
    args = config["model_args"]
    return f"""## Use

With pathdino:

```python
import pathdino
model, transform = pathdino.load_encoder("path/to/this/folder")
embedding = model(transform(tile)[None])  # tile: PIL image or RGB uint8 array -> [1, {config.get("num_features")}]
```

With timm only (offline):

```python
import json, timm
folder = "path/to/this/folder"
cfg = json.load(open(f"{{folder}}/config.json"))
overlay = dict(cfg["pretrained_cfg"], file=f"{{folder}}/model.safetensors", url="", hf_hub_id="")
overlay = {{k: tuple(v) if isinstance(v, list) else v for k, v in overlay.items()}}
model = timm.create_model(cfg["architecture"], pretrained=True, pretrained_cfg_overlay=overlay,
                          **cfg["model_args"]).eval()
# or simply: timm.create_model("local-dir:" + folder, pretrained=True)
data_cfg = timm.data.resolve_data_config(model=model)   # input size, mean/std from this folder
```

Once uploaded to the Hugging Face hub: `timm.create_model("hf-hub:<user>/<repo>", pretrained=True)`.
`model.forward_features(x)` returns all tokens: CLS, then {args.get("reg_tokens", 0)} registers, then the patch
tokens (row-major).

Slide-level use: `pathdino embed STORE --encoder FOLDER --out EMB --format h5` writes CLAM/TRIDENT-style
per-slide HDF5 files (`features`, `coords`) for ABMIL and other slide models.

"""


def _provenance(config: dict[str, Any]) -> str:
    meta = config.get("pathdino", {})
    training, export, bb = meta.get("training", {}), meta.get("export", {}), meta.get("backbone_config", {})
    check, args = export.get("check", {}), config["model_args"]
    notes = "".join(f"- {n}\n" for n in meta.get("notes", []))
    return f"""## Training

| | |
|---|---|
| checkpoint | `{training.get("checkpoint", "unknown")}` |
| step | {_fmt(training.get("step"))} |
| tile stores | {", ".join(f"`{s}`" for s in training.get("stores", [])) or "unknown"} |
| drop path (training only) | {bb.get("drop_path_rate", "unknown")} |

The full resolved training configuration is in `config.json` under `pathdino.training.config`.

{notes and "### Notes" + chr(10) + chr(10) + notes}
## Export

Exported by pathdino {export.get("pathdino_version")} (timm {export.get("timm_version")}, torch
{export.get("torch_version")}) on {export.get("created")}. Check: the folder was reloaded with plain timm and its
weights, and its CLS and patch tokens at two input sizes, compared with the checkpoint's: largest difference
{check.get("max_abs_diff", "not checked")}. `model.safetensors` SHA-256: `{export.get("weights_sha256")}`.

<details><summary>timm model_args</summary>

```json
{json.dumps(args, indent=2)}
```

</details>
"""
