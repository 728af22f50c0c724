"""Export: a real 2-step CPU training run's teacher → timm encoder folder; plain-timm reload equality; the
transform of ``load_encoder``; errors that name the file at fault."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SAMPLE_SLIDE = REPO / "pathdino" / "sample_data" / "CMU-1-Small-Region.svs"
SMOKE_CONFIG = REPO / "configs" / "train" / "cpu_smoke.yaml"


def make_store(path: Path, tile_px: int = 56, slides: list[Path] | None = None) -> str:
    from tiling.config import TilingConfig
    from tiling.inputs import collect_slides
    from tiling.runner import run_tiling

    outcomes = run_tiling(
        collect_slides([str(s) for s in slides or [SAMPLE_SLIDE]]), str(path), TilingConfig(workers=1, tile_px=tile_px)
    )
    assert all(o.status == "done" for o in outcomes), outcomes
    return str(path)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> Path:
    """A real 2-step training run with the CPU smoke preset (tiny ViT, 56-px crops), in this process (a
    `python -m pathdino.train` process would spend longer starting than training)."""
    import logging

    from pathdino.train.config import load_config
    from pathdino.train.loop import train

    root = tmp_path_factory.mktemp("smoke")
    store = make_store(root / "tiles.zarr")
    run = root / "run"
    overrides = [
        f"data.stores=[{store}]",
        f"train.output_dir={run}",
        "train.total_steps=2",
        "train.checkpoint_every_steps=2",
        "log.every_steps=1",
        "log.trackers=[]",
    ]
    # train() installs pathdino's log handler (propagate off); later tests' caplog needs it undone
    logger = logging.getLogger("pathdino")
    handlers, propagate, level = list(logger.handlers), logger.propagate, logger.level
    try:
        assert train(load_config(SMOKE_CONFIG, overrides))["done"]
    finally:
        logger.handlers[:] = handlers
        logger.propagate, logger.level = propagate, level
    return run


@pytest.fixture(scope="module")
def exported(smoke_run, tmp_path_factory) -> Path:
    from pathdino.export import export_checkpoint

    out = tmp_path_factory.mktemp("export") / "encoder"
    result = export_checkpoint(smoke_run, out)
    assert result.step == 2 and result.max_abs_diff == 0.0
    return out


def _teacher_backbone(ckpt: Path):
    """The teacher ViT rebuilt independently of pathdino.export: checkpoint config + safetensors."""
    from safetensors.torch import load_file

    from pathdino.models import BackboneConfig, build_backbone

    state = json.loads((ckpt / "trainer_state.json").read_text())
    cfg = BackboneConfig(**{**state["config"]["model"]["backbone"], "drop_path_rate": 0.0})
    prefix = "backbone.backbone."
    weights = {k[len(prefix) :]: v for k, v in load_file(ckpt / "teacher.safetensors").items() if k.startswith(prefix)}
    model = build_backbone(cfg)
    model.load_state_dict(weights, strict=True)
    return model.eval()


def _latest_step(run: Path) -> Path:
    return max((run / "checkpoints").glob("step_*"))


def test_export_reloads_in_plain_timm_with_identical_outputs(smoke_run, exported):
    import timm

    assert sorted(p.name for p in exported.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    cfg = json.loads((exported / "config.json").read_text())
    # Exactly what the model card tells users to do: no pathdino involved.
    overlay = dict(cfg["pretrained_cfg"], file=str(exported / "model.safetensors"), url="", hf_hub_id="")
    overlay = {k: tuple(v) if isinstance(v, list) else v for k, v in overlay.items()}
    plain = timm.create_model(
        cfg["architecture"], pretrained=True, pretrained_cfg_overlay=overlay, **cfg["model_args"]
    ).eval()
    local_dir = timm.create_model(f"local-dir:{exported}", pretrained=True).eval()
    teacher = _teacher_backbone(_latest_step(smoke_run))
    x = torch.randn(3, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = teacher.forward_features(x)
        assert torch.equal(plain.forward_features(x), ref)
        assert torch.equal(local_dir.forward_features(x), ref)
        assert torch.equal(plain(x), ref[:, 0])  # model(x) is the CLS embedding
    data_cfg = timm.data.resolve_data_config(model=plain)
    assert tuple(data_cfg["input_size"]) == (3, 56, 56)  # not the 518 of timm's dinov2 registry entry
    assert tuple(data_cfg["mean"]) == pytest.approx((0.485, 0.456, 0.406))
    assert data_cfg["crop_pct"] == 1.0


def test_export_records_geometry_provenance_and_card(smoke_run, exported):
    from pathdino.export.export import file_sha256

    cfg = json.loads((exported / "config.json").read_text())
    meta = cfg["pathdino"]
    assert meta["tile_px"] == 56 and meta["target_mpp"] == 0.5  # read from the training store
    assert meta["effective_mpp_range"] == [0.499, 0.499]
    assert meta["training"]["step"] == 2 and meta["training"]["checkpoint"] == str(_latest_step(smoke_run))
    assert meta["training"]["config"]["model"]["backbone"]["embed_dim"] == 64
    assert "dino_head.*" in meta["training"]["left_out"] and "backbone.mask_token" in meta["training"]["left_out"]
    assert meta["export"]["weights_sha256"] == file_sha256(exported / "model.safetensors")
    assert meta["export"]["check"]["max_abs_diff"] == 0.0
    assert cfg["model_args"]["reg_tokens"] == 2 and cfg["model_args"]["num_classes"] == 0
    card = (exported / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: timm\n")
    assert "56 px" in card and "0.5 µm/px" in card and meta["export"]["weights_sha256"] in card


def test_load_encoder_and_its_transform(exported):
    from PIL import Image

    import pathdino

    model, transform = pathdino.load_encoder(exported)  # the lazy top-level name
    assert not model.training and model.pathdino_info["tile_px"] == 56
    rng = np.random.default_rng(0)
    tile = rng.integers(0, 256, (56, 56, 3), dtype=np.uint8)
    expected = (
        torch.from_numpy(tile).permute(2, 0, 1).float() / 255 - torch.tensor(transform.mean)[:, None, None]
    ) / torch.tensor(transform.std)[:, None, None]
    assert torch.allclose(transform(tile), expected, atol=1e-6)
    assert torch.allclose(transform(Image.fromarray(tile)), expected, atol=1e-6)
    # Larger or non-square images: shorter side resized, centre crop; a flat colour stays exactly that colour.
    flat = np.full((112, 168, 3), (200, 100, 50), dtype=np.uint8)
    out = transform(flat)
    assert out.shape == (3, 56, 56)
    assert torch.allclose(out, transform(np.full((56, 56, 3), (200, 100, 50), dtype=np.uint8)), atol=1e-5)
    with torch.no_grad():
        assert model(transform(tile)[None]).shape == (1, 64)
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        transform(np.zeros((56, 56), dtype=np.uint8))


def test_checkpoint_errors_name_the_file(smoke_run, tmp_path):
    from pathdino.export import ExportError, export_checkpoint

    ckpt = tmp_path / "step_000000002"
    shutil.copytree(_latest_step(smoke_run), ckpt)
    (ckpt / "teacher.safetensors").unlink()
    with pytest.raises(ExportError, match="teacher.safetensors"):
        export_checkpoint(ckpt, tmp_path / "out")
    with pytest.raises(ExportError, match="does not exist"):
        export_checkpoint(tmp_path / "nowhere", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExportError, match="no complete checkpoint"):
        export_checkpoint(tmp_path / "empty", tmp_path / "out")
    from safetensors.torch import save_file

    save_file({"dino_head.last_layer.weight": torch.zeros(2, 2)}, ckpt / "teacher.safetensors")
    with pytest.raises(ExportError, match=r"teacher.safetensors holds no ViT backbone"):
        export_checkpoint(ckpt, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_existing_output_needs_overwrite(smoke_run, exported, tmp_path):
    from pathdino.export import ExportError, ExportOptions, export_checkpoint

    out = tmp_path / "enc"
    shutil.copytree(exported, out)
    (out / "model.safetensors").write_bytes(b"stale")
    with pytest.raises(ExportError, match="--overwrite"):
        export_checkpoint(smoke_run, out)
    export_checkpoint(smoke_run, out, ExportOptions(overwrite=True, tile_px=56, target_mpp=0.25))
    meta = json.loads((out / "config.json").read_text())["pathdino"]
    assert meta["target_mpp"] == 0.25  # explicit values win over the stores
    assert (out / "model.safetensors").read_bytes()[:5] != b"stale"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left


def test_encoder_folder_errors(exported, tmp_path):
    from pathdino.export import EncoderFormatError, load_encoder

    broken = tmp_path / "enc"
    shutil.copytree(exported, broken)
    (broken / "model.safetensors").unlink()
    with pytest.raises(EncoderFormatError, match="missing model.safetensors"):
        load_encoder(broken)
    shutil.copy(exported / "model.safetensors", broken / "model.safetensors")
    cfg = json.loads((broken / "config.json").read_text())
    cfg["model_args"]["depth"] = 3  # config.json and weights from different exports
    (broken / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(EncoderFormatError, match="does not fit"):
        load_encoder(broken)
    (broken / "config.json").unlink()
    with pytest.raises(EncoderFormatError, match="missing config.json"):
        load_encoder(broken)
    with pytest.raises(EncoderFormatError, match="does not exist"):
        load_encoder(tmp_path / "nope")


def test_export_check_detects_a_different_model(smoke_run, exported):
    from pathdino.export import verify_export

    teacher = _teacher_backbone(_latest_step(smoke_run))
    assert verify_export(teacher, exported) == 0.0
    with torch.no_grad():
        teacher.blocks[0].attn.qkv.weight.add_(1e-2)
    assert verify_export(teacher, exported) > 1e-4


def test_cli_export(smoke_run, tmp_path):
    from typer.testing import CliRunner

    from pathdino.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["export", str(smoke_run), "--out", str(tmp_path / "enc"), "--name", "smoke"])
    assert result.exit_code == 0, result.output
    assert "step 2" in result.output and (tmp_path / "enc" / "config.json").is_file()
    assert "# smoke" in (tmp_path / "enc" / "README.md").read_text()
    again = runner.invoke(app, ["export", str(smoke_run), "--out", str(tmp_path / "enc")])
    assert again.exit_code == 2 and "--overwrite" in again.output


def test_cli_module_does_not_import_torch():
    code = "import sys, pathdino.cli; assert 'torch' not in sys.modules, 'torch imported'; print('ok')"
    proc = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr


def test_relative_and_unreadable_training_stores(smoke_run, tmp_path, monkeypatch):
    """Relative store paths resolve against the training's working directory; unreadable ones leave notes."""
    from pathdino.export import export_checkpoint

    run_cwd = tmp_path / "cwd"
    ckpt = run_cwd / "runs" / "a" / "checkpoints" / "step_000000002"
    shutil.copytree(_latest_step(smoke_run), ckpt)
    shutil.copytree(smoke_run.parent / "tiles.zarr", run_cwd / "data" / "tiles.zarr")
    state = json.loads((ckpt / "trainer_state.json").read_text())
    state["config"]["data"]["stores"] = ["data/tiles.zarr"]
    state["config"]["train"]["output_dir"] = "runs/a"
    (ckpt / "trainer_state.json").write_text(json.dumps(state))
    monkeypatch.chdir(tmp_path)  # not the training's working directory
    result = export_checkpoint(ckpt, tmp_path / "enc")
    assert (result.tile_px, result.target_mpp, result.notes) == (56, 0.5, ())

    shutil.rmtree(run_cwd / "data")
    result = export_checkpoint(ckpt, tmp_path / "enc2")
    assert result.tile_px is None and result.target_mpp is None
    assert any("data/tiles.zarr could not be read" in n for n in result.notes)
    assert any("--tile-px / --mpp" in n for n in result.notes)
    assert "could not be read" in (tmp_path / "enc2" / "README.md").read_text()


def test_teacher_that_does_not_fit_the_config(smoke_run, tmp_path):
    from pathdino.export import ExportError, export_checkpoint

    ckpt = tmp_path / "step_000000002"
    shutil.copytree(_latest_step(smoke_run), ckpt)
    state = json.loads((ckpt / "trainer_state.json").read_text())
    state["config"]["model"]["backbone"]["embed_dim"] = 128  # weights are 64 wide
    (ckpt / "trainer_state.json").write_text(json.dumps(state))
    with pytest.raises(ExportError, match=r"teacher.safetensors does not fit model.backbone of .*trainer_state.json"):
        export_checkpoint(ckpt, tmp_path / "out")
    del state["config"]["model"]
    (ckpt / "trainer_state.json").write_text(json.dumps(state))
    with pytest.raises(ExportError, match="no model.backbone section"):
        export_checkpoint(ckpt, tmp_path / "out")
