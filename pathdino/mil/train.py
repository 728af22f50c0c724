"""Train and evaluate a slide-level ABMIL classifier on per-slide tile embeddings.

Inputs: a labels CSV ``slide_id,label[,split]`` and a feature source, either a mapping or a callable
``slide_id -> (features [N, D], coords [N, 2])`` (numpy or torch). :class:`H5FeatureReader` reads
CLAM/TRIDENT-style ``<slide_id>.h5`` files (datasets ``features`` [N, D] and ``coords`` [N, 2], level-0 x, y).

Without a ``split`` column a seeded stratified split is drawn. Training: AdamW, one slide per step,
class-weighted cross-entropy, early stopping on validation loss (the best epoch's weights are kept).
Outputs in ``out_dir`` (each written to a temporary file, then renamed):

- ``abmil.safetensors``: weights; metadata ``pathdino.abmil`` holds the constructor arguments and class names;
- ``attention.npz``: per-slide attention for drawing on a thumbnail (read it with :func:`load_attention`);
- ``metrics.json``: per-split balanced accuracy, macro-F1, AUC, confusion matrix, and the training history.
"""

from __future__ import annotations

import copy
import csv
import json
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Union

import numpy as np
import torch
import torch.nn.functional as F

from pathdino.eval.datasets import SPLITS, DatasetError, stratified_split
from pathdino.eval.metrics import classification_report
from pathdino.mil.abmil import ABMIL
from tiling.errors import MissingFileError, PathdinoError
from tiling.fsio import atomic_path, atomic_write_json, to_jsonable

Bag = tuple[object, object]  # (features [N, D], coords [N, 2]) as numpy arrays or tensors
FeatureSource = Union[Mapping[str, Bag], Callable[[str], Bag]]
WEIGHTS_FILE, ATTENTION_FILE, METRICS_FILE = "abmil.safetensors", "attention.npz", "metrics.json"


class MissingFeaturesError(PathdinoError, KeyError):
    """A labelled slide has no features in the feature source, or its h5 file lacks a dataset."""


@dataclass(frozen=True)
class MILConfig:
    """ABMIL training settings; the defaults train small cohorts in seconds on a CPU."""

    hidden_dim: int = 256  # width of the tile projection and the attention MLP
    dropout: float = 0.25  # on the projection and the gated attention
    lr: float = 2e-4  # AdamW learning rate (CLAM's default)
    weight_decay: float = 1e-4  # AdamW weight decay
    max_epochs: int = 50  # passes over the training slides
    patience: int = 10  # epochs without a lower validation loss before stopping
    max_tiles_per_step: int | None = None  # random subset of a bag's tiles per training step (None: all)
    class_weighted_loss: bool = True  # weight the loss by inverse class frequency (helps balanced accuracy)
    skip_missing_slides: bool = False  # drop (and list in metrics.json) slides without features instead of failing
    val_fraction: float = 0.2  # share of slides per class for validation when the CSV has no split column
    test_fraction: float = 0.2  # share for test, same condition
    seed: int = 0  # model init, dropout, slide order, tile subsets and the drawn split
    device: str = "cpu"  # "cpu" or "cuda"

    def __post_init__(self) -> None:
        if self.max_epochs < 1 or self.patience < 1:
            raise ValueError(f"MILConfig: max_epochs and patience must be >= 1, got {self.max_epochs}, {self.patience}")
        if self.max_tiles_per_step is not None and self.max_tiles_per_step < 1:
            raise ValueError(f"MILConfig.max_tiles_per_step must be >= 1 or None, got {self.max_tiles_per_step}")


@dataclass(frozen=True)
class SlideTable:
    """Slides with integer labels (indices into ``class_names``) and a split each."""

    slide_ids: tuple[str, ...]
    labels: tuple[int, ...]
    splits: tuple[str, ...]
    class_names: tuple[str, ...]
    split_origin: str  # "given" or "stratified"


@dataclass(frozen=True)
class MILResult:
    metrics: dict[str, object]  # per split: classification report (balanced_accuracy, auc, ...)
    best_epoch: int  # 1-based epoch whose weights were kept
    epochs_run: int
    weights_path: Path
    attention_path: Path
    metrics_path: Path


