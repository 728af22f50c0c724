"""pathdino.eval: metrics vs hand-computed values, dataset layouts, kNN/linear/few-shot correctness on synthetic
features, label-free diagnostics, and an end-to-end run on real tiles with a tiny random ViT."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pathdino.eval.datasets import TileDatasetSpec, load_tile_dataset, stratified_split
from pathdino.eval.diagnostics import alignment, diagnose, rankme, uniformity
from pathdino.eval.features import extract_features
from pathdino.eval.fewshot import fewshot_evaluate
from pathdino.eval.knn import knn_evaluate, knn_scores
from pathdino.eval.linear import fit_logistic_regression, linear_probe_evaluate
from pathdino.eval.metrics import balanced_accuracy, confusion_matrix, macro_f1, roc_auc
from pathdino.eval.run import EvalOptions, eval_transform, random_baseline_encoder, run_eval

TILES = Path(__file__).parent / "data" / "tiles_nct"
NCT_CLASSES = ("ADI", "BACK", "DEB", "LYM", "MUC", "MUS", "NORM", "STR", "TUM")


# ---------------------------------------------------------------- metrics
def test_metrics_against_hand_computed_values():
    y = [0, 0, 1, 1, 2, 2]
    p = [0, 1, 1, 1, 2, 0]
    assert confusion_matrix(y, p, 3).tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    # recalls 1/2, 2/2, 1/2
    assert balanced_accuracy(y, p) == pytest.approx(2 / 3)
    # F1 per class: 2*1/(2+1+1)=0.5, 2*2/(4+1+0)=0.8, 2*1/(2+0+1)=2/3
    assert macro_f1(y, p) == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    # a class predicted but never true still counts in macro-F1 (F1 0), not in balanced accuracy
    assert macro_f1([0, 0], [0, 1], 2) == pytest.approx((2 / 3 + 0) / 2)
    assert balanced_accuracy([0, 0], [0, 1], 2) == pytest.approx(0.5)


def test_auc_binary_ties_and_one_vs_rest():
    # positives 0.35, 0.8 vs negatives 0.1, 0.4: 3 of 4 pairs ordered correctly
    assert roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    # ties count one half: pairs (0.5,0.5)x2 -> 0.5 each, (0.9,0.5)x2 -> 1 each
    assert roc_auc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.9]) == pytest.approx(0.75)
    assert roc_auc([0, 1], np.array([[0.7, 0.3], [0.2, 0.8]])) == pytest.approx(1.0)
    assert math.isnan(roc_auc([1, 1], [0.2, 0.3]))
    y = [0, 1, 2, 2]
    s = np.array([[0.6, 0.3, 0.1], [0.5, 0.4, 0.1], [0.2, 0.2, 0.6], [0.1, 0.7, 0.2]])
    # class 0: pos 0.6 vs 0.5,0.2,0.1 -> 1; class 1: pos 0.4 vs 0.3,0.2,0.7 -> 2/3;
    # class 2: pos 0.6,0.2 vs 0.1,0.1 -> 1
    assert roc_auc(y, s) == pytest.approx((1 + 2 / 3 + 1) / 3)


# ---------------------------------------------------------------- datasets
def _png(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value, dtype=np.uint8)).save(path)


def test_folder_layout_and_stratified_split(tmp_path):
    for c, n in (("b", 10), ("a", 6)):
        for i in range(n):
            _png(tmp_path / "root" / c / f"{i}.png", 10 * i)
    (tmp_path / "root" / "notes.txt").write_text("ignored")
    spec = TileDatasetSpec(tmp_path / "root", val_fraction=0.2, test_fraction=0.2, seed=3)
    ds = load_tile_dataset(spec)
    assert ds.layout == "folder" and ds.class_names == ("a", "b") and ds.split_origin == "stratified"
    summary = ds.summary()["splits"]
    assert summary["test"]["per_class"] == {"a": 1, "b": 2}
    assert summary["val"]["per_class"] == {"a": 1, "b": 2}
    assert summary["train"]["n"] == 10
    all_paths = [r.path for s in ("train", "val", "test") for r in ds.records(s)]
    assert len(set(all_paths)) == 16
    assert load_tile_dataset(spec).splits == ds.splits  # seeded: same split again


def test_folder_layout_with_split_folders(tmp_path):
    for split in ("train", "test"):
        for c in ("x", "y"):
            _png(tmp_path / split / c / "t.png", 0)
    ds = load_tile_dataset(tmp_path)
    assert ds.layout == "folder-splits" and ds.split_origin == "given"
    assert [len(ds.records(s)) for s in ("train", "val", "test")] == [2, 0, 2]


def test_csv_layout_given_split_and_patient_split(tmp_path):
    for i in range(24):
        _png(tmp_path / "img" / f"{i}.png", i)
    rows = ["path,label,split"] + [f"img/{i}.png,{i % 3},{'train' if i < 16 else 'test'}" for i in range(24)]
    (tmp_path / "given.csv").write_text("\n".join(rows) + "\n")
    ds = load_tile_dataset(tmp_path / "given.csv")
    assert ds.class_names == ("0", "1", "2") and ds.split_origin == "given"
    assert len(ds.records("train")) == 16 and len(ds.records("test")) == 8
    assert ds.records("train")[0].path == tmp_path / "img" / "0.png"

    # 12 patients with 2 tiles each; patient-level split must keep each patient in one split
    rows = ["path,label,patient"] + [f"img/{i}.png,{(i // 2) % 2},P{i // 2}" for i in range(24)]
    (tmp_path / "patients.csv").write_text("\n".join(rows) + "\n")
    ds = load_tile_dataset(TileDatasetSpec(tmp_path / "patients.csv", val_fraction=0.25, test_fraction=0.25))
    assert ds.split_origin == "patient-stratified"
    by_split = {s: {r.patient for r in ds.records(s)} for s in ("train", "val", "test")}
    assert not (by_split["train"] & by_split["val"]) and not (by_split["train"] & by_split["test"])
    assert not (by_split["val"] & by_split["test"])
    # 6 patients per class; 0.25 * 6 = 1.5 rounds half up to 2 patients each for val and test
    assert [len(by_split[s]) for s in ("train", "val", "test")] == [4, 4, 4]


def test_stratified_split_keeps_a_training_item_per_class():
    splits = stratified_split([0, 1, 1, 2, 2, 2, 2], val_fraction=0.3, test_fraction=0.3, seed=0)
    assert splits[0] == "train"
    assert sorted(s for s, y in zip(splits, [0, 1, 1, 2, 2, 2, 2]) if y == 1) == ["test", "train"]


def test_dataset_errors_name_the_culprit(tmp_path):
    _png(tmp_path / "f" / "full" / "a.png", 0)
    (tmp_path / "f" / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):
        load_tile_dataset(tmp_path / "f")
    _png(tmp_path / "a.png", 0)
    (tmp_path / "missing.csv").write_text("path,label\na.png,x\nnope.png,y\n")
    with pytest.raises(FileNotFoundError, match="line 3.*nope.png"):
        load_tile_dataset(tmp_path / "missing.csv")
    (tmp_path / "split.csv").write_text("path,label,split\na.png,x,train\na.png,x,holdout\n")
    with pytest.raises(ValueError, match="line 3.*holdout"):
        load_tile_dataset(tmp_path / "split.csv")
    (tmp_path / "cols.csv").write_text("file,label\na.png,x\n")
    with pytest.raises(ValueError, match=r"cols.csv.*missing column.*path"):
        load_tile_dataset(tmp_path / "cols.csv")
    (tmp_path / "notrain.csv").write_text("path,label,split\na.png,x,train\na.png,y,test\n")
    with pytest.raises(ValueError, match="'y'.*no training"):
        load_tile_dataset(tmp_path / "notrain.csv")


# ---------------------------------------------------------------- methods on synthetic features
def _blobs(n_per_class: int, n_classes: int = 4, dim: int = 32, seed: int = 0, spread: float = 0.3):
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_classes, dim, generator=torch.Generator().manual_seed(123)) * 3
    labels = torch.arange(n_classes).repeat_interleave(n_per_class)
    return centres[labels] + spread * torch.randn(len(labels), dim, generator=gen), labels


def test_knn_vote_matches_hand_computation():
    train = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])
    labels = torch.tensor([0, 1, 1])
    scores = knn_scores(train, labels, torch.tensor([[1.0, 0.0]]), 2, k=2, temperature=0.5)
    # top-2 similarities: 1.0 (class 0), 0.8 (class 1)
    w0, w1 = math.exp(1.0 / 0.5), math.exp(0.8 / 0.5)
    assert scores[0].tolist() == pytest.approx([w0 / (w0 + w1), w1 / (w0 + w1)], rel=1e-5)
    # k above the training size is capped, not an error
    assert knn_scores(train, labels, train, 2, k=50).shape == (3, 2)


def test_knn_and_linear_separate_synthetic_classes():
    xtr, ytr = _blobs(30, seed=0)
    xva, yva = _blobs(10, seed=1)
    xte, yte = _blobs(20, seed=2)
    knn = knn_evaluate(xtr, ytr, xte, yte, n_classes=4, ks=(1, 20))
    for k in ("1", "20"):
        assert knn["by_k"][k]["balanced_accuracy"] == pytest.approx(1.0)
        assert knn["by_k"][k]["auc"] == pytest.approx(1.0)
    lin = linear_probe_evaluate(xtr, ytr, xte, yte, n_classes=4, val_features=xva, val_labels=yva)
    assert lin["selection"] == "val" and lin["test"]["balanced_accuracy"] == pytest.approx(1.0)
    lin_cv = linear_probe_evaluate(xtr, ytr, xte, yte, n_classes=4, l2_grid=(1e-3, 1e-1))
    assert lin_cv["selection"] == "cv3" and lin_cv["test"]["accuracy"] == pytest.approx(1.0)
    assert set(lin_cv["selection_balanced_accuracy"]) == {"0.001", "0.1"}


def test_linear_probe_l2_shrinks_weights_and_beats_chance_on_overlap():
    x, y = _blobs(40, n_classes=3, dim=8, spread=3.0)
    weak = fit_logistic_regression(x, y, 3, 1e-4)
    strong = fit_logistic_regression(x, y, 3, 10.0)
    assert strong.weight.norm() < 0.2 * weak.weight.norm()
    acc = (weak.predict_proba(x).argmax(1) == y).float().mean()
    assert acc > 0.6  # three overlapping classes: well above 1/3 chance, below perfect


def test_fewshot_on_synthetic_features():
    xtr, ytr = _blobs(10, seed=0)
    xte, yte = _blobs(20, seed=2)
    res = fewshot_evaluate(xtr, ytr, xte, yte, n_classes=4, shots=(1, 4, 16), n_seeds=3)
    assert res["skipped_shots"] == [16]
    for k in ("1", "4"):
        ba = res["by_shots"][k]["balanced_accuracy"]
        assert len(ba["values"]) == 3 and ba["mean"] >= 0.95
        assert ba["std"] == pytest.approx(float(np.std(ba["values"])))
    lin = fewshot_evaluate(xtr, ytr, xte, yte, n_classes=4, shots=(2,), n_seeds=2, method="linear")
    assert lin["by_shots"]["2"]["accuracy"]["mean"] >= 0.95
    with pytest.raises(ValueError, match="simpleshot"):
        fewshot_evaluate(xtr, ytr, xte, yte, n_classes=4, method="protonet")


# ---------------------------------------------------------------- diagnostics
def test_rankme_of_rank_r_and_collapsed_features():
    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(64, 8, generator=gen))
    x = torch.randn(2000, 8, generator=gen) @ q.T  # rank 8, nearly equal singular values
    assert rankme(x) == pytest.approx(8, rel=0.05)
    u, _ = torch.linalg.qr(torch.randn(100, 5, generator=gen))
    assert rankme(u @ q[:, :5].T) == pytest.approx(5, rel=1e-4)  # equal singular values: exactly 5
    collapsed = torch.randn(500, 1, generator=gen) @ torch.randn(1, 64, generator=gen)
    assert rankme(collapsed) == pytest.approx(1.0, abs=1e-3)


def test_alignment_and_uniformity_hand_checkable():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    assert alignment(a, 3 * a) == pytest.approx(0.0)  # same directions
    assert alignment(a, -a) == pytest.approx(4.0)  # antipodal: ||z - (-z)||^2 = 4
    assert alignment(a, a.flip(1)) == pytest.approx(2.0)  # orthogonal pairs
    assert uniformity(torch.tensor([[1.0, 0.0], [-1.0, 0.0]])) == pytest.approx(-8.0)  # exp(-2*4)
    assert uniformity(torch.eye(3)) == pytest.approx(-4.0)  # all pairs at squared distance 2
    assert uniformity(torch.ones(5, 3)) == pytest.approx(0.0)  # collapse
    report = diagnose(torch.eye(3), (torch.eye(3), torch.eye(3)))
    assert report["rankme"] == pytest.approx(3.0, rel=1e-5) and report["alignment"] == pytest.approx(0.0)


# ---------------------------------------------------------------- end to end on real tiles
@pytest.fixture(scope="module")
def tiny_vit():
    return random_baseline_encoder("vit_tiny_patch16_224", img_size=32)


@pytest.fixture()
def nct_quadrants(tmp_path) -> Path:
    """root/<class>/ with the 4 quadrant crops of each bundled NCT tile: 36 tiles, 4 per class."""
    root = tmp_path / "nct"
    for path in sorted(TILES.glob("*.tif")):
        with Image.open(path) as im:
            rgb = im.convert("RGB")
        (root / path.name.split("-")[0]).mkdir(parents=True, exist_ok=True)
        for i, (x, y) in enumerate(((0, 0), (112, 0), (0, 112), (112, 112))):
            rgb.crop((x, y, x + 112, y + 112)).save(root / path.name.split("-")[0] / f"{path.stem}-{i}.png")
    return root


def test_extract_features_on_bundled_tiles(tiny_vit, tmp_path):
    tifs = sorted(TILES.glob("*.tif"))
    assert [p.name.split("-")[0] for p in tifs] == list(NCT_CLASSES)
    rows = ["path,label"] + [f"{p.resolve()},{p.name.split('-')[0]}" for p in tifs]
    (tmp_path / "nct.csv").write_text("\n".join(rows) + "\n")
    ds = load_tile_dataset(TileDatasetSpec(tmp_path / "nct.csv"))
    assert ds.class_names == NCT_CLASSES and len(ds.records("train")) == 9  # 1 per class stays in train
    feats, labels, paths = extract_features(
        tiny_vit, eval_transform(32), ds.records("train"), batch_size=4, device="cpu", num_workers=0, progress=False
    )
    assert feats.shape == (9, 192) and feats.dtype == torch.float32 and torch.isfinite(feats).all()
    assert labels.tolist() == list(range(9)) and paths[0].endswith("ADI-AAQEFMRI.tif")
    assert tiny_vit.training is False


def test_run_eval_end_to_end_with_random_vit(tiny_vit, nct_quadrants, tmp_path):
    out = tmp_path / "reports" / "eval.json"
    opts = EvalOptions(
        batch_size=16, progress=False, knn_ks=(1, 20), fewshot_shots=(1, 2, 4), fewshot_seeds=2, alignment_max_tiles=9
    )
    report = run_eval(
        tiny_vit, eval_transform(32), TileDatasetSpec(nct_quadrants, 0.25, 0.25), out_json=out, options=opts
    )
    on_disk = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert on_disk == report
    assert [p.name for p in out.parent.iterdir()] == ["eval.json"]  # no temporary file left behind
    assert report["eval_split"] == "test" and report["feature_dim"] == 192
    assert report["dataset"]["splits"]["test"]["n"] == 9 and report["dataset"]["splits"]["train"]["n"] == 18
    assert report["encoder"]["weights"] == "random" and report["encoder"]["timm_architecture"] == "vit_tiny_patch16_224"
    m = report["methods"]
    for metrics in (m["knn"]["by_k"]["1"], m["knn"]["by_k"]["20"], m["linear"]["test"]):
        for key in ("accuracy", "balanced_accuracy", "macro_f1", "auc"):
            assert 0.0 <= metrics[key] <= 1.0
        # Each test tile's three sibling quadrants are in train/val: separable even for a random ViT. Chance is
        # 1/9; measured 0.56-0.67 (a 2-core EPYC): at least 4 of the 9 test tiles right is clearly above chance.
        assert metrics["balanced_accuracy"] >= 4 / 9 - 1e-9, metrics["balanced_accuracy"]
        assert metrics["auc"] >= 0.75, metrics["auc"]
        assert np.asarray(metrics["confusion_matrix"]).sum() == 9
    assert m["fewshot"]["by_shots"]["2"]["balanced_accuracy"]["mean"] >= 4 / 9 - 1e-9
    assert m["knn"]["by_k"]["20"]["k_effective"] == 18
    assert m["linear"]["selection"] == "val"
    assert m["fewshot"]["skipped_shots"] == [4] and set(m["fewshot"]["by_shots"]) == {"1", "2"}
    diag = m["diagnostics"]
    assert 1.0 <= diag["rankme"] <= 9 and -8.0 <= diag["uniformity"] <= 0.0 and 0.0 <= diag["alignment"] <= 4.0
    assert diag["alignment_n"] == 9


def test_run_eval_rejects_unknown_method(tiny_vit, nct_quadrants):
    with pytest.raises(ValueError, match="svm"):
        run_eval(tiny_vit, eval_transform(32), nct_quadrants, methods=("knn", "svm"))
