"""Read what an export needs from a training checkpoint: the teacher backbone, its config and the data it saw.

The trainer's layout (pathdino/train/checkpoint.py): ``<run>/checkpoints/step_<N>/`` with ``teacher.safetensors``
(keys ``backbone.backbone.*`` for the timm ViT inside the mask-token wrapper, ``backbone.mask_token``,
``dino_head.*``, ...) and ``trainer_state.json`` (``step`` and the resolved ``config``: ``model.backbone``,
``augment``, ``data.stores``). This module only reads files (safetensors and JSON, never pickle) and looks up
config sections defensively, so a reordered config still exports.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from pathdino.data.config import IMAGENET_MEAN, IMAGENET_STD  # augment defaults, for configs without that section
from tiling.errors import PathdinoError
from tiling.fsio import read_json, safetensors_problem

TEACHER_FILE = "teacher.safetensors"
STATE_FILE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")
# Tried in order; the first under which the ViT's own keys appear wins. The trainer writes the first.
_BACKBONE_PREFIXES = (
    "backbone.backbone.",
    "teacher.backbone.backbone.",
    "teacher.backbone.",
    "backbone.",
    "model.backbone.",
    "",
)
_TRAINER_ONLY = ("mask_token",)
_WRAPPER = re.compile(r"(^|\.)(?:module|_orig_mod)\.")
_MAX_SLIDES_CHECKED = 64
log = logging.getLogger(__name__)


class ExportError(PathdinoError, ValueError):
    """A checkpoint cannot be exported (missing teacher, unknown config) or the export failed its check."""


@dataclass(frozen=True)
class TrainingGeometry:
    """What the encoder was trained on: tile size, µm/px, normalisation (None where unknown)."""

    tile_px: int | None
    target_mpp: float | None
    effective_mpp_range: tuple[float, float] | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    stores: tuple[str, ...]
    notes: tuple[str, ...]  # why a value is unknown, stores that could not be read, mixed resolutions


def resolve_checkpoint_dir(path: str | Path, pick: str = "latest") -> Path:
    """A checkpoint folder: ``path`` itself when it is one (a ``step_*`` or ``best`` folder), else, in a run folder
    or its ``checkpoints/``, the one ``pick`` names: ``latest`` (the newest complete ``step_*``), ``best`` (the
    checkpoint of the best in-training probe score, kept with ``eval.probe.keep_best``) or a step number."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ExportError(f"checkpoint {path} does not exist; pass a step_* folder or a training output folder")
    if path.is_file():
        raise ExportError(f"checkpoint {path} is a file; pass its folder (it holds {TEACHER_FILE} and {STATE_FILE})")
    if (path / STATE_FILE).is_file() or (path / TEACHER_FILE).is_file():
        if pick != "latest":
            raise ExportError(
                f"--checkpoint {pick}: {path} is a checkpoint folder already; pass the run folder to "
                f"pick one of its checkpoints, or leave --checkpoint out"
            )
        return path
    roots = [r for r in (path / "checkpoints", path) if r.is_dir()]
    if pick == "best":
        for root in roots:
            if (root / "best" / STATE_FILE).is_file():
                return root / "best"
        raise ExportError(
            f"{path} holds no best checkpoint (checkpoints/best): the run kept none; train with "
            "eval.probe.keep_best=true, or export --checkpoint latest / a step number"
        )
    if pick != "latest" and not pick.isdigit():
        raise ExportError(f"--checkpoint {pick!r}: expected latest, best or a step number")
    for root in roots:
        steps = sorted(
            (
                (int(m.group(1)), child)
                for child in root.iterdir()
                if child.is_dir() and (m := _STEP_DIR.match(child.name)) and (child / STATE_FILE).is_file()
            ),
            key=lambda t: t[0],
        )
        if steps and pick != "latest":
            chosen = [child for step, child in steps if step == int(pick)]
            if chosen:
                return chosen[0]
            raise ExportError(
                f"{path} has no complete checkpoint of step {pick} (it has steps "
                f"{', '.join(str(s) for s, _ in steps)}, and best when kept)"
            )
        damaged = []
        for _, step_dir in reversed(steps):  # the newest whose teacher weights are whole
            problem = safetensors_problem(step_dir / TEACHER_FILE) if (step_dir / TEACHER_FILE).is_file() else None
            if problem is None:
                if damaged:
                    log.warning("%s; exporting the newest complete checkpoint, %s", "; ".join(damaged), step_dir.name)
                return step_dir
            damaged.append(f"{step_dir / TEACHER_FILE} is damaged ({problem})")
        if damaged:
            raise ExportError(f"every checkpoint under {root} is damaged: {'; '.join(damaged[:3])}")
    raise ExportError(f"{path} holds no complete checkpoint (no {STATE_FILE} in it, nor in checkpoints/step_*/)")