def read_slide_labels(
    csv_path: str | Path, val_fraction: float = 0.2, test_fraction: float = 0.2, seed: int = 0
) -> SlideTable:
    """Read ``slide_id,label[,split]``; draw a stratified split when the column is absent."""
    csv_path = Path(csv_path)
    with csv_path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        columns = {c.strip().lower(): c for c in (reader.fieldnames or []) if c}
        if "slide_id" not in columns or "label" not in columns:
            raise DatasetError(f"{csv_path}: needs columns slide_id,label[,split]; found {reader.fieldnames}")
        rows = []
        seen: dict[str, int] = {}
        for row in reader:
            sid = (row[columns["slide_id"]] or "").strip()
            label = (row[columns["label"]] or "").strip()
            if not sid or not label:
                raise DatasetError(f"{csv_path}, line {reader.line_num}: empty slide_id or label")
            if sid in seen:
                raise DatasetError(
                    f"{csv_path}, line {reader.line_num}: slide {sid!r} already listed on line {seen[sid]}"
                )
            seen[sid] = reader.line_num
            split = None
            if "split" in columns:
                split = (row[columns["split"]] or "").strip().lower()
                split = {"valid": "val", "validation": "val"}.get(split, split)
                if split not in SPLITS:
                    raise DatasetError(f"{csv_path}, line {reader.line_num}: unknown split {split!r}; use {SPLITS}")
            rows.append((sid, label, split))
    if not rows:
        raise DatasetError(f"{csv_path}: no slides listed")
    names = sorted({r[1] for r in rows}, key=lambda s: (0, int(s), "") if s.lstrip("-").isdigit() else (1, 0, s))
    if len(names) < 2:
        raise DatasetError(f"{csv_path}: only one class ({names[0]!r}); a classifier needs at least two")
    index = {n: i for i, n in enumerate(names)}
    labels = [index[r[1]] for r in rows]
    if "split" in columns:
        splits, origin = [r[2] for r in rows], "given"
    else:
        splits = stratified_split(labels, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed)
        origin = "stratified"
    if "train" not in splits:
        raise DatasetError(f"{csv_path}: no training slides")
    return SlideTable(tuple(r[0] for r in rows), tuple(labels), tuple(splits), tuple(names), origin)


class H5FeatureReader:
    """``slide_id -> (features, coords)`` from ``folder/<slide_id>.h5`` (CLAM/TRIDENT layout)."""

    def __init__(self, folder: str | Path, suffix: str = ".h5"):
        self.folder = Path(folder)
        self.suffix = suffix

    def path(self, slide_id: str) -> Path:
        return self.folder / f"{slide_id}{self.suffix}"

    def has(self, slide_id: str) -> bool:
        return self.path(slide_id).is_file()

    def __call__(self, slide_id: str) -> tuple[np.ndarray, np.ndarray]:
        import h5py

        path = self.path(slide_id)
        if not path.is_file():
            raise MissingFileError(f"slide {slide_id!r}: no feature file {path}")
        with h5py.File(path, "r") as h5:
            missing = [k for k in ("features", "coords") if k not in h5]
            if missing:
                raise MissingFeaturesError(f"{path}: missing dataset(s) {missing}; found {list(h5.keys())}")
            feats, coords = np.asarray(h5["features"]), np.asarray(h5["coords"])
        # Some writers keep a leading batch axis ([1, N, D]); drop it.
        return (
            feats[0] if feats.ndim == 3 and feats.shape[0] == 1 else feats,
            coords[0] if coords.ndim == 3 and coords.shape[0] == 1 else coords,
        )


def write_h5_features(
    path: str | Path, features: np.ndarray, coords: np.ndarray, attrs: Mapping[str, object] | None = None
) -> Path:
    """Write a CLAM/TRIDENT-style h5 (``features`` float32 [N, D], ``coords`` int64 [N, 2]) atomically."""
    import h5py

    path = Path(path)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as h5:
        h5.create_dataset("features", data=np.asarray(features, dtype=np.float32))
        h5.create_dataset("coords", data=np.asarray(coords, dtype=np.int64))
        for key, value in (attrs or {}).items():
            h5["coords"].attrs[key] = value
    return path


def _bag(source: FeatureSource, slide_id: str) -> tuple[torch.Tensor, np.ndarray]:
    try:
        feats, coords = source[slide_id] if isinstance(source, Mapping) else source(slide_id)
    except KeyError as exc:
        raise MissingFeaturesError(f"slide {slide_id!r}: no features in the feature source ({exc})") from exc
    x = torch.as_tensor(np.asarray(feats), dtype=torch.float32)
    c = np.asarray(coords)
    if x.ndim != 2 or x.shape[0] == 0 or c.shape != (x.shape[0], 2):
        raise DatasetError(
            f"slide {slide_id!r}: need features [N>0, D] and coords [N, 2], got {tuple(x.shape)} and {c.shape}"
        )
    return x, c


