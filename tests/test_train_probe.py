"""In-training probes (eval.probe): logged at the right steps, to metrics.jsonl and TensorBoard, without changing
the run (same losses and weights as without probes, exact resume)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from pathdino.train.config import load_config
from pathdino.train.loop import LOSS_TERMS, train
from tiling.configio import ConfigError

SMOKE = Path(__file__).resolve().parents[1] / "configs" / "train" / "cpu_smoke.yaml"
PROBE_KEYS = (
    "probe_knn_accuracy",
    "probe_knn_balanced_accuracy",
    "probe_linear_accuracy",
    "probe_linear_balanced_accuracy",
)


def make_labelled_folder(root: Path) -> Path:
    """Class folders of two kinds of texture (horizontal vs vertical stripes, random colours and phases)."""
    rng = np.random.default_rng(0)
    for name, axis in (("horizontal", 0), ("vertical", 1)):
        (root / name).mkdir(parents=True)
        for i in range(14):
            period = rng.integers(6, 14)
            wave = (np.sin(np.arange(64) * 2 * np.pi / period + rng.uniform(0, 6)) > 0).astype(np.float32)
            pattern = np.repeat(wave[:, None], 64, axis=1) if axis == 0 else np.repeat(wave[None, :], 64, axis=0)
            colour = rng.uniform(60, 255, size=3)
            img = (pattern[..., None] * colour + (1 - pattern[..., None]) * 30).astype(np.uint8)
            Image.fromarray(img).save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> Path:
    return make_labelled_folder(tmp_path_factory.mktemp("probe") / "tiles")


def config(out: Path, *overrides: str):
    return load_config(
        SMOKE,
        [
            "train.synthetic_data=true",
            f"train.output_dir={out}",
            "log.trackers=[]",
            "log.every_steps=1",
            "train.total_steps=4",
            "train.checkpoint_every_steps=2",
            *overrides,
        ],
    )


def lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, labelled) -> dict[str, Path]:
    """Without probes; with probes every 2 steps (and TensorBoard); the same stopped after step 2 and resumed."""
    base = tmp_path_factory.mktemp("runs")
    probe = f"eval.probe={{data: {labelled}, every_steps: 2, knn_k: 20}}"
    # keep_best without the step-0 probe: step 2's probe is the first best, so a checkpoint is always kept
    kept = f"eval.probe={{data: {labelled}, every_steps: 2, knn_k: 20, keep_best: true, at_start: false}}"
    train(config(base / "plain"))
    train(config(base / "probed", probe, "log.trackers=[tensorboard]"))
    train(config(base / "kept", kept))
    train(config(base / "resumed", kept, "train.stop_at_step=2"))
    train(config(base / "resumed", kept), resume=True)
    return {name: base / name for name in ("plain", "probed", "kept", "resumed")}


@pytest.mark.timeout(600)  # the first test of the module: it pays for the five training runs of `runs`
def test_probes_are_logged_and_change_nothing(runs):
    records = lines(runs["probed"])
    with_probe = [r for r in records if "probe_knn_accuracy" in r]
    assert [r["step"] for r in with_probe] == [0, 2, 4]  # the initial teacher, then every 2 steps
    for r in with_probe:
        assert all(0.0 <= r[k] <= 1.0 for k in PROBE_KEYS)
    assert "loss" in with_probe[1] and "teacher_entropy" in with_probe[1]  # beside the losses and health metrics
    # the probes consumed no random numbers and touched no weights: the run is the same, number for number
    a = {r["step"]: r for r in lines(runs["plain"]) if "loss" in r}
    b = {r["step"]: r for r in records if "loss" in r}
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        for key in (*LOSS_TERMS, "grad_norm", "teacher_entropy", "embedding_rank"):
            assert a[step][key] == b[step][key], (step, key)
    for name in ("student.safetensors", "teacher.safetensors"):
        wa = load_file(runs["plain"] / "checkpoints" / "step_000000004" / name)
        wb = load_file(runs["probed"] / "checkpoints" / "step_000000004" / name)
        assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # ... and TensorBoard got the probe scalars too
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next(runs["probed"].rglob("events.out.tfevents.*")).parent))
    events.Reload()
    assert "probe_knn_accuracy" in events.Tags()["scalars"]
    assert [e.step for e in events.Scalars("probe_knn_accuracy")] == [0, 2, 4]


def test_probe_resume_is_exact(runs):
    a = {r["step"]: r for r in lines(runs["probed"]) if "loss" in r}
    b = {r["step"]: r for r in lines(runs["resumed"]) if "loss" in r}
    assert sorted(b) == [1, 2, 3, 4]
    for step in a:
        for key in (*LOSS_TERMS, "grad_norm"):
            assert a[step][key] == b[step][key], (step, key)
    for key in PROBE_KEYS:  # the probe after the resume sees the same teacher
        assert a[4][key] == b[4][key] and a[2][key] == b[2][key], key


def test_keep_best_keeps_the_best_probe_step_resumably_and_export_picks_it(runs, tmp_path):
    from pathdino.export import ExportOptions, export_checkpoint

    probed = [r for r in lines(runs["kept"]) if "probe_knn_balanced_accuracy" in r]
    scores = [r["probe_knn_balanced_accuracy"] for r in probed]
    assert [r["step"] for r in probed] == [2, 4]
    best_step = probed[scores.index(max(scores))]["step"]  # the first step reaching the best (a tie is no new best)
    kept = {}
    for name in ("kept", "resumed"):
        best = runs[name] / "checkpoints" / "best"
        state = json.loads((best / "trainer_state.json").read_text())
        assert state["step"] == best_step, name
        assert state["probe_best"] == {"metric": "probe_knn_balanced_accuracy", "value": max(scores), "step": best_step}
        kept[name] = load_file(best / "teacher.safetensors")
        events = [r for r in lines(runs[name]) if r.get("kept") == "best"]
        assert events and events[-1]["step"] == best_step and events[-1]["value"] == max(scores)
    # The run stopped at step 2 and resumed kept the same checkpoint: the best so far travels with the checkpoints
    # (without it, the resumed run's first probe, step 4, would count as a new best).
    assert all(torch.equal(kept["kept"][k], kept["resumed"][k]) for k in kept["kept"])
    step_dir = runs["kept"] / "checkpoints" / f"step_{best_step:09d}"
    assert all(torch.equal(kept["kept"][k], v) for k, v in load_file(step_dir / "teacher.safetensors").items())
    # the losses are those of the run without probes: keeping the best changes nothing
    a = {r["step"]: r["loss"] for r in lines(runs["plain"]) if "loss" in r}
    assert a == {r["step"]: r["loss"] for r in lines(runs["kept"]) if "loss" in r}
    assert not (runs["probed"] / "checkpoints" / "best").exists()  # keep_best off: nothing kept

    options = {"tile_px": 64, "target_mpp": 0.5}
    assert export_checkpoint(runs["kept"], tmp_path / "best", ExportOptions(pick="best", **options)).step == best_step
    assert export_checkpoint(runs["kept"], tmp_path / "latest", ExportOptions(**options)).step == 4
    with pytest.raises(Exception, match="holds no best checkpoint.*keep_best"):
        export_checkpoint(runs["probed"], tmp_path / "none", ExportOptions(pick="best", **options))


def test_probe_data_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="eval.probe.data=.*does not exist"):
        train(config(tmp_path / "x", f"eval.probe={{data: {tmp_path / 'missing'}}}"))


def test_probe_embeds_exactly_as_pathdino_eval_does_on_the_exported_teacher(labelled, tmp_path):
    """The probe's features of a teacher are the features `pathdino eval` computes on that teacher exported: the
    same input values (64 px images resized to 56 by the encoder's transform) and the same token (CLS after the final
    norm of every token, not the objective's trimmed rows), with registers and the last block trimmed in training."""
    from pathdino.eval.datasets import load_tile_dataset
    from pathdino.eval.features import extract_features
    from pathdino.export import TrainingGeometry, export_backbone, load_encoder
    from pathdino.models import BackboneConfig, HeadConfig
    from pathdino.train.model import build_student_teacher
    from pathdino.train.probe import ProbeConfig, TrainingProbe

    mean, std = (0.7, 0.5, 0.6), (0.2, 0.25, 0.15)
    cfg = BackboneConfig(
        arch="custom",
        embed_dim=48,
        depth=2,
        num_heads=2,
        patch_size=14,
        img_size=56,
        num_register_tokens=4,
        layerscale_init=0.1,
        drop_path_rate=0.0,
    )
    torch.manual_seed(0)
    _, teacher = build_student_teacher(cfg, HeadConfig(n_prototypes=32, hidden_dim=32, bottleneck_dim=16), None)
    assert teacher.trim_last_block  # the training forward reads CLS and masked rows only
    probe = TrainingProbe(
        ProbeConfig(data=str(labelled), max_images=1_000), img_px=56, mean=mean, std=std, device=torch.device("cpu")
    )
    got = probe.embed(teacher)

    geometry = TrainingGeometry(
        tile_px=64, target_mpp=0.5, effective_mpp_range=None, mean=mean, std=std, stores=(), notes=()
    )
    export_backbone(teacher.backbone.backbone, cfg, tmp_path / "encoder", geometry=geometry, provenance={"step": 0})
    model, transform = load_encoder(tmp_path / "encoder")
    dataset = load_tile_dataset(labelled)
    records = list(dataset.records("train")) + list(dataset.records("val")) + list(dataset.records("test"))
    expected = extract_features(model, transform, records, progress=False).features
    assert got.shape == expected.shape == (28, 48)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def make_separable_folder(root: Path) -> Path:
    """Two classes any encoder tells apart, even an untrained one: pink (eosin-like) vs dark blue (haematoxylin-like)
    noise textures, 14 images each."""
    rng = np.random.default_rng(1)
    for name, colour in (("pink", (230, 120, 190)), ("blue", (50, 50, 140))):
        (root / name).mkdir(parents=True)
        for i in range(14):
            noise = rng.normal(0, 25, size=(64, 64, 3))
            Image.fromarray(np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)).save(root / name / f"{i}.png")
    return root


