"""`pathdino slide-embed`: slide vectors from a slide encoder over an embeddings store; resumable, sharded,
tile-encoder identity enforced."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from typer.testing import CliRunner

from pathdino.cli.main import app
from pathdino.embed.store import EmbeddingWriter
from pathdino.slide import SlideEncoder, SlideEncoderConfig, grid_positions, save_slide_encoder, tile_encoder_identity
from pathdino.slide.slide_embed import read_slide_embeddings

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny ops: OpenMP barriers cost more than the work

ENCODER = {
    "dir": "/runs/tile/export",
    "architecture": "vit_small_patch14_reg4_dinov2",
    "embed_dim": 12,
    "weights_sha256": "ab" * 32,
    "recipe": "cls",
    "tile_px": 224,
    "target_mpp": 0.5,
    "known_encoder": None,
}
STEP = 448


def _store(path, encoder, slides):
    writer = EmbeddingWriter(path, encoder, "tiles.zarr", ("cls",))
    for sid, (features, coords) in slides.items():
        writer.write_slide(
            sid,
            {"cls": features},
            coords,
            {"slide": {"level0_step_px": STEP}},
            {"n_tiles": len(coords), "features": ["cls"]},
        )
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("slide_embed")
    rng = np.random.default_rng(0)
    slides = {}
    for sid, n in (("a", 30), ("b", 9), ("c", 1)):
        cells = rng.permutation(64)[:n]  # an 8 x 8 grid with holes
        coords = np.stack([cells % 8, cells // 8], 1) * STEP + 1000
        slides[sid] = (rng.normal(size=(n, 12)).astype(np.float32), coords.astype(np.int64))
    emb = _store(tmp / "emb", ENCODER, slides)
    cfg = SlideEncoderConfig(
        in_dim=12, embed_dim=32, depth=2, num_heads=4, segment_lengths=(8, 16), dilation_ratios=(1, 2)
    )
    torch.manual_seed(0)
    enc = save_slide_encoder(
        SlideEncoder(cfg), cfg, tmp / "slide-enc", tile_encoder=tile_encoder_identity(ENCODER, feature_dim=12)
    )
    return tmp, emb, enc, slides


def _run(*args):
    return CliRunner().invoke(app, ["slide-embed", *map(str, args), "--no-progress", "--device", "cpu"])


def test_slide_vectors_resume_and_tiles(setup):
    tmp, emb, enc, slides = setup
    out = tmp / "out"
    result = _run(emb, "--slide-encoder", enc, "--out", out)
    assert result.exit_code == 0, result.output
    import pathdino

    model = pathdino.load_slide_encoder(enc)
    features, coords = slides["a"]
    with torch.no_grad():
        want = model(torch.from_numpy(features), grid_positions(torch.from_numpy(coords), STEP))
    got = load_file(str(out / "slides" / "a.safetensors"))
    np.testing.assert_allclose(got["cls"], want.cls[0].numpy(), atol=1e-5)
    np.testing.assert_allclose(got["mean"], want.tiles.mean(0).numpy(), atol=1e-5)
    assert "tiles" not in got
    assert sorted(read_slide_embeddings(out)) == ["a", "b", "c"]
    stamp = (out / "slides" / "b.safetensors").stat().st_mtime_ns
    again = _run(emb, "--slide-encoder", enc, "--out", out)
    assert "embedded 0 slide(s)" in again.output and "3 already done" in again.output
    assert (out / "slides" / "b.safetensors").stat().st_mtime_ns == stamp
    with_tiles = _run(emb, "--slide-encoder", enc, "--out", out, "--tiles")  # asks for more: recomputed
    assert "embedded 3 slide(s)" in with_tiles.output
    got = load_file(str(out / "slides" / "a.safetensors"))
    np.testing.assert_allclose(got["tiles"], want.tiles.numpy(), atol=1e-5)
    np.testing.assert_array_equal(got["coords"], coords)


def test_shards_split_the_slides(setup):
    tmp, emb, enc, _ = setup
    out = tmp / "sharded"
    for i in range(2):
        assert _run(emb, "--slide-encoder", enc, "--out", out, "--shard", f"{i}/2").exit_code == 0
    assert sorted(p.stem for p in (out / "slides").glob("*.safetensors")) == ["a", "b", "c"]
    bad = _run(emb, "--slide-encoder", enc, "--out", out, "--shard", "2/2")
    assert bad.exit_code == 2 and "SlideEmbedOptions.shard='2/2'" in bad.output


def test_another_tile_encoder_is_refused_unless_forced(setup):
    tmp, _, enc, slides = setup
    other = _store(tmp / "other", {**ENCODER, "weights_sha256": "cd" * 32}, {"a": slides["a"]})
    refused = _run(other, "--slide-encoder", enc, "--out", tmp / "o1")
    assert refused.exit_code == 2 and "another tile encoder" in refused.output and "--force" in refused.output
    assert not (tmp / "o1" / "slides").exists()
    forced = _run(other, "--slide-encoder", enc, "--out", tmp / "o2", "--force")
    assert forced.exit_code == 0 and (tmp / "o2" / "slides" / "a.safetensors").is_file()
