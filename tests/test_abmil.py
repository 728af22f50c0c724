"""ABMIL: learns a bag task driven by a few 'tumour' instances, attends to them, and round-trips its files."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pathdino.mil import (
    ABMIL,
    H5FeatureReader,
    MILConfig,
    load_abmil,
    load_attention,
    read_slide_labels,
    train_abmil,
    write_h5_features,
)

DIM = 16
TILES = 24
TUMOUR_TILES = 3


def _make_bags(n_slides: int, seed: int):
    """Negatives: Gaussian noise. Positives: the same plus TUMOUR_TILES tiles shifted along a 'tumour' direction."""
    rng = np.random.default_rng(seed)
    bags, labels, tumour_mask = {}, {}, {}
    for s in range(n_slides):
        sid = f"slide-{seed}-{s:03d}"
        label = s % 2
        x = rng.normal(size=(TILES, DIM)).astype(np.float32)
        mask = np.zeros(TILES, dtype=bool)
        if label:
            where = rng.choice(TILES, TUMOUR_TILES, replace=False)
            x[where, :4] += 4.0
            mask[where] = True
        coords = np.stack([np.arange(TILES) * 512, np.full(TILES, s * 512)], axis=1).astype(np.int64)
        bags[sid], labels[sid], tumour_mask[sid] = (x, coords), label, mask
    return bags, labels, tumour_mask


def _write_labels(path, labels: dict[str, int], splits: dict[str, str] | None = None) -> None:
    lines = ["slide_id,label" + (",split" if splits else "")]
    for sid, lab in labels.items():
        name = "tumour" if lab else "normal"
        lines.append(f"{sid},{name}" + (f",{splits[sid]}" if splits else ""))
    path.write_text("\n".join(lines) + "\n")


def test_abmil_shapes_and_mask():
    model = ABMIL(in_dim=8, hidden_dim=16, n_classes=3, dropout=0.0).eval()
    x = torch.randn(2, 5, 8)
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    out = model(x, mask)
    assert out.logits.shape == (2, 3) and out.attention.shape == (2, 5)
    assert torch.allclose(out.attention.sum(1), torch.ones(2))
    assert out.attention[1, 3:].abs().max() == 0  # padding gets no attention
    # A padded bag must give the same output as the unpadded bag alone.
    single = model(x[1, :3])
    assert single.logits.shape == (3,)
    assert torch.allclose(single.logits, out.logits[1], atol=1e-6)
    with pytest.raises(ValueError, match="expects features"):
        model(torch.randn(5, 7))


def test_abmil_learns_tumour_bags_and_attends_to_tumour_tiles(tmp_path):
    bags, labels, tumour = _make_bags(60, seed=0)
    ids = list(labels)
    splits = {sid: ("train" if i < 36 else "val" if i < 44 else "test") for i, sid in enumerate(ids)}
    _write_labels(tmp_path / "labels.csv", labels, splits)
    config = MILConfig(hidden_dim=32, dropout=0.1, lr=2e-3, max_epochs=25, patience=6, seed=0)
    result = train_abmil(tmp_path / "labels.csv", bags, tmp_path / "out", config=config)

    test = result.metrics["test"]
    assert test["n"] == 16
    assert test["auc"] >= 0.95
    assert test["balanced_accuracy"] >= 0.9
    assert 1 <= result.best_epoch <= result.epochs_run <= 25

    att = load_attention(result.attention_path)
    assert set(att) == set(ids)
    positives = [sid for sid in ids if splits[sid] == "test" and labels[sid] == 1]
    mass = [float(att[sid]["attention"][tumour[sid]].sum()) for sid in positives]
    # Uniform attention would put TUMOUR_TILES / TILES = 0.125 on the tumour tiles.
    assert np.mean(mass) > 0.6
    for sid in ids:
        assert np.allclose(att[sid]["attention"].sum(), 1.0, atol=1e-5)
        assert np.array_equal(att[sid]["coords"], bags[sid][1])
        assert att[sid]["split"] == splits[sid]

    model, class_names = load_abmil(result.weights_path)
    assert class_names == ("normal", "tumour")
    sid = positives[0]
    logits = model(torch.from_numpy(bags[sid][0])).logits
    assert np.allclose(logits.softmax(-1).detach().numpy(), att[sid]["probabilities"], atol=1e-5)
    assert (tmp_path / "out" / "metrics.json").is_file()


def test_train_without_split_column_draws_stratified_split(tmp_path):
    bags, labels, _ = _make_bags(20, seed=1)
    _write_labels(tmp_path / "labels.csv", labels)
    table = read_slide_labels(tmp_path / "labels.csv", val_fraction=0.2, test_fraction=0.2, seed=0)
    assert table.split_origin == "stratified"
    assert sorted(table.splits).count("test") == 4 and sorted(table.splits).count("val") == 4
    result = train_abmil(
        table, bags.__getitem__, tmp_path / "out", config=MILConfig(hidden_dim=16, max_epochs=2, max_tiles_per_step=8)
    )
    assert set(result.metrics) == {"train", "val", "test"}
    assert 0.0 <= result.metrics["test"]["balanced_accuracy"] <= 1.0


def test_missing_slides_fail_up_front_or_are_skipped(tmp_path):
    bags, labels, _ = _make_bags(12, seed=2)
    _write_labels(tmp_path / "labels.csv", labels)
    gone = sorted(bags)[:2]
    partial = {k: v for k, v in bags.items() if k not in gone}
    with pytest.raises(FileNotFoundError, match=gone[0]):
        train_abmil(tmp_path / "labels.csv", partial, tmp_path / "out", config=MILConfig(hidden_dim=8, max_epochs=1))
    result = train_abmil(
        tmp_path / "labels.csv",
        partial,
        tmp_path / "out",
        config=MILConfig(hidden_dim=8, max_epochs=1, skip_missing_slides=True),
    )
    assert sum(m["n"] for m in result.metrics.values()) == 10
    assert set(load_attention(result.attention_path)) == set(partial)


def test_label_csv_errors(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("slide,label\na,1\n")
    with pytest.raises(ValueError, match="slide_id,label"):
        read_slide_labels(bad)
    bad.write_text("slide_id,label,split\na,0,train\nb,1,holdout\n")
    with pytest.raises(ValueError, match="line 3.*holdout"):
        read_slide_labels(bad)
    bad.write_text("slide_id,label\na,0\na,1\n")
    with pytest.raises(ValueError, match="already listed"):
        read_slide_labels(bad)


def test_h5_reader_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(7, 5)).astype(np.float32)
    coords = rng.integers(0, 10_000, size=(7, 2))
    write_h5_features(tmp_path / "s1.h5", feats, coords, attrs={"patch_size": 224, "patch_size_level0": 448})
    reader = H5FeatureReader(tmp_path)
    f2, c2 = reader("s1")
    assert f2.dtype == np.float32 and np.array_equal(f2, feats) and np.array_equal(c2, coords)
    import h5py

    with h5py.File(tmp_path / "s1.h5") as h5:
        assert h5["coords"].attrs["patch_size_level0"] == 448
    # TRIDENT-style leading batch axis is dropped.
    with h5py.File(tmp_path / "s2.h5", "w") as h5:
        h5["features"] = feats[None]
        h5["coords"] = coords[None]
    f3, c3 = reader("s2")
    assert f3.shape == (7, 5) and c3.shape == (7, 2)
    with pytest.raises(FileNotFoundError, match="'missing'"):
        reader("missing")
    with h5py.File(tmp_path / "s3.h5", "w") as h5:
        h5["features"] = feats
    with pytest.raises(KeyError, match="coords"):
        reader("s3")