def test_probe_scores_equal_pathdino_eval_and_are_above_chance(tmp_path):
    """The probe's kNN scores of a teacher are `pathdino eval`'s kNN scores of that teacher exported, on the same
    images split the same way (a CSV with the probe's fit images as train, its scored images as test); on classes
    built to be separable (chance 0.5) both probes score well above chance."""
    from pathdino.eval.datasets import load_tile_dataset
    from pathdino.eval.run import EvalOptions, run_eval
    from pathdino.export import TrainingGeometry, export_backbone, load_encoder
    from pathdino.models import BackboneConfig, HeadConfig
    from pathdino.train.model import build_student_teacher
    from pathdino.train.probe import ProbeConfig, TrainingProbe

    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    # LayerScale 1: at DINOv2's 1e-5 an untrained ViT's CLS is the same vector for every image (cosine 0.99999),
    # which a kNN cannot split; the blocks' full contribution makes the untrained features tell the colours apart.
    cfg = BackboneConfig(
        arch="custom",
        embed_dim=48,
        depth=2,
        num_heads=2,
        patch_size=14,
        img_size=56,
        num_register_tokens=0,
        drop_path_rate=0.0,
        layerscale_init=1.0,
    )
    torch.manual_seed(0)
    _, teacher = build_student_teacher(cfg, HeadConfig(n_prototypes=32, hidden_dim=32, bottleneck_dim=16), None)
    labelled = make_separable_folder(tmp_path / "tiles")
    probe = TrainingProbe(
        ProbeConfig(data=str(labelled), knn_k=5, max_images=1_000),
        img_px=56,
        mean=mean,
        std=std,
        device=torch.device("cpu"),
    )
    record = probe.maybe_run(0, teacher)

    dataset = load_tile_dataset(labelled)
    rows = ["path,label,split"] + [
        f"{r.path},{dataset.class_names[r.label]},{split}"
        for split, names in (("train", ("train",)), ("test", ("val", "test")))
        for name in names
        for r in dataset.records(name)
    ]
    (tmp_path / "split.csv").write_text("\n".join(rows) + "\n")
    geometry = TrainingGeometry(
        tile_px=64, target_mpp=0.5, effective_mpp_range=None, mean=mean, std=std, stores=(), notes=()
    )
    export_backbone(teacher.backbone.backbone, cfg, tmp_path / "encoder", geometry=geometry, provenance={"step": 0})
    model, transform = load_encoder(tmp_path / "encoder")
    report = run_eval(
        model,
        transform,
        tmp_path / "split.csv",
        methods=("knn",),
        options=EvalOptions(knn_ks=(5,), progress=False, device="cpu"),
    )
    knn = report["methods"]["knn"]["by_k"]["5"]
    assert record["probe_knn_accuracy"] == pytest.approx(knn["accuracy"], abs=1e-9)
    assert record["probe_knn_balanced_accuracy"] == pytest.approx(knn["balanced_accuracy"], abs=1e-9)
    assert record["probe_knn_balanced_accuracy"] >= 0.9 and record["probe_linear_balanced_accuracy"] >= 0.9, record
