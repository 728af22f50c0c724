"""One call that evaluates a frozen tile encoder on a labelled tile dataset and writes a JSON report.

``run_eval`` extracts features once per split, then runs any of ``knn``, ``linear``, ``fewshot`` and
``diagnostics``. Scores are reported on the test split, or on the validation split when there is no test split
(``eval_split`` in the report says which). The random-weights baseline every pretrained encoder should beat is
``random_baseline_encoder(arch, img_size)`` with ``eval_transform(img_size)``.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pathdino.data.config import IMAGENET_MEAN, IMAGENET_STD
from pathdino.eval.datasets import DatasetError, TileDataset, TileDatasetSpec, TileRecord, load_tile_dataset
from pathdino.eval.diagnostics import DEFAULT_MAX_ITEMS, diagnose
from pathdino.eval.features import extract_features
from pathdino.eval.fewshot import DEFAULT_SEEDS, DEFAULT_SHOTS, fewshot_evaluate
from pathdino.eval.knn import DEFAULT_K, DEFAULT_TEMPERATURE, knn_evaluate
from pathdino.eval.linear import DEFAULT_L2_GRID, linear_probe_evaluate
from tiling.configio import ConfigError
from tiling.fsio import atomic_write_json, now_iso, to_jsonable

METHODS = ("knn", "linear", "fewshot", "diagnostics")
REPORT_SCHEMA = "pathdino.eval/1"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalOptions:
    """Knobs of :func:`run_eval`; the defaults follow DINOv2/UNI-style evaluation."""

    batch_size: int = 64  # tiles per encoder forward
    device: str | None = None  # None: "cuda" when available, else "cpu"
    num_workers: int = 0  # DataLoader workers decoding images
    progress: bool = True  # rich progress bars during feature extraction
    knn_ks: tuple[int, ...] = (DEFAULT_K,)  # k values for kNN (20 is the DINOv2 default)
    knn_temperature: float = DEFAULT_TEMPERATURE  # vote weight exp(sim / T)
    l2_grid: tuple[float, ...] = DEFAULT_L2_GRID  # linear-probe L2 strengths swept on val (or train CV)
    fewshot_shots: tuple[int, ...] = DEFAULT_SHOTS  # labelled tiles per class; values above the rarest class skip
    fewshot_seeds: int = DEFAULT_SEEDS  # support draws per shot count
    fewshot_method: str = "simpleshot"  # "simpleshot" or "linear"
    diagnostics_max_tiles: int = DEFAULT_MAX_ITEMS  # RankMe/uniformity on at most this many eval-split tiles
    alignment_max_tiles: int = 512  # tiles embedded twice more (two augmented views) for alignment; 0 skips it
    seed: int = 0  # seeds subsampling, few-shot draws, CV folds and view augmentation
    # Image files that cannot be read are skipped with a warning (counted in the report) until more than this
    # share of the dataset's images is unreadable; then the evaluation stops (a broken copy, not a bad file).
    max_unreadable_fraction: float = 0.05

    def __post_init__(self) -> None:
        if self.fewshot_method not in ("simpleshot", "linear"):
            raise ValueError(
                f"EvalOptions.fewshot_method must be 'simpleshot' or 'linear', got {self.fewshot_method!r}"
            )
        if self.batch_size < 1:
            raise ValueError(f"EvalOptions.batch_size must be >= 1, got {self.batch_size}")
        if not 0.0 <= self.max_unreadable_fraction <= 1.0:
            raise ConfigError(
                f"EvalOptions.max_unreadable_fraction={self.max_unreadable_fraction} (--max-unreadable)"
                " must be in [0, 1]"
            )


def eval_resize(img_size: int) -> Callable[[object], object]:
    """Resize the shorter side of a PIL image to ``img_size`` (bicubic), centre-crop ``img_size``."""
    from torchvision import transforms as T

    return T.Compose(
        [
            T.Resize(img_size, interpolation=T.InterpolationMode.BICUBIC, antialias=True),
            T.CenterCrop(img_size),
        ]
    )


def eval_uint8_transform(img_size: int) -> Callable[[object], torch.Tensor]:
    """``eval_resize``, as a uint8 tensor [3, H, W] (``eval_transform`` before ToTensor's /255 and Normalize)."""
    from torchvision import transforms as T

    return T.Compose([eval_resize(img_size), T.PILToTensor()])


def eval_transform(
    img_size: int, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> Callable[[object], torch.Tensor]:
    """``eval_resize``, to a float tensor in [0, 1], normalise."""
    from torchvision import transforms as T

    return T.Compose([eval_resize(img_size), T.ToTensor(), T.Normalize(mean=list(mean), std=list(std))])


def view_augmentation(transform: Callable[[object], torch.Tensor]) -> Callable[[object], torch.Tensor]:
    """A random tile view for alignment: crop 70-100% of the side, flips, 90° rotation, mild colour jitter,
    then ``transform``. All of these are label-preserving for histology tiles."""
    from torchvision import transforms as T

    def crop_rotate(image):
        w, h = image.size
        frac = random.uniform(0.7, 1.0)
        cw, ch = max(1, round(w * frac)), max(1, round(h * frac))
        x, y = random.randint(0, w - cw), random.randint(0, h - ch)
        image = image.crop((x, y, x + cw, y + ch))
        return image.rotate(90 * random.randint(0, 3), expand=True)

    return T.Compose(
        [
            T.Lambda(crop_rotate),
            T.RandomHorizontalFlip(),
            T.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.1, hue=0.02),
            transform,
        ]
    )


def random_baseline_encoder(arch: str = "vit_small_patch14_dinov2", img_size: int = 224, seed: int = 0) -> nn.Module:
    """A timm ``arch`` with random weights (``num_classes=0``): the floor a pretrained encoder must beat."""
    import timm

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = timm.create_model(arch, pretrained=False, num_classes=0, img_size=img_size)
    model.pathdino_info = {"weights": "random", "arch": arch, "img_size": img_size, "init_seed": seed}
    return model.eval()


def describe_encoder(encoder: nn.Module) -> dict[str, object]:
    """Class, timm architecture, embedding width, input size and parameter count, plus ``pathdino_info``."""
    info: dict[str, object] = {
        "class": f"{type(encoder).__module__}.{type(encoder).__qualname__}",
        "n_params": int(sum(p.numel() for p in encoder.parameters())),
    }
    cfg = getattr(encoder, "pretrained_cfg", None)
    if isinstance(cfg, Mapping) and cfg.get("architecture"):
        info["timm_architecture"] = cfg["architecture"]
    if getattr(encoder, "num_features", None) is not None:
        info["num_features"] = int(encoder.num_features)
    patch_embed = getattr(encoder, "patch_embed", None)
    for attr in ("img_size", "patch_size"):
        value = getattr(patch_embed, attr, None)
        if value is not None:
            info[attr] = list(value) if isinstance(value, (tuple, list)) else value
    info.update(getattr(encoder, "pathdino_info", {}) or {})
    return info


def _subset(records: Sequence[TileRecord], n_max: int, seed: int) -> list[TileRecord]:
    if len(records) <= n_max:
        return list(records)
    idx = np.sort(np.random.default_rng(seed).choice(len(records), size=n_max, replace=False))
    return [records[i] for i in idx]


def run_eval(
    encoder: nn.Module,
    transform: Callable[[object], torch.Tensor],
    dataset_spec: TileDatasetSpec | TileDataset | str | Path,
    methods: Sequence[str] = METHODS,
    out_json: str | Path | None = None,
    options: EvalOptions = EvalOptions(),
) -> dict[str, object]:
    """Evaluate ``encoder`` (frozen) on a labelled tile dataset; return the report and write it to ``out_json``.

    ``dataset_spec`` is a folder/CSV path, a :class:`TileDatasetSpec` or an already loaded :class:`TileDataset`.
    ``transform`` maps a PIL image to the encoder's input tensor (e.g. :func:`eval_transform`). The report's
    ``encoder`` entry is :func:`describe_encoder`; set ``encoder.pathdino_info = {...}`` (e.g. checkpoint path and
    step) to have it recorded. NaN metrics (e.g. AUC of a one-class split) are written as ``null``.
    """
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ConfigError(f"unknown eval method(s) {unknown} (--method); choose from {METHODS}")
    t_start = time.perf_counter()
    dataset = dataset_spec if isinstance(dataset_spec, TileDataset) else load_tile_dataset(dataset_spec)
    eval_split = "test" if dataset.records("test") else "val"
    if not dataset.records(eval_split):
        raise DatasetError(
            f"{dataset.source}: no test or validation tiles to score; add a split column/folders or use a larger "
            "dataset (the seeded split keeps at least one tile per class for training)"
        )
    device = options.device or ("cuda" if torch.cuda.is_available() else "cpu")
    n_classes = len(dataset.class_names)
    needs_train = _check_classes(dataset, methods)
    unreadable: dict[str, str] = {}  # path -> why, over every split embedded

    def embed(records: Sequence[TileRecord], tf: Callable, name: str):
        out = extract_features(
            encoder,
            tf,
            list(records),
            batch_size=options.batch_size,
            device=device,
            num_workers=options.num_workers,
            progress=options.progress,
            description=name,
            skip_unreadable=True,
        )
        _note_unreadable(
            records,
            out.paths,
            name=name,
            unreadable=unreadable,
            max_count=options.max_unreadable_fraction * sum(map(len, dataset.splits.values())),
        )
        return out

    timing: dict[str, float] = {}
    t0 = time.perf_counter()
    feats = {eval_split: embed(dataset.records(eval_split), transform, f"{eval_split} features")}
    if needs_train:
        feats["train"] = embed(dataset.records("train"), transform, "train features")
    if "linear" in methods and eval_split == "test" and dataset.records("val"):
        feats["val"] = embed(dataset.records("val"), transform, "val features")
    timing["features_s"] = time.perf_counter() - t0
    train, test = feats.get("train"), feats[eval_split]

    results, classify_timing = _classify(
        methods, train=train, test=test, val=feats.get("val"), n_classes=n_classes, options=options, device=device
    )
    timing.update(classify_timing)
    if "diagnostics" in methods:
        t0 = time.perf_counter()
        results["diagnostics"] = _diagnostics(dataset.records(eval_split), test.features, transform, embed, options)
        results["diagnostics"]["split"] = eval_split
        timing["diagnostics_s"] = time.perf_counter() - t0
    timing["total_s"] = time.perf_counter() - t_start

    report = {
        "schema": REPORT_SCHEMA,
        "created_utc": now_iso(),
        "encoder": describe_encoder(encoder),
        "dataset": dataset.summary(),
        "eval_split": eval_split,
        "feature_dim": int(test.features.shape[1]),
        "device": str(device),
        "options": asdict(options),
        "methods": results,
        "timing": timing,
        "unreadable": {"n": len(unreadable), "paths": sorted(unreadable)[:100]},
    }
    report = to_jsonable(report)
    if out_json is not None:
        atomic_write_json(out_json, report, allow_nan=False)
    return report  # type: ignore[return-value]


def _classify(
    methods: Sequence[str], *, train, test, val, n_classes: int, options: EvalOptions, device
) -> tuple[dict[str, object], dict[str, float]]:
    """The kNN, linear and few-shot scores ``methods`` ask for, and the seconds each took."""
    results: dict[str, object] = {}
    timing: dict[str, float] = {}
    if "knn" in methods:
        t0 = time.perf_counter()
        results["knn"] = knn_evaluate(
            train.features,
            train.labels,
            test.features,
            test.labels,
            n_classes=n_classes,
            ks=options.knn_ks,
            temperature=options.knn_temperature,
            device=device,
        )
        timing["knn_s"] = time.perf_counter() - t0
    if "linear" in methods:
        t0 = time.perf_counter()
        results["linear"] = linear_probe_evaluate(
            train.features,
            train.labels,
            test.features,
            test.labels,
            n_classes=n_classes,
            val_features=val.features if val is not None else None,
            val_labels=val.labels if val is not None else None,
            l2_grid=options.l2_grid,
            seed=options.seed,
            device=device,
        )
        timing["linear_s"] = time.perf_counter() - t0
    if "fewshot" in methods:
        t0 = time.perf_counter()
        results["fewshot"] = fewshot_evaluate(
            train.features,
            train.labels,
            test.features,
            test.labels,
            n_classes=n_classes,
            shots=options.fewshot_shots,
            n_seeds=options.fewshot_seeds,
            method=options.fewshot_method,
            seed=options.seed,
        )
        timing["fewshot_s"] = time.perf_counter() - t0
    return results, timing


def _check_classes(dataset: TileDataset, methods: Sequence[str]) -> bool:
    """Whether ``methods`` need the training split; DatasetError when they classify a one-class dataset (every
    score would be a meaningless 1.000)."""
    needs_train = any(m in methods for m in ("knn", "linear", "fewshot"))
    if needs_train and len(dataset.class_names) < 2:
        raise DatasetError(
            f"{dataset.source}: {len(dataset.class_names)} class ({', '.join(dataset.class_names)}); kNN, linear "
            "and few-shot classification need at least 2 classes (one sub-folder or label value per class); for a "
            "label-free report run only --method diagnostics"
        )
    return needs_train


def _note_unreadable(
    records: Sequence[TileRecord], kept: Sequence[str], *, name: str, unreadable: dict[str, str], max_count: float
) -> None:
    """Record (and warn about) the images of ``records`` that could not be read; DatasetError once more than
    ``max_count`` images of the dataset were unreadable."""
    left = set(kept)
    bad = [str(r.path) for r in records if str(r.path) not in left]
    if not bad:
        return
    why = _read_error(bad[0])
    new = [p for p in bad if p not in unreadable]
    unreadable.update(dict.fromkeys(new, why))
    if len(unreadable) > max_count:
        raise DatasetError(
            f"{len(unreadable)} images cannot be read, more than --max-unreadable allows ({max_count:g} images of "
            f"this dataset); first: {bad[0]} ({why})"
        )
    if new:
        log.warning(
            "skipped %d unreadable image(s) of %d (%s), e.g. %s (%s)", len(new), len(records), name, new[0], why
        )


def _read_error(path: str) -> str:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.convert("RGB")
    except (OSError, ValueError) as exc:
        return str(exc)
    return "unreadable"


def _diagnostics(records, features, transform, embed, options: EvalOptions) -> dict[str, object]:
    n = features.shape[0]
    idx = np.arange(n)
    if n > options.diagnostics_max_tiles:
        idx = np.sort(np.random.default_rng(options.seed).choice(n, options.diagnostics_max_tiles, replace=False))
    pairs = None
    if options.alignment_max_tiles > 0:
        subset = _subset(records, options.alignment_max_tiles, options.seed)
        augment = view_augmentation(transform)
        # Python's `random` drives the crop/rotation; seed it so reports are reproducible (workers=0).
        state = random.getstate()
        with torch.random.fork_rng(devices=[]):
            random.seed(options.seed)
            torch.manual_seed(options.seed)
            try:
                pairs = (embed(subset, augment, "view A").features, embed(subset, augment, "view B").features)
            finally:
                random.setstate(state)
    return diagnose(features[torch.as_tensor(idx)], pairs, seed=options.seed)