def _save_atomic_npz(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **arrays)


def load_attention(path: str | Path) -> dict[str, dict[str, object]]:
    """``slide_id -> {attention [N], attention_logits [N], coords [N, 2], label, prediction, probabilities, split}``."""
    with np.load(path, allow_pickle=False) as z:
        offsets = z["offsets"]
        out = {}
        for i, sid in enumerate(z["slide_ids"]):
            a, b = offsets[i], offsets[i + 1]
            out[str(sid)] = {
                "attention": z["attention"][a:b],
                "attention_logits": z["attention_logits"][a:b],
                "coords": z["coords"][a:b],
                "label": int(z["labels"][i]),
                "prediction": int(z["predictions"][i]),
                "probabilities": z["probabilities"][i],
                "split": str(z["splits"][i]),
            }
    return out


def load_abmil(path: str | Path) -> tuple[ABMIL, tuple[str, ...]]:
    """Rebuild a trained :class:`ABMIL` and its class names from ``abmil.safetensors``."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as fh:
        meta = json.loads((fh.metadata() or {}).get("pathdino.abmil", "null") or "null")
    if not meta:
        raise ValueError(f"{path}: no 'pathdino.abmil' metadata; was it written by pathdino.mil.train?")
    model = ABMIL(**meta["model"])
    model.load_state_dict(load_file(str(path)))
    return model.eval(), tuple(meta["class_names"])


def train_abmil(
    labels_csv: str | Path | SlideTable,
    features: FeatureSource,
    out_dir: str | Path,
    *,
    config: MILConfig = MILConfig(),
) -> MILResult:
    """Train ABMIL, keep the best-validation-loss weights, report per-split metrics and save the outputs."""
    table, skipped, out_dir = prepare_slides(labels_csv, features, out_dir, config=config)
    device = torch.device(config.device)
    ids = {s: [i for i, sp in enumerate(table.splits) if sp == s] for s in SPLITS}
    n_classes = len(table.class_names)
    in_dim = int(_bag(features, table.slide_ids[ids["train"][0]])[0].shape[1])
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    model_args = dict(in_dim=in_dim, hidden_dim=config.hidden_dim, n_classes=n_classes, dropout=config.dropout)
    model = ABMIL(**model_args).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    y_all = torch.tensor(table.labels)
    counts = torch.bincount(y_all[ids["train"]], minlength=n_classes).float()
    class_w = torch.ones(n_classes)
    if config.class_weighted_loss:
        class_w = counts.sum() / (n_classes * counts.clamp_min(1))
    class_w = class_w.to(device)

    def slide_loss(x: torch.Tensor, i: int) -> torch.Tensor:
        # Weight applied by hand: F.cross_entropy's `weight` cancels out for a batch of one slide.
        y = y_all[i : i + 1].to(device)
        return F.cross_entropy(model(x.to(device)).logits[None], y) * class_w[y[0]]

    def loss_on(split: str) -> float:
        model.eval()
        with torch.no_grad():
            total = sum(slide_loss(_bag(features, table.slide_ids[i])[0], i).item() for i in ids[split])
        return total / float(class_w[y_all[ids[split]]].sum())

    best = (float("inf"), 0, copy.deepcopy(model.state_dict()))
    history, stale, epoch = [], 0, 0
    for epoch in range(1, config.max_epochs + 1):
        model.train()
        train_losses = []
        for i in rng.permutation(ids["train"]):
            x, _ = _bag(features, table.slide_ids[i])
            if config.max_tiles_per_step is not None and x.shape[0] > config.max_tiles_per_step:
                x = x[torch.as_tensor(np.sort(rng.choice(x.shape[0], config.max_tiles_per_step, replace=False)))]
            loss = slide_loss(x, i)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            train_losses.append(loss.item())
        record = {"epoch": epoch, "train_loss": float(np.mean(train_losses))}
        if ids["val"]:
            record["val_loss"] = loss_on("val")
            if record["val_loss"] < best[0]:
                best, stale = (record["val_loss"], epoch, copy.deepcopy(model.state_dict())), 0
            else:
                stale += 1
        history.append(record)
        if ids["val"] and stale >= config.patience:
            break
    if ids["val"]:
        model.load_state_dict(best[2])
        best_epoch = best[1]
    else:
        best_epoch = epoch  # no validation slides: the last epoch is kept
    model.eval()
    return _finish(
        model, model_args, table, features, ids, device, out_dir, config, history, best_epoch, epoch, skipped
    )


def prepare_slides(
    labels_csv: str | Path | SlideTable, features: FeatureSource | Mapping, out_dir: str | Path, *, config
) -> tuple[SlideTable, list[str], Path]:
    """The labelled slides of a MIL run (``config``: split fractions, seed, skip_missing_slides), the ids skipped
    for having no embeddings, and the output folder, created."""
    table = (
        labels_csv
        if isinstance(labels_csv, SlideTable)
        else read_slide_labels(labels_csv, config.val_fraction, config.test_fraction, config.seed)
    )
    table, skipped = _drop_missing(table, features, config.skip_missing_slides)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return table, skipped, out_dir


def _drop_missing(table: SlideTable, source: FeatureSource, skip: bool) -> tuple[SlideTable, list[str]]:
    """Check up front that every slide has features (mappings and H5 readers only; other callables fail later)."""
    if isinstance(source, Mapping):
        missing = [s for s in table.slide_ids if s not in source]
    elif isinstance(source, H5FeatureReader):
        missing = [s for s in table.slide_ids if not source.has(s)]
    else:
        return table, []
    if not missing:
        return table, []
    if not skip:
        raise MissingFileError(
            f"{len(missing)} slide(s) in the labels have no features: {missing[:10]}"
            f"{' ...' if len(missing) > 10 else ''}; embed them, or drop them with --skip-missing "
            "(MILConfig(skip_missing_slides=True) in Python)"
        )
    keep = [i for i, s in enumerate(table.slide_ids) if s not in set(missing)]
    kept = SlideTable(
        tuple(table.slide_ids[i] for i in keep),
        tuple(table.labels[i] for i in keep),
        tuple(table.splits[i] for i in keep),
        table.class_names,
        table.split_origin,
    )
    if "train" not in kept.splits:
        raise DatasetError("no training slides left after dropping slides without features")
    return kept, missing


def _finish(model, model_args, table, features, ids, device, out_dir, config, history, best_epoch, epochs_run, skipped):
    from safetensors.torch import save_file

    order = [i for s in SPLITS for i in ids[s]]
    probs, atts, logits_att, coords, offsets = [], [], [], [], [0]
    with torch.no_grad():
        for i in order:
            x, c = _bag(features, table.slide_ids[i])
            out = model(x.to(device))
            probs.append(out.logits.float().softmax(-1).cpu().numpy())
            atts.append(out.attention.float().cpu().numpy())
            logits_att.append(out.attention_logits.float().cpu().numpy())
            coords.append(c)
            offsets.append(offsets[-1] + len(c))
    probs_arr = np.stack(probs)
    labels = np.asarray([table.labels[i] for i in order], dtype=np.int64)
    preds = probs_arr.argmax(1)
    split_of = np.asarray([table.splits[i] for i in order])
    metrics = {}
    for s in SPLITS:
        sel = split_of == s
        if sel.any():
            metrics[s] = classification_report(
                labels[sel], preds[sel], scores=probs_arr[sel], n_classes=len(table.class_names)
            )
    _save_atomic_npz(
        out_dir / ATTENTION_FILE,
        {
            "slide_ids": np.asarray([table.slide_ids[i] for i in order]),
            "splits": split_of,
            "labels": labels,
            "predictions": preds,
            "probabilities": probs_arr.astype(np.float32),
            "offsets": np.asarray(offsets, dtype=np.int64),
            "attention": np.concatenate(atts).astype(np.float32),
            "attention_logits": np.concatenate(logits_att).astype(np.float32),
            "coords": np.concatenate(coords).astype(np.int64),
            "class_names": np.asarray(table.class_names),
        },
    )
    weights_path = out_dir / WEIGHTS_FILE
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {"model": model_args, "class_names": list(table.class_names)}
    with atomic_path(weights_path) as tmp:
        save_file(state, str(tmp), metadata={"pathdino.abmil": json.dumps(meta)})
    metrics_path = atomic_write_json(
        out_dir / METRICS_FILE,
        to_jsonable(
            {
                "metrics": metrics,
                "best_epoch": best_epoch,
                "epochs_run": epochs_run,
                "history": history,
                "class_names": list(table.class_names),
                "split_origin": table.split_origin,
                "n_slides": {s: len(ids[s]) for s in SPLITS},
                "skipped_slides": skipped,
                "config": asdict(config),
            }
        ),
        allow_nan=False,
    )
    return MILResult(metrics, best_epoch, epochs_run, weights_path, out_dir / ATTENTION_FILE, metrics_path)