def read_trainer_state(ckpt_dir: Path) -> dict[str, Any]:
    file = ckpt_dir / STATE_FILE
    if not file.is_file():
        raise ExportError(
            f"checkpoint {ckpt_dir} has no {STATE_FILE}: it is incomplete (the trainer writes it "
            "last); pick another step_* folder"
        )
    return read_json(file, error=ExportError, hint="pick another step_* folder")


def read_teacher_backbone(ckpt_dir: Path) -> tuple[dict[str, Any], list[str]]:
    """The teacher's timm-ViT tensors (names as in ``timm.create_model``) and the names that were left out."""
    from safetensors.torch import load_file

    file = ckpt_dir / TEACHER_FILE
    if not file.is_file():
        present = sorted(p.name for p in ckpt_dir.iterdir())
        raise ExportError(
            f"checkpoint {ckpt_dir} has no teacher weights ({TEACHER_FILE}; found {present}); only "
            "the EMA teacher is exported: pass a checkpoint written by `pathdino.train`"
        )
    problem = safetensors_problem(file)
    if problem is not None:
        raise ExportError(
            f"{file} is damaged ({problem}); export another step_* folder, or the run folder (its "
            "newest complete checkpoint is used)"
        )
    state = load_file(str(file), device="cpu")
    # DDP ("module.") and torch.compile ("_orig_mod.") wrappers add name components that timm does not know.
    state = {_WRAPPER.sub(r"\1", k): v for k, v in state.items()}
    for prefix in _BACKBONE_PREFIXES:
        picked = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if "cls_token" in picked and "patch_embed.proj.weight" in picked:
            kept = {k: v for k, v in picked.items() if k not in _TRAINER_ONLY}
            return kept, sorted(set(state) - {prefix + k for k in kept})
    raise ExportError(
        f"{file} holds no ViT backbone (no cls_token / patch_embed.proj.weight under any of "
        f"{list(_BACKBONE_PREFIXES[:-1])}); keys start with {sorted({k.split('.')[0] for k in state})}"
    )


def find_section(config: Any, name: str, marker: str) -> dict[str, Any] | None:
    """The first mapping stored under key ``name`` (depth-first) that has key ``marker``; None if there is none."""
    if not isinstance(config, Mapping):
        return None
    value = config.get(name)
    if isinstance(value, Mapping) and marker in value:
        return dict(value)
    for child in config.values():
        found = find_section(child, name, marker)
        if found is not None:
            return found
    return None


def backbone_config_from(config: dict[str, Any], where: str):
    """The ``BackboneConfig`` in a resolved training config (``model.backbone``)."""
    from pathdino.models import BackboneConfig

    section = find_section(config, "backbone", "arch")
    if section is None:
        raise ExportError(
            f"{where}: the resolved config has no model.backbone section (with 'arch'); cannot tell "
            "which ViT the teacher weights belong to"
        )
    known = {f.name for f in fields(BackboneConfig)}
    unknown = sorted(set(section) - known)
    if unknown:
        raise ExportError(f"{where}: model.backbone has keys this pathdino does not know: {unknown}")
    try:
        return BackboneConfig(**section)
    except (TypeError, ValueError) as exc:
        raise ExportError(f"{where}: model.backbone is invalid ({exc})") from exc


