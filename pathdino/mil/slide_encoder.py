"""Slide classification with a pretrained slide encoder (``pathdino mil --slide-encoder DIR``).

Two ways, on the same labels CSV, splits and metrics as ABMIL (``pathdino.mil.train``):

- fine-tuning (GigaPath's recipe): the tile encoder stays frozen (its embeddings are read from the store), the
  slide encoder and a linear head on its slide vector are trained with AdamW and layer-wise lr decay (block i of
  depth L gets ``lr * layer_decay ** (L + 1 - i)``; the input projection ``** (L + 1)``, final norm and head ``lr``),
  gradients accumulated over ``accumulate_slides`` slides (one slide per forward), the best validation-loss
  weights kept;
- ``linear_probe``: the frozen slide encoder's vectors, and a logistic regression (L2 chosen on the validation
  split, else by cross-validation) on them.

Outputs in ``out_dir``: ``metrics.json`` (per split: balanced accuracy, AUC, ...), ``predictions.npz`` (slide ids,
splits, labels, probabilities) and ``slide_mil.safetensors`` (fine-tuned encoder + head, or the probe).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pathdino.eval.datasets import SPLITS
from pathdino.eval.linear import fit_logistic_regression, select_l2
from pathdino.eval.metrics import classification_report
from pathdino.mil.train import SlideTable, _bag, prepare_slides
from pathdino.slide.model import SlideEncoder
from pathdino.slide.slide_embed import embed_one_slide, infer_step_px
from pathdino.slide.positions import grid_positions, row_major_order
from tiling.configio import check_choice, check_int, fail
from tiling.fsio import atomic_path, atomic_write_json, to_jsonable

OWNER = "SlideMILConfig"
WEIGHTS_FILE, PREDICTIONS_FILE, METRICS_FILE = "slide_mil.safetensors", "predictions.npz", "metrics.json"


@dataclass(frozen=True)
class SlideMILConfig:
    """Fine-tuning / probing settings (GigaPath's fine-tuning defaults; docs/slide.md)."""

    linear_probe: bool = False  # fit a logistic regression on frozen slide vectors instead of fine-tuning
    vector: str = "cls"  # the slide vector: "cls" (the CLS token) or "mean" (mean of contextualised tiles)
    lr: float = 2.5e-4  # AdamW peak lr for the head and last layers (GigaPath: blr 2e-3 x 32 slides / 256)
    layer_decay: float = 0.95  # lr multiplier per layer from the top down
    weight_decay: float = 0.05
    max_epochs: int = 5
    patience: int = 3  # epochs without a lower validation loss before stopping
    accumulate_slides: int = 32  # slides per optimizer step (one slide per forward)
    max_tiles: int | None = None  # train on a random contiguous run of this many tiles (row-major); None: all
    class_weighted_loss: bool = True
    skip_missing_slides: bool = False
    val_fraction: float = 0.2  # when the CSV has no split column
    test_fraction: float = 0.2
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self):
        check_choice(OWNER, "vector", self.vector, ("cls", "mean"))
        for name in ("max_epochs", "patience", "accumulate_slides"):
            check_int(OWNER, name, getattr(self, name), 1)
        if self.max_tiles is not None:
            check_int(OWNER, "max_tiles", self.max_tiles, 1)
        if not 0 < self.layer_decay <= 1:
            fail(OWNER, "layer_decay", self.layer_decay, "expected a number in (0, 1]")
        if not self.lr > 0:
            fail(OWNER, "lr", self.lr, "expected a number > 0")


@dataclass(frozen=True)
class SlideMILResult:
    metrics: dict[str, object]
    epochs_run: int
    best_epoch: int
    out_dir: Path


