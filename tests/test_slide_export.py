"""Slide-encoder folders: save/load round trip, the model card, atomic writes, tile-encoder identity checks."""

from __future__ import annotations

import json

import pytest
import torch

import pathdino
from pathdino.slide import (
    SlideEncoder,
    SlideEncoderConfig,
    SlideEncoderFormatError,
    TileEncoderMismatchError,
    check_tile_encoder,
    read_slide_encoder_config,
    save_slide_encoder,
    tile_encoder_identity,
)
from tiling.configio import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny ops: OpenMP barriers cost more than the work

STORE_ENCODER = {
    "dir": "/runs/tile/export",
    "architecture": "vit_small_patch14_reg4_dinov2",
    "embed_dim": 12,
    "weights_sha256": "ab" * 32,
    "recipe": "cls",
    "tile_px": 224,
    "target_mpp": 0.5,
    "known_encoder": None,
}


def _model():
    cfg = SlideEncoderConfig(
        in_dim=12, embed_dim=32, depth=2, num_heads=4, segment_lengths=(8, 16), dilation_ratios=(1, 2)
    )
    torch.manual_seed(0)
    return SlideEncoder(cfg), cfg


def test_round_trip_card_and_identity(tmp_path):
    model, cfg = _model()
    out = save_slide_encoder(
        model,
        cfg,
        tmp_path / "slide-enc",
        tile_encoder=tile_encoder_identity(STORE_ENCODER, feature_dim=12),
        training={"step": 100, "objective": "masked autoencoding"},
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["slide-enc"]  # no staging folder left behind
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    loaded = pathdino.load_slide_encoder(out)
    emb, grid = torch.randn(20, 12), torch.stack([torch.arange(20) % 5, torch.arange(20) // 5], 1)
    with torch.no_grad():
        want, got = model.eval()(emb, grid), loaded(emb, grid)
    torch.testing.assert_close(got.cls, want.cls)
    torch.testing.assert_close(got.tiles, want.tiles)
    assert loaded.info.config == cfg
    meta = json.loads((out / "config.json").read_text())
    assert meta["format"] == "pathdino-slide-encoder" and meta["tile_encoder"]["name"] == "export"
    card = (out / "README.md").read_text()
    for fact in ("ab" * 32, "224 px", "0.5 µm/px", "vit_small_patch14_reg4_dinov2", "(8, 1), (16, 2)", "step: 100"):
        assert fact in card


def test_save_refuses_bad_identity_and_foreign_folders(tmp_path):
    model, cfg = _model()
    with pytest.raises(ConfigError, match="tile_encoder.feature_dim=24 differs"):
        save_slide_encoder(model, cfg, tmp_path / "a", tile_encoder={"name": "x", "feature_dim": 24})
    with pytest.raises(ConfigError, match="needs a 'name'"):
        save_slide_encoder(model, cfg, tmp_path / "a", tile_encoder={})
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(SlideEncoderFormatError, match="not a slide-encoder folder"):
        save_slide_encoder(model, cfg, tmp_path / "mine", tile_encoder={"name": "x"})
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    with pytest.raises(SlideEncoderFormatError, match="no config.json"):
        read_slide_encoder_config(tmp_path / "mine")


def test_tile_encoder_mismatch_is_an_error_unless_forced(tmp_path):
    model, cfg = _model()
    out = save_slide_encoder(
        model, cfg, tmp_path / "enc", tile_encoder=tile_encoder_identity(STORE_ENCODER, feature_dim=12)
    )
    info = read_slide_encoder_config(out)
    assert check_tile_encoder(info, STORE_ENCODER, feature_dim=12, where="emb") == []
    other = {**STORE_ENCODER, "weights_sha256": "cd" * 32, "target_mpp": 1.0}
    with pytest.raises(TileEncoderMismatchError, match="weights_sha256.*target_mpp.*--force"):
        check_tile_encoder(info, other, feature_dim=12, where="emb")
    assert len(check_tile_encoder(info, other, feature_dim=12, where="emb", force=True)) == 2
    with pytest.raises(TileEncoderMismatchError, match="24 wide"):
        check_tile_encoder(info, STORE_ENCODER, feature_dim=24, where="emb", force=True)