def _store_resolution(url: str) -> tuple[set[int], set[float], list[float]]:
    """Tile sizes, target µm/px and effective µm/px of (up to 64 of) a store's slides."""
    from tiling.store import TileStore

    store = TileStore(url)
    ids = store.slide_ids
    if len(ids) > _MAX_SLIDES_CHECKED:  # spread the sample over the store; opening each slide costs a few ms
        step = len(ids) / _MAX_SLIDES_CHECKED
        ids = [ids[int(i * step)] for i in range(_MAX_SLIDES_CHECKED)]
    tile_px, target, effective = set(), set(), []
    for sid in ids:
        slide = store.slide(sid)
        tile_px.add(int(slide.tile_px))
        if slide.attrs.get("target_mpp") is not None:
            target.add(round(float(slide.attrs["target_mpp"]), 6))
        if slide.attrs.get("effective_mpp") is not None:
            effective.append(float(slide.attrs["effective_mpp"]))
    return tile_px, target, effective


def training_cwd(ckpt_dir: Path, config: dict[str, Any]) -> Path | None:
    """The working directory training ran in, when ``train.output_dir`` was relative (``<cwd>/<output_dir>/
    checkpoints/step_N``): relative store paths in the config are relative to it."""
    output_dir = (find_section(config, "train", "output_dir") or {}).get("output_dir")
    if not output_dir or Path(output_dir).is_absolute():
        return None
    run_dir = ckpt_dir.resolve().parent.parent
    parts = len(Path(output_dir).parts)
    return run_dir.parents[parts - 1] if len(run_dir.parents) >= parts else None


def _locate(url: str, base: Path | None) -> str:
    if "://" in url or Path(url).is_absolute() or base is None or Path(url).exists():
        return url
    return str(base / url) if (base / url).exists() else url


def training_geometry(
    config: dict[str, Any], *, tile_px: int | None = None, target_mpp: float | None = None, base_dir: Path | None = None
) -> TrainingGeometry:
    """Tile size and µm/px from the training stores (explicit values win), mean/std from the augment section.

    Relative store paths are looked up in the current directory, then under ``base_dir`` (see ``training_cwd``).
    """
    augment = find_section(config, "augment", "mean") or {}
    mean = tuple(float(v) for v in augment.get("mean", IMAGENET_MEAN))
    std = tuple(float(v) for v in augment.get("std", IMAGENET_STD))
    data = find_section(config, "data", "stores") or {}
    stores = data.get("stores") or []
    stores = (stores,) if isinstance(stores, str) else tuple(str(s) for s in stores)
    notes: list[str] = []
    sizes: set[int] = set()
    targets: set[float] = set()
    effective: list[float] = []
    if tile_px is None or target_mpp is None:
        for url in stores:
            try:
                s, t, e = _store_resolution(_locate(url, base_dir))
            except Exception as exc:  # noqa: BLE001 - a store moved since training must not block the export
                notes.append(f"training store {url} could not be read ({type(exc).__name__}: {exc})")
                continue
            sizes |= s
            targets |= t
            effective += e
        if not stores:
            notes.append("the training config names no tile stores")
    if tile_px is None:
        if len(sizes) == 1:
            tile_px = sizes.pop()
        elif sizes:
            notes.append(f"training stores mix tile sizes {sorted(sizes)}: tile_px left unset")
    if target_mpp is None:
        if len(targets) == 1:
            target_mpp = targets.pop()
        elif targets:
            notes.append(f"training stores mix resolutions {sorted(targets)} µm/px: target_mpp left unset")
    if tile_px is None or target_mpp is None:
        notes.append("pass --tile-px / --mpp to `pathdino export` to record them; `pathdino embed` checks them")
    mpp_range = (min(effective), max(effective)) if effective else None
    return TrainingGeometry(
        tile_px=tile_px,
        target_mpp=target_mpp,
        effective_mpp_range=mpp_range,
        mean=mean,
        std=std,
        stores=stores,
        notes=tuple(notes),
    )  # type: ignore[arg-type]
