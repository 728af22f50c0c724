"""Load an exported tile encoder: ``load_encoder(dir) -> (model, transform)``.

An encoder folder (written by ``pathdino export``, layout in docs/export-embed-eval.md) holds ``config.json`` (timm's
hub format: ``architecture``, ``model_args``, ``pretrained_cfg``, plus a ``pathdino`` section with the tile size and
µm/px the encoder was trained at), ``model.safetensors`` and a model card ``README.md``. The model is rebuilt by
plain timm, offline, so anything loaded here also loads without pathdino.

Third-party encoders kept in the same hub layout (UNI, UNI2-h, Virchow2, H-optimus, Prov-GigaPath, ...: a
``config.json`` without a ``pathdino`` section, and ``model.safetensors`` or ``pytorch_model.bin``, the latter read
with ``torch.load(weights_only=True)``) load too; ``known_encoders.py`` supplies what their configs leave out.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pathdino.data.tile_transform import TileTransform
from tiling.errors import PathdinoError
from tiling.fsio import read_json, safetensors_problem

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TORCH_WEIGHTS_FILE = "pytorch_model.bin"  # third-party folders only; never pickled objects (weights_only=True)
CARD_FILE = "README.md"
ENCODER_FORMAT = "pathdino-encoder"
ENCODER_FORMAT_VERSION = 1


class EncoderFormatError(PathdinoError, ValueError):
    """An encoder folder is missing a file or its config.json is not what ``pathdino export`` writes."""


@dataclass(frozen=True)
class EncoderInfo:
    """What ``config.json`` says about an exported encoder."""

    path: Path
    architecture: str  # timm model name, e.g. "vit_small_patch14_reg4_dinov2"
    model_args: dict[str, Any]  # kwargs for timm.create_model that rebuild the exact backbone
    pretrained_cfg: dict[str, Any]  # timm pretrained_cfg: input_size, mean, std, interpolation, crop_pct, ...
    pathdino: dict[str, Any]  # tile_px, target_mpp, training provenance, export checks
    weights_file: str = WEIGHTS_FILE  # model.safetensors, or pytorch_model.bin (third-party folders)
    known: Any = None  # the known_encoders.KnownEncoder entry a third-party folder matched (None: pathdino / unknown)

    @property
    def third_party(self) -> bool:
        """True for a hub-style folder not written by ``pathdino export``."""
        return "format" not in self.pathdino

    @property
    def weights_path(self) -> Path:
        return self.path / self.weights_file

    @property
    def recipe(self) -> str:
        """How a tile embedding is made from the tokens: ``cls``, ``cls+mean_patch`` or ``mean_patch``."""
        return str(self.pathdino.get("recipe", "cls"))

    @property
    def trained_mpps(self) -> tuple[float, ...]:
        """µm/px values the encoder was trained at (several for multi-magnification encoders; empty: unknown)."""
        if self.target_mpp is not None:
            return (self.target_mpp,)
        return tuple(float(v) for v in self.pathdino.get("trained_mpps", ()))

    @property
    def name(self) -> str:
        return str(self.pathdino.get("known_encoder") or self.path.name)

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
        """Width of the tokens (a ``cls+mean_patch`` tile embedding is twice this)."""
        if "embed_dim" in self.model_args:
            return int(self.model_args["embed_dim"])
        return int(self.pathdino["embed_dim"])  # third-party: measured when the config was read

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
        overlay.update(file=str(self.weights_path), url="", hf_hub_id="", architecture=self.architecture)
        return overlay


def _require_files(path: Path, cfg_exists: bool = True) -> None:
    if not path.is_dir():
        raise EncoderFormatError(
            f"encoder folder {path} does not exist; create one with `pathdino export CHECKPOINT --out {path}`"
        )
    missing = [name for name in (CONFIG_FILE,) if not (path / name).is_file()]
    if not (path / WEIGHTS_FILE).is_file() and not (path / TORCH_WEIGHTS_FILE).is_file():
        missing.append(f"{WEIGHTS_FILE} (or {TORCH_WEIGHTS_FILE})")
    if missing:
        raise EncoderFormatError(
            f"encoder folder {path} is missing {', '.join(missing)}; an exported encoder holds {CONFIG_FILE}, "
            f"{WEIGHTS_FILE} and {CARD_FILE} (re-run `pathdino export`, or copy the whole folder); a third-party "
            f"encoder needs its hub files: {CONFIG_FILE} and {WEIGHTS_FILE} or {TORCH_WEIGHTS_FILE}"
        )


def read_encoder_config(path: str | Path, encoder_table: str | Path | None = None) -> EncoderInfo:
    """Parse and check ``<path>/config.json`` (also checks that the weights file exists and is not truncated).

    A folder written by ``pathdino export`` is read as is. Any other timm hub-style folder is completed from the
    table of known encoders (``encoder_table``: a JSON file of extra entries, see ``known_encoders.py``).
    """
    info = _read_encoder_config(Path(path).expanduser(), encoder_table)
    weights = info.path / WEIGHTS_FILE
    problem = safetensors_problem(weights) if weights.is_file() else None
    if problem is not None:  # found before any output is created (pathdino embed) or a model is built
        raise EncoderFormatError(
            f"{weights} is damaged ({problem}); copy the encoder folder again, or re-run `pathdino export`"
        )
    return info


def _read_encoder_config(path: Path, encoder_table: str | Path | None) -> EncoderInfo:
    _require_files(path)
    file = path / CONFIG_FILE
    cfg = read_json(file, error=EncoderFormatError)
    meta = dict(cfg.get("pathdino") or {})
    if not meta:
        return _third_party_info(path, cfg, encoder_table)
    missing = [k for k in ("architecture", "model_args", "pretrained_cfg") if not isinstance(cfg.get(k), (str, dict))]
    if missing:
        raise EncoderFormatError(f"{file} lacks {missing}: not a timm/pathdino encoder config")
    if not (path / WEIGHTS_FILE).is_file():
        raise EncoderFormatError(f"encoder folder {path} is missing {WEIGHTS_FILE} (re-run `pathdino export`)")
    pretrained_cfg = dict(cfg["pretrained_cfg"])
    for key in ("input_size", "mean", "std"):
        if key not in pretrained_cfg:
            raise EncoderFormatError(f"{file}: pretrained_cfg has no {key!r}")
    version = meta.get("format_version", ENCODER_FORMAT_VERSION)
    if meta and version != ENCODER_FORMAT_VERSION:
        raise EncoderFormatError(
            f"{file}: pathdino encoder format version {version}; this pathdino reads {ENCODER_FORMAT_VERSION}"
        )
    meta.setdefault("format", ENCODER_FORMAT)
    return EncoderInfo(
        path=path,
        architecture=str(cfg["architecture"]),
        model_args=dict(cfg["model_args"]),
        pretrained_cfg=pretrained_cfg,
        pathdino=meta,
    )


def _third_party_info(path: Path, cfg: dict[str, Any], encoder_table: str | Path | None) -> EncoderInfo:
    """A hub-style folder from elsewhere: config.json completed by the known-encoder table."""
    import logging

    from pathdino.export.known_encoders import load_table, match_encoder

    file = path / CONFIG_FILE
    pretrained_cfg = dict(cfg.get("pretrained_cfg") or {})
    try:
        known = match_encoder(path, pretrained_cfg.get("hf_hub_id"), load_table(encoder_table))
    except ValueError as exc:
        raise EncoderFormatError(str(exc)) from exc
    if known is not None and not known.timm_loadable:
        raise EncoderFormatError(f"encoder folder {path} looks like {known.name}: {known.note}")
    if not isinstance(cfg.get("architecture"), str):
        hint = (
            (f" (it is a Hugging Face transformers config: 'model_type' {cfg['model_type']!r})")
            if "model_type" in cfg
            else ""
        )
        raise EncoderFormatError(
            f"{file} has no 'architecture'{hint}: pathdino loads timm hub-style folders "
            "(config.json with architecture, model_args, pretrained_cfg)"
        )
    architecture = str(cfg["architecture"])
    if known is not None and known.architectures and architecture not in known.architectures:
        logging.getLogger(__name__).warning(
            "encoder %s matched %s by name, but its architecture %s is not %s: check the folder",
            path,
            known.name,
            architecture,
            "/".join(known.architectures),
        )
    model_args = {**(known.model_args if known else {}), **dict(cfg.get("model_args") or {})}
    model_args.setdefault("num_classes", 0)
    filled = {
        "input_size": [3, known.input_px, known.input_px] if known and known.input_px else None,
        "mean": list(known.mean) if known and known.mean else None,
        "std": list(known.std) if known and known.std else None,
    }
    for key, value in filled.items():
        if key not in pretrained_cfg and value is not None:
            pretrained_cfg[key] = value
    lacking = [k for k in ("input_size", "mean", "std") if k not in pretrained_cfg]
    if lacking:
        raise EncoderFormatError(
            f"{file}: pretrained_cfg has no {lacking} and {path.name!r} is not a known encoder; add an entry with "
            "input_px/mean/std to an encoder table (--encoder-table FILE, see docs/export-embed-eval.md)"
        )
    weights = WEIGHTS_FILE if (path / WEIGHTS_FILE).is_file() else TORCH_WEIGHTS_FILE
    meta: dict[str, Any] = {
        "known_encoder": known.name if known else None,
        "recipe": known.recipe if known else "cls",
        "target_mpp": known.target_mpp if known else None,
        "trained_mpps": list(known.trained_mpps) if known else [],
        "tile_px": None,
    }
    info = EncoderInfo(
        path=path,
        architecture=architecture,
        model_args=model_args,
        pretrained_cfg=pretrained_cfg,
        pathdino=meta,
        weights_file=weights,
        known=known,
    )
    if "embed_dim" not in model_args:
        meta["embed_dim"] = int(_build_timm(info, device="meta").embed_dim)
    return info


def _build_timm(info: EncoderInfo, device: str | None = None):
    """The bare timm model of a third-party folder (random weights; ``device="meta"`` allocates nothing)."""
    import timm
    import torch

    from pathdino.export.known_encoders import resolve_layers

    try:
        args = resolve_layers(info.model_args)
    except ValueError as exc:
        raise EncoderFormatError(f"{info.path / CONFIG_FILE}: {exc}") from exc
    try:
        with torch.device(device or "cpu"):
            return timm.create_model(info.architecture, pretrained=False, **args)
    except (RuntimeError, TypeError, ValueError, AssertionError) as exc:
        raise EncoderFormatError(
            f"timm cannot build {info.architecture!r} with {info.path / CONFIG_FILE}'s model_args ({exc})"
        ) from exc


def read_weights(path: Path) -> dict[str, Any]:
    """A state dict from ``model.safetensors`` or ``pytorch_model.bin`` (``torch.load(weights_only=True)``)."""
    import torch

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - pickled objects other than tensors are refused here
        raise EncoderFormatError(
            f"{path} cannot be read with torch.load(weights_only=True) ({exc}); pathdino "
            "reads tensors only: convert it to model.safetensors"
        ) from exc
    for key in ("state_dict", "model"):  # checkpoints that wrap the weights
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    return state


def _load_third_party(info: EncoderInfo):
    model = _build_timm(info)
    state = read_weights(info.weights_path)
    missing, unexpected = model.load_state_dict(state, strict=False)
    unexpected = (
        [k for k in unexpected if not k.startswith(("head.", "fc_norm."))]
        if not getattr(model, "num_classes", 0)
        else unexpected
    )
    if missing or unexpected:
        raise EncoderFormatError(
            f"{info.weights_path} does not fit {info.architecture} built from {info.path / CONFIG_FILE} "
            f"(missing {missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
            f"{'...' if len(unexpected) > 5 else ''}); fix model_args in config.json or in an encoder table entry"
        )
    return model


def encoder_transform(info: EncoderInfo) -> TileTransform:
    """The preprocessing recorded in an encoder's config.json."""
    return TileTransform(input_px=info.input_px, mean=info.mean, std=info.std)


