"""`pathdino mil --slide-encoder`: fine-tuning a slide encoder + head with layer-wise lr decay, or a linear probe on
its frozen slide vectors; same labels CSV, splits and metrics as ABMIL."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from pathdino.cli.main import app
from pathdino.embed.store import EmbeddingWriter
from pathdino.mil.slide_encoder import SlideMILConfig, _SlideClassifier, layer_decay_groups, train_slide_mil
from pathdino.slide import SlideEncoder, SlideEncoderConfig, save_slide_encoder, tile_encoder_identity

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny ops: OpenMP barriers cost more than the work

ENCODER = {
    "dir": "/runs/tile/export",
    "embed_dim": 12,
    "weights_sha256": "ab" * 32,
    "recipe": "cls",
    "tile_px": 224,
    "target_mpp": 0.5,
}


def _cohort(tmp_path, n_slides=8):
    rng = np.random.default_rng(0)
    writer = EmbeddingWriter(tmp_path / "emb", ENCODER, "tiles.zarr", ("cls",))
    rows = ["slide_id,label,split"]
    for i in range(n_slides):
        label = (i // 4) % 2  # both classes in every split
        coords = np.stack(np.meshgrid(np.arange(4), np.arange(3)), -1).reshape(-1, 2) * 448
        features = rng.normal(size=(12, 12)).astype(np.float32) + (2.0 * label - 1.0)  # the class shifts every tile
        writer.write_slide(
            f"s{i}", {"cls": features}, coords, {"slide": {"level0_step_px": 448}}, {"n_tiles": 12, "features": ["cls"]}
        )
        rows.append(f"s{i},{'tumour' if label else 'normal'},{('train', 'train', 'val', 'test')[i % 4]}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    cfg = SlideEncoderConfig(
        in_dim=12, embed_dim=32, depth=2, num_heads=4, segment_lengths=(8, 16), dilation_ratios=(1, 2)
    )
    torch.manual_seed(0)
    enc = save_slide_encoder(
        SlideEncoder(cfg), cfg, tmp_path / "enc", tile_encoder=tile_encoder_identity(ENCODER, feature_dim=12)
    )
    return tmp_path / "emb", enc


def test_layer_decay_groups_scale_lr_by_depth():
    cfg = SlideEncoderConfig(in_dim=12, embed_dim=32, depth=3, num_heads=4, segment_lengths=(8,), dilation_ratios=(1,))
    model = _SlideClassifier(SlideEncoder(cfg), 2, "cls")
    groups = layer_decay_groups(model, lr=1.0, layer_decay=0.5, weight_decay=0.1)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    wd_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert lr_of[id(model.head.weight)] == 1.0 and lr_of[id(model.encoder.norm.weight)] == 1.0
    assert lr_of[id(model.encoder.blocks[2].attn.qkv.weight)] == 0.5
    assert lr_of[id(model.encoder.blocks[0].mlp.fc1.weight)] == 0.125
    assert lr_of[id(model.encoder.proj.weight)] == 0.0625 and lr_of[id(model.encoder.cls_token)] == 0.0625
    assert wd_of[id(model.encoder.blocks[0].mlp.fc1.weight)] == 0.1 and wd_of[id(model.encoder.cls_token)] == 0.0
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_finetune_learns_and_writes_outputs(tmp_path):
    from pathdino.embed import EmbeddingStore
    import pathdino

    emb, enc = _cohort(tmp_path)
    config = SlideMILConfig(max_epochs=5, patience=5, accumulate_slides=2, lr=3e-3, max_tiles=8)
    result = train_slide_mil(
        tmp_path / "labels.csv",
        EmbeddingStore(emb),
        tmp_path / "ft",
        encoder=pathdino.load_slide_encoder(enc),
        step_px=lambda sid: 448.0,
        config=config,
    )
    report = json.loads((tmp_path / "ft" / "metrics.json").read_text())
    losses = [h["train_loss"] for h in report["history"]]
    assert losses[-1] < 0.5 * losses[0], losses
    assert result.metrics["test"]["balanced_accuracy"] == 1.0
    with np.load(tmp_path / "ft" / "predictions.npz") as z:
        assert z["probabilities"].shape == (8, 2) and list(z["class_names"]) == ["normal", "tumour"]
    assert (tmp_path / "ft" / "slide_mil.safetensors").is_file()


def test_cli_linear_probe_and_flag_checks(tmp_path):
    emb, enc = _cohort(tmp_path)
    run = CliRunner().invoke(
        app,
        [
            "mil",
            str(tmp_path / "labels.csv"),
            "--embeddings",
            str(emb),
            "--out",
            str(tmp_path / "probe"),
            "--slide-encoder",
            str(enc),
            "--linear-probe",
        ],
    )
    assert run.exit_code == 0, run.output
    report = json.loads((tmp_path / "probe" / "metrics.json").read_text())
    assert report["mode"] == "linear_probe" and report["metrics"]["test"]["n"] == 2
    stray = CliRunner().invoke(
        app,
        [
            "mil",
            str(tmp_path / "labels.csv"),
            "--embeddings",
            str(emb),
            "--out",
            str(tmp_path / "x"),
            "--layer-decay",
            "0.9",
        ],
    )
    assert stray.exit_code == 2 and "--layer-decay only apply with --slide-encoder" in stray.output
