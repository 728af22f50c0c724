"""The bundled slide end to end with the documented commands: tile -> train -> export -> embed (`pathdino demo`'s
stages) -> `pathdino slide-train` -> `pathdino export` -> `pathdino slide-embed`, in one process on a CPU."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_SLIDE = ROOT / "pathdino" / "sample_data" / "CMU-1-Small-Region.svs"
TINY = [
    "model.embed_dim=32",
    "model.depth=2",
    "model.num_heads=4",
    "objective.decoder_dim=16",
    "objective.decoder_depth=1",
    "objective.decoder_heads=2",
    "data.max_tokens_per_slide=256",
    "data.tokens_per_pack=256",
    "train.packs_per_step=1",
    "train.total_steps=4",
    "optim.warmup_steps=1",
    "train.checkpoint_every_steps=2",
    "log.every_steps=2",
    "log.trackers=[]",
]


def test_bundled_slide_from_tiles_to_slide_embeddings(tmp_path, one_thread):
    from pathdino.cli.demo import run_demo
    from pathdino.cli.main import app
    from pathdino.embed import EmbeddingStore

    demo = tmp_path / "demo"
    assert run_demo(demo, workers=1, sample_slide=SAMPLE_SLIDE, train_steps=2) == 0
    embeddings = demo / "embeddings"
    store = EmbeddingStore(embeddings)
    (slide_id,) = store.slide_ids
    n_tiles = len(store[slide_id][0])
    runner = CliRunner()

    run = tmp_path / "slide_run"
    args = [
        "slide-train",
        "--config",
        str(ROOT / "configs" / "slide" / "small.yaml"),
        f"data.embeddings=[{embeddings}]",
        f"train.output_dir={run}",
        *TINY,
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert all(r["tiles"] == min(n_tiles, 256) for r in records if "loss" in r)  # cropped to 256 tiles

    encoder = tmp_path / "slide_encoder"
    result = runner.invoke(app, ["export", str(run), "--out", str(encoder)])
    assert result.exit_code == 0, result.output
    card = json.loads((encoder / "config.json").read_text())
    assert card["tile_encoder"]["weights_sha256"] == store.encoder["weights_sha256"]

    out = tmp_path / "slide_embeddings"
    result = runner.invoke(
        app, ["slide-embed", str(embeddings), "--slide-encoder", str(encoder), "--out", str(out), "--tiles"]
    )
    assert result.exit_code == 0, result.output
    vectors = load_file(out / "slides" / f"{slide_id}.safetensors")
    assert vectors["cls"].shape == (32,) and vectors["mean"].shape == (32,)
    assert vectors["tiles"].shape == (n_tiles, 32)  # slide-embed reads the whole slide, uncropped
