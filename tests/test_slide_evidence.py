"""Evidence that slide pretraining learns what mean pooling cannot: synthetic slides whose label is the SPATIAL
ARRANGEMENT of two tile types, not their counts.

Each slide is an 8 x 8 grid of tiles of two types (two random prototype embeddings plus noise), exactly half of
each: type A fills the top (label 0) or the left (label 1) half, and the halves are swapped at random. Counts are
equal in both classes, so the mean tile embedding carries no label (a linear probe on it is at chance). After a
short masked-autoencoder pretraining on unlabelled slides of the same kind, a linear probe on the frozen encoder's
CLS embedding separates held-out slides, while the same probe on a randomly initialised encoder does not; and the
masked-tile loss ends well below the loss of predicting the mean embedding.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pathdino.eval.linear import linear_probe_evaluate
from pathdino.slide.loop import train
from pathdino.slide.mae import SlideMAE
from pathdino.slide.positions import grid_positions
from pathdino.slide.train_config import load_pretrain_config

sys.path.insert(0, str(Path(__file__).parent))
from slide_fixtures import STRIDE_PX, write_store  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DIM, SIDE, NOISE, STEPS = 16, 8, 0.5, 150
PROTOTYPES = np.random.default_rng(0).normal(size=(2, DIM)).astype(np.float32)
DECODER = dict(decoder_dim=32, decoder_depth=1, decoder_heads=4)


def arranged_slide(rng: np.random.Generator, label: int) -> tuple[np.ndarray, np.ndarray]:
    """Tile embeddings and level-0 coords (in a shuffled order) of one slide of class ``label``."""
    ys, xs = np.mgrid[0:SIDE, 0:SIDE]
    half = ((ys if label == 0 else xs) >= SIDE // 2).astype(int)
    types = (half + rng.integers(2)) % 2  # which type takes which half: random
    features = PROTOTYPES[types.ravel()] + NOISE * rng.normal(size=(SIDE * SIDE, DIM)).astype(np.float32)
    coords = np.stack([xs.ravel(), ys.ravel()], 1) * STRIDE_PX
    order = rng.permutation(SIDE * SIDE)
    return features[order], coords[order].astype(np.int64)


def slide_set(seed: int, n: int) -> tuple[list[tuple[np.ndarray, np.ndarray]], torch.Tensor]:
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    return [arranged_slide(rng, int(label)) for label in labels], torch.from_numpy(labels)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, one_thread):
    base = tmp_path_factory.mktemp("evidence")
    slides, _ = slide_set(1, 32)  # unlabelled pretraining slides
    store = write_store(base / "emb", {f"s{i:03d}": s for i, s in enumerate(slides)})
    overrides = [
        f"data.embeddings=[{store}]",
        f"train.output_dir={base / 'run'}",
        f"train.total_steps={STEPS}",
        "model.embed_dim=64",
        "model.depth=2",
        "model.num_heads=4",
        "model.segment_lengths=[64]",
        "model.dilation_ratios=[1]",
        *(f"objective.{k}={v}" for k, v in DECODER.items()),
        "objective.mask_ratio=0.5",
        "data.max_tokens_per_slide=64",
        "data.tokens_per_pack=1024",
        "data.num_workers=0",
        "data.cache_slides=true",
        "train.packs_per_step=1",
        f"train.checkpoint_every_steps={STEPS}",
        "train.precision=fp32",
        "optim.warmup_steps=10",
        "optim.lr=0.005",
        "log.every_steps=50",
        "log.trackers=[]",
    ]
    cfg = load_pretrain_config(ROOT / "configs" / "slide" / "small.yaml", overrides)
    train(cfg)
    return base / "run", dataclasses.replace(cfg.model, in_dim=DIM)


def _encoder(model_cfg, checkpoint: Path | None):
    torch.manual_seed(0)
    mae = SlideMAE(model_cfg, **DECODER)
    if checkpoint is not None:
        mae.load_state_dict(load_file(checkpoint / "model.safetensors"))
    return mae.encoder.eval()


@torch.no_grad()
def _cls(encoder, slides) -> torch.Tensor:
    return torch.stack(
        [encoder(torch.from_numpy(f), grid_positions(torch.from_numpy(c), STRIDE_PX)).cls[0] for f, c in slides]
    )


def _probe(train_x, train_y, test_x, test_y) -> float:
    return linear_probe_evaluate(train_x, train_y, test_x, test_y, n_classes=2)["test"]["balanced_accuracy"]


def test_masked_tile_loss_falls_well_below_predicting_the_mean(pretrained):
    run, _ = pretrained
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r for r in records if "loss" in r]
    assert losses[0]["loss"] > losses[0]["loss_mean_baseline"]  # starts above the mean predictor
    end = losses[-10:]
    ratio = sum(r["loss"] for r in end) / sum(r["loss_mean_baseline"] for r in end)
    assert ratio < 0.9, ratio


def test_pretrained_slide_embedding_reads_the_arrangement_mean_pooling_and_random_init_cannot(pretrained):
    run, model_cfg = pretrained
    train_slides, train_y = slide_set(2, 100)
    test_slides, test_y = slide_set(3, 100)  # held out
    mean_pool = _probe(
        torch.stack([torch.from_numpy(f).mean(0) for f, _ in train_slides]),
        train_y,
        torch.stack([torch.from_numpy(f).mean(0) for f, _ in test_slides]),
        test_y,
    )
    scores = {"mean_pool": mean_pool}
    for name, checkpoint in (("random_init", None), ("pretrained", run / "checkpoints" / f"step_{STEPS:09d}")):
        encoder = _encoder(model_cfg, checkpoint)
        scores[name] = _probe(_cls(encoder, train_slides), train_y, _cls(encoder, test_slides), test_y)
    print(scores)
    assert scores["pretrained"] >= 0.9, scores
    assert scores["mean_pool"] <= 0.7 and scores["random_init"] <= 0.7, scores