def load_encoder(path: str | Path | EncoderInfo, device: str | None = None):
    """Load an exported (or third-party hub-style) encoder folder; returns ``(model, transform)``.

    ``model`` is a plain timm ``VisionTransformer`` in eval mode built with ``timm.create_model(architecture,
    pretrained=True, pretrained_cfg_overlay=dict(file=...), **model_args)`` (offline); ``model(x)`` gives the CLS
    embedding [B, D] and ``model.forward_features(x)`` all tokens. ``transform`` is a :class:`TileTransform`.
    ``model.pathdino_info`` records the folder and the encoder's tile size and µm/px (evaluation reports show it).
    """
    import timm

    info = path if isinstance(path, EncoderInfo) else read_encoder_config(path)
    if info.third_party:
        model = _load_third_party(info)
    else:
        try:
            model = timm.create_model(
                info.architecture, pretrained=True, pretrained_cfg_overlay=info.timm_overlay(), **info.model_args
            )
        except RuntimeError as exc:  # shape or key mismatch between config.json and model.safetensors
            raise EncoderFormatError(
                f"{info.path / WEIGHTS_FILE} does not fit {info.path / CONFIG_FILE} ({exc}); the two files must "
                "come from the same export"
            ) from exc
    model.eval()
    if device is not None:
        model.to(device)
    model.pathdino_info = {
        "encoder_dir": str(info.path),
        "architecture": info.architecture,
        "tile_px": info.tile_px,
        "target_mpp": info.target_mpp,
        "weights_sha256": info.weights_sha256,
        "training_step": info.pathdino.get("training", {}).get("step"),
        "known_encoder": info.pathdino.get("known_encoder"),
        "recipe": info.recipe,
    }
    return model, encoder_transform(info)