class _SlideClassifier(torch.nn.Module):
    def __init__(self, encoder: SlideEncoder, n_classes: int, vector: str):
        super().__init__()
        self.encoder, self.vector = encoder, vector
        self.head = torch.nn.Linear(encoder.cfg.embed_dim, n_classes)

    def forward(self, features: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        out = self.encoder(features, grid)
        return self.head(out.cls[0] if self.vector == "cls" else out.tiles.mean(0))


def layer_decay_groups(model: _SlideClassifier, *, lr: float, layer_decay: float, weight_decay: float) -> list[dict]:
    """AdamW parameter groups with layer-wise lr decay; no weight decay on biases, norms and the CLS token."""
    depth = len(model.encoder.blocks)
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if name.startswith("encoder.blocks."):
            layer = int(name.split(".")[2]) + 1
        elif name.startswith(("encoder.proj", "encoder.cls_token")):
            layer = 0
        else:
            layer = depth + 1  # final norm and head
        decay = param.ndim > 1 and "cls_token" not in name
        group = groups.setdefault(
            (layer, decay),
            {
                "params": [],
                "lr": lr * layer_decay ** (depth + 1 - layer),
                "weight_decay": weight_decay if decay else 0.0,
            },
        )
        group["params"].append(param)
    return list(groups.values())


def train_slide_mil(
    labels_csv: str | Path | SlideTable,
    features: Mapping,
    out_dir: str | Path,
    *,
    encoder: SlideEncoder,
    step_px: Callable[[str], float | None],
    config: SlideMILConfig = SlideMILConfig(),
) -> SlideMILResult:
    """Fine-tune ``encoder`` + a linear head (or fit a linear probe) on labelled slides' tile embeddings."""
    table, skipped, out_dir = prepare_slides(labels_csv, features, out_dir, config=config)
    torch.manual_seed(config.seed)
    encoder = encoder.to(config.device)
    if config.linear_probe:
        probs, state, history, best_epoch, epochs = _probe(
            table, features, encoder=encoder, step_px=step_px, config=config
        )
    else:
        probs, state, history, best_epoch, epochs = _finetune(
            table, features, encoder=encoder, step_px=step_px, config=config
        )
    labels = np.asarray(table.labels)
    splits = np.asarray(table.splits)
    metrics = {
        s: classification_report(
            labels[splits == s],
            probs[splits == s].argmax(1),
            scores=probs[splits == s],
            n_classes=len(table.class_names),
        )
        for s in SPLITS
        if (splits == s).any()
    }
    _save(out_dir, table=table, probs=probs, state=state, config=config)
    atomic_write_json(
        out_dir / METRICS_FILE,
        to_jsonable(
            {
                "metrics": metrics,
                "mode": "linear_probe" if config.linear_probe else "finetune",
                "history": history,
                "best_epoch": best_epoch,
                "epochs_run": epochs,
                "class_names": list(table.class_names),
                "split_origin": table.split_origin,
                "skipped_slides": skipped,
                "config": asdict(config),
                "slide_encoder": str(getattr(getattr(encoder, "info", None), "path", "")),
            }
        ),
        allow_nan=False,
    )
    return SlideMILResult(metrics, epochs, best_epoch, out_dir)


def _inputs(features: Mapping, sid: str, step_px: Callable[[str], float | None], *, device: str):
    x, coords = _bag(features, sid)
    coords_t = torch.as_tensor(coords, dtype=torch.long)
    grid = grid_positions(coords_t, step_px(sid) or infer_step_px(coords_t))
    return x.to(device), grid.to(device)


def _probe(table: SlideTable, features: Mapping, *, encoder, step_px, config):
    encoder.eval()
    vectors = []
    for sid in table.slide_ids:
        feats, coords = _bag(features, sid)
        result = embed_one_slide(encoder, feats.numpy(), coords, level0_step_px=step_px(sid), precision="fp32")
        vectors.append(result[config.vector])
    x, y = torch.stack(vectors), torch.tensor(table.labels)
    split = np.asarray(table.splits)
    train, val = torch.as_tensor(split == "train"), torch.as_tensor(split == "val")
    n_classes = len(table.class_names)
    l2, how, scores = select_l2(
        x[train],
        y[train],
        n_classes,
        val_features=x[val] if val.any() else None,
        val_labels=y[val] if val.any() else None,
        seed=config.seed,
    )
    probe = fit_logistic_regression(x[train], y[train], n_classes, l2)
    probs = probe.predict_proba(x).numpy()
    state = {"mean": probe.mean, "std": probe.std, "weight": probe.weight, "bias": probe.bias}
    return probs, state, [{"l2": l2, "chosen_by": how, "scores": scores}], 0, 0


def _finetune(table: SlideTable, features: Mapping, *, encoder, step_px, config):
    n_classes = len(table.class_names)
    model = _SlideClassifier(encoder, n_classes, config.vector).to(config.device)
    opt = torch.optim.AdamW(
        layer_decay_groups(model, lr=config.lr, layer_decay=config.layer_decay, weight_decay=config.weight_decay)
    )
    ids = {s: [i for i, sp in enumerate(table.splits) if sp == s] for s in SPLITS}
    y_all = torch.tensor(table.labels)
    counts = torch.bincount(y_all[ids["train"]], minlength=n_classes).float()
    class_w = counts.sum() / (n_classes * counts.clamp_min(1)) if config.class_weighted_loss else torch.ones(n_classes)
    rng = np.random.default_rng(config.seed)

    def loss_of(i: int, *, crop: bool) -> torch.Tensor:
        x, grid = _inputs(features, table.slide_ids[i], step_px, device=config.device)
        if crop and config.max_tiles and x.shape[0] > config.max_tiles:
            order = row_major_order(grid.cpu())
            start = int(rng.integers(0, x.shape[0] - config.max_tiles + 1))
            keep = order[start : start + config.max_tiles].to(x.device)
            x, grid = x[keep], grid[keep]
        y = y_all[i : i + 1].to(config.device)
        return F.cross_entropy(model(x, grid)[None], y) * class_w[y[0]].to(config.device)

    best, history, stale, epoch = (float("inf"), 0, copy.deepcopy(model.state_dict())), [], 0, 0
    for epoch in range(1, config.max_epochs + 1):
        model.train()
        order, losses = rng.permutation(ids["train"]), []
        opt.zero_grad(set_to_none=True)
        for step, i in enumerate(order, start=1):
            loss = loss_of(int(i), crop=True)
            (loss / min(config.accumulate_slides, len(order))).backward()
            losses.append(loss.item())
            if step % config.accumulate_slides == 0 or step == len(order):
                opt.step()
                opt.zero_grad(set_to_none=True)
        record = {"epoch": epoch, "train_loss": float(np.mean(losses))}
        if ids["val"]:
            model.eval()
            with torch.no_grad():
                record["val_loss"] = float(
                    sum(loss_of(i, crop=False).item() for i in ids["val"]) / float(class_w[y_all[ids["val"]]].sum())
                )
            if record["val_loss"] < best[0]:
                best, stale = (record["val_loss"], epoch, copy.deepcopy(model.state_dict())), 0
            else:
                stale += 1
        history.append(record)
        if ids["val"] and stale >= config.patience:
            break
    if ids["val"]:
        model.load_state_dict(best[2])
    model.eval()
    with torch.no_grad():
        probs = np.stack(
            [
                model(*_inputs(features, sid, step_px, device=config.device)).float().softmax(-1).cpu().numpy()
                for sid in table.slide_ids
            ]
        )
    return probs, model.state_dict(), history, best[1] if ids["val"] else epoch, epoch


def _save(out_dir: Path, *, table: SlideTable, probs: np.ndarray, state: dict, config: SlideMILConfig) -> None:
    from safetensors.torch import save_file

    with atomic_path(out_dir / PREDICTIONS_FILE) as tmp, open(tmp, "wb") as fh:
        np.savez(
            fh,
            slide_ids=np.asarray(table.slide_ids),
            splits=np.asarray(table.splits),
            labels=np.asarray(table.labels),
            probabilities=probs.astype(np.float32),
            class_names=np.asarray(table.class_names),
        )
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in state.items()}
    meta = {
        "class_names": list(table.class_names),
        "mode": "linear_probe" if config.linear_probe else "finetune",
        "vector": config.vector,
    }
    with atomic_path(out_dir / WEIGHTS_FILE) as tmp:
        save_file(tensors, str(tmp), metadata={"pathdino.slide_mil": json.dumps(meta)})
