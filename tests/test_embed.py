"""Embedding slides: round trip against the store and a direct forward pass, CLAM-style h5, resume after an
interruption, store/encoder mismatch errors, and the embed / mil / eval commands."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from pathdino.embed import h5_dir, work_files

REPO = Path(__file__).resolve().parents[1]
SAMPLE_SLIDE = REPO / "pathdino" / "sample_data" / "CMU-1-Small-Region.svs"
TILE_PX = 56


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """Two slides (the sample slide under two names), 56-px tiles at 0.5 µm/px."""
    from tiling.config import TilingConfig
    from tiling.inputs import collect_slides
    from tiling.runner import run_tiling

    root = tmp_path_factory.mktemp("embed")
    (root / "slides").mkdir()
    for name in ("slide-a.svs", "slide-b.svs"):
        shutil.copy(SAMPLE_SLIDE, root / "slides" / name)
    url = str(root / "tiles.zarr")
    outcomes = run_tiling(collect_slides([str(root / "slides")]), url, TilingConfig(workers=1, tile_px=TILE_PX))
    assert [o.status for o in outcomes] == ["done", "done"]
    return url


@pytest.fixture(scope="module")
def encoder(tmp_path_factory) -> Path:
    from pathdino.export import export_untrained_encoder

    return export_untrained_encoder(tmp_path_factory.mktemp("enc") / "encoder", tile_px=TILE_PX).out_dir


def _options(**kw):
    from pathdino.embed import EmbedOptions

    return EmbedOptions(**{"num_workers": 0, "progress": False, "batch_size": 96, **kw})


def _reference(store_url: str, encoder_dir: Path, slide_id: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CLS and mean patch token per tile by hand: decode every tile, transform one by one, plain forward."""
    from pathdino import load_encoder
    from tiling.store import TileStore

    slide = TileStore(store_url).slide(slide_id)
    model, transform = load_encoder(encoder_dir)
    x = torch.stack([transform(t) for t in slide.read_tiles(0, slide.n_tiles)])
    with torch.no_grad():
        tokens = model.forward_features(x)
    return tokens[:, 0].numpy(), tokens[:, model.num_prefix_tokens :].mean(1).numpy(), slide.coords


def test_round_trip_zarr_and_h5(store, encoder, tmp_path):
    from pathdino.embed import EmbeddingStore, embed_store
    from pathdino.mil import H5FeatureReader

    out = tmp_path / "emb"
    report = embed_store(store, encoder, out, _options(formats=("h5",), mean_patch=True))
    assert report.embedded == ("slide-a", "slide-b") and not report.failed and not report.skipped
    emb = EmbeddingStore(out)
    assert emb.slide_ids == ["slide-a", "slide-b"] and emb.encoder["dir"] == str(encoder.resolve())
    cls_ref, patch_ref, coords = _reference(store, encoder, "slide-a")
    feats, got_coords = emb["slide-a"]
    np.testing.assert_array_equal(got_coords, coords)  # same tiles, same order as the store
    np.testing.assert_allclose(feats, cls_ref, atol=1e-5)
    np.testing.assert_allclose(EmbeddingStore(out, feature="mean_patch")["slide-a"][0], patch_ref, atol=1e-5)
    attrs = emb.slide_attrs("slide-a")
    assert attrs["slide"]["effective_mpp"] == 0.499 and attrs["embedding"]["features"] == ["cls", "mean_patch"]
    assert report.n_tiles == 2 * len(coords)

    # The h5 layout CLAM / TRIDENT read: features [N, D] float32, coords [N, 2] level-0 with patch attributes.
    with h5py.File(h5_dir(out) / "slide-a.h5", "r") as h5:
        assert h5["features"].dtype == np.float32 and h5["features"].shape == (len(coords), 64)
        np.testing.assert_array_equal(h5["coords"][:], coords)
        np.testing.assert_allclose(h5["features"][:], cls_ref, atol=1e-5)
        a = h5["coords"].attrs
        assert a["patch_size"] == TILE_PX and a["patch_size_level0"] == TILE_PX and a["patch_level"] == 0
        assert a["mpp"] == pytest.approx(0.499) and a["target_mpp"] == pytest.approx(0.5)
        assert h5.attrs["slide_id"] == "slide-a" and h5["mean_patch_features"].shape == (len(coords), 64)
    feats_h5, coords_h5 = H5FeatureReader(h5_dir(out))("slide-b")
    assert feats_h5.shape == (len(coords), 64) and coords_h5.shape == (len(coords), 2)


def test_spawned_workers_give_the_same_embeddings(store, encoder, tmp_path):
    from pathdino.embed import EmbeddingStore, embed_store

    embed_store(store, encoder, tmp_path / "w0", _options(slides=("slide-a",)))
    report = embed_store(store, encoder, tmp_path / "w1", _options(slides=("slide-a",), num_workers=1, batch_size=64))
    assert report.embedded == ("slide-a",)
    np.testing.assert_array_equal(
        EmbeddingStore(tmp_path / "w1")["slide-a"][0], EmbeddingStore(tmp_path / "w0")["slide-a"][0]
    )


def test_interrupted_run_resumes_and_skips_complete_slides(store, encoder, tmp_path, monkeypatch):
    from pathdino.embed import EmbeddingStore, embed_store
    from pathdino.embed.store import EmbeddingWriter

    out = tmp_path / "emb"
    real_write = EmbeddingWriter.commit_staged

    def killed_on_second(self, slide_id, *args, **kwargs):
        if slide_id == "slide-b":
            raise KeyboardInterrupt  # as if the process died while writing slide-b
        return real_write(self, slide_id, *args, **kwargs)

    monkeypatch.setattr(EmbeddingWriter, "commit_staged", killed_on_second)
    with pytest.raises(KeyboardInterrupt):
        embed_store(store, encoder, out, _options(formats=("h5",)))
    monkeypatch.undo()
    assert EmbeddingStore(out).slide_ids == ["slide-a"]  # only the finished slide is visible
    # Leftovers of a killed process: a staging folder of a dead pid and a temporary h5.
    (work_files(out).staging / "slide-b.999999999.deadbeef").mkdir(parents=True)
    done_file = next((out / "slides" / "slide-a" / "cls").rglob("c/*/*"))
    stamp = done_file.stat().st_mtime_ns

    report = embed_store(store, encoder, out, _options(formats=("h5",)))
    assert report.skipped == ("slide-a",) and report.embedded == ("slide-b",)
    assert done_file.stat().st_mtime_ns == stamp  # the complete slide was not rewritten
    assert not (work_files(out).staging / "slide-b.999999999.deadbeef").exists()
    np.testing.assert_allclose(EmbeddingStore(out)["slide-b"][0], _reference(store, encoder, "slide-b")[0], atol=1e-5)
    # A complete slide whose h5 went missing gets it back from the store, without recomputing.
    (h5_dir(out) / "slide-a.h5").unlink()
    again = embed_store(store, encoder, out, _options(formats=("h5",)))
    assert again.embedded == () and again.n_tiles == 0 and (h5_dir(out) / "slide-a.h5").is_file()
    # Asking for a feature the complete slides lack recomputes them.
    more = embed_store(store, encoder, out, _options(mean_patch=True, slides=("slide-a",)))
    assert more.embedded == ("slide-a",)


def test_store_encoder_mismatch_is_an_error_unless_forced(store, encoder, tmp_path):
    from pathdino.embed import EmbedError, embed_store
    from pathdino.export import export_untrained_encoder

    coarse = export_untrained_encoder(tmp_path / "enc-1mpp", tile_px=TILE_PX, target_mpp=1.0, seed=1).out_dir
    with pytest.raises(EmbedError, match=r"slide 'slide-a'.*0\.499 µm/px.*1 µm/px(.|\n)*--force"):
        embed_store(store, coarse, tmp_path / "emb", _options())
    assert not (tmp_path / "emb" / "slides" / "slide-a").exists()
    report = embed_store(store, coarse, tmp_path / "emb", _options(force=True, slides=("slide-a",)))
    assert report.forced == ("slide-a",)
    big = export_untrained_encoder(tmp_path / "enc-112", tile_px=112).out_dir
    with pytest.raises(EmbedError, match="tiles are 56 px, the encoder was trained on 112 px"):
        embed_store(store, big, tmp_path / "emb2", _options())
    # One embeddings store never mixes two encoders.
    with pytest.raises(EmbedError, match="another encoder"):
        embed_store(store, encoder, tmp_path / "emb", _options(force=True))
    with pytest.raises(EmbedError, match=r"--slides \['nope\*'\]"):
        embed_store(store, encoder, tmp_path / "emb3", _options(slides=("nope*",)))


def _cli(args: list[str]):
    from typer.testing import CliRunner

    from pathdino.cli import app

    return CliRunner().invoke(app, args)


def test_cli_embed_then_mil_on_h5(store, encoder, tmp_path):
    out = tmp_path / "emb"
    result = _cli(
        [
            "embed",
            store,
            "--encoder",
            str(encoder),
            "--out",
            str(out),
            "--format",
            "h5",
            "-j",
            "0",
            "--no-progress",
            "--slides",
            "slide-a",
        ]
    )
    assert result.exit_code == 0, result.output
    assert "embedded 1 slide(s)" in result.output and (h5_dir(out) / "slide-a.h5").is_file()
    bad = _cli(["embed", store, "--encoder", str(tmp_path / "missing"), "--out", str(out)])
    assert bad.exit_code == 2 and "missing" in bad.output

    # ABMIL through the command on a small synthetic cohort of h5 files (a few "tumour" tiles per positive bag).
    from pathdino.embed import write_h5

    rng = np.random.default_rng(0)
    lines = ["slide_id,label,split"]
    for i in range(16):
        x = rng.normal(size=(20, 8)).astype(np.float32)
        if i % 2:
            x[:3, :2] += 4.0
        write_h5(tmp_path / "bags" / f"s{i}.h5", x, np.zeros((20, 2), np.int64), {}, {})
        split = "train" if i < 8 else "val" if i < 12 else "test"
        lines.append(f"s{i},{'tumour' if i % 2 else 'normal'},{split}")
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
    result = _cli(
        [
            "mil",
            str(tmp_path / "labels.csv"),
            "--embeddings",
            str(tmp_path / "bags"),
            "--out",
            str(tmp_path / "mil"),
            "--max-epochs",
            "25",
            "--hidden-dim",
            "32",
            "--lr",
            "2e-3",
        ]
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "mil" / "metrics.json").read_text())["metrics"]
    assert metrics["test"]["balanced_accuracy"] == 1.0
    assert "test: balanced accuracy 1.000" in result.output


def test_cli_eval_with_exported_encoder_and_random_baseline(encoder, tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for label, colour in (("pink", (230, 120, 180)), ("purple", (90, 40, 140))):
        (tmp_path / "tiles" / label).mkdir(parents=True)
        for i in range(12):
            noise = rng.integers(-20, 20, (40, 40, 3))
            Image.fromarray(np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)).save(
                tmp_path / "tiles" / label / f"{i}.png"
            )
    result = _cli(
        [
            "eval",
            str(tmp_path / "tiles"),
            "--encoder",
            str(encoder),
            "--out",
            str(tmp_path / "r.json"),
            "-m",
            "knn",
            "-m",
            "linear",
            "--no-progress",
        ]
    )
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["encoder"]["encoder_dir"] == str(encoder) and report["feature_dim"] == 64
    assert report["methods"]["knn"]["by_k"]["20"]["balanced_accuracy"] == 1.0
    result = _cli(
        [
            "eval",
            str(tmp_path / "tiles"),
            "--arch",
            "vit_tiny_patch16_224",
            "--img-size",
            "32",
            "--out",
            str(tmp_path / "b.json"),
            "-m",
            "knn",
            "--no-progress",
        ]
    )
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "b.json").read_text())["encoder"]["weights"] == "random"
    both = _cli(["eval", str(tmp_path / "tiles"), "--arch", "x", "--encoder", str(encoder), "--out", "r.json"])
    assert both.exit_code == 2 and "exactly one of --encoder" in both.output


def test_a_corrupt_slide_fails_alone(store, encoder, tmp_path):
    """Undecodable tiles fail their slide (recorded, exit code 1 from the CLI); the other slides are embedded."""
    from pathdino.embed import EmbeddingStore, embed_store
    from tiling.store import TileStore
    from tiling.store_write import TileStoreWriter

    src = TileStore(store).slide("slide-a")
    writer = TileStoreWriter(str(tmp_path / "mixed.zarr"))
    for sid, tiles in (("bad", [b"not a jpeg"] * 5), ("good", src.read_encoded(0, 5))):
        slide = writer.begin_slide(sid, TILE_PX)
        slide.add(tiles, src.coords[:5], np.ones(5, np.float32))
        slide.commit({**src.attrs, "slide_id": sid, "source_fingerprint": sid})
    report = embed_store(str(tmp_path / "mixed.zarr"), encoder, tmp_path / "emb", _options(batch_size=2))
    assert report.embedded == ("good",) and set(report.failed) == {"bad"}
    assert "tiles 0:2" in report.failed["bad"]
    emb = EmbeddingStore(tmp_path / "emb")
    assert emb.slide_ids == ["good"] and "bad" in emb.meta["failures"]
    np.testing.assert_allclose(emb["good"][0], _reference(store, encoder, "slide-a")[0][:5], atol=1e-5)
    result = _cli(
        [
            "embed",
            str(tmp_path / "mixed.zarr"),
            "--encoder",
            str(encoder),
            "--out",
            str(tmp_path / "emb"),
            "-j",
            "0",
            "--no-progress",
        ]
    )
    assert result.exit_code == 1 and "failed bad" in result.output


def test_default_decode_workers_never_exceed_the_cores(monkeypatch):
    import os

    from pathdino.embed.runner import EmbedOptions, default_decode_workers

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert default_decode_workers() == 2 and EmbedOptions().num_workers == 2
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    assert default_decode_workers() == 4
    assert EmbedOptions(num_workers=6).num_workers == 6  # an explicit count is kept


def test_mil_uses_the_encoders_tile_embedding_by_default(store, encoder, tmp_path):
    # The default is what the h5 files' "features" hold (the recipe: CLS ++ mean patch token for Virchow2), not raw
    # CLS; an explicit cls / mean_patch needs the embeddings store.
    import inspect

    from pathdino.cli.main import mil
    from pathdino.cli.use import _feature_source
    from pathdino.embed import EmbeddingStore
    from pathdino.mil import H5FeatureReader

    assert inspect.signature(mil).parameters["feature"].default.default == "features"
    out = tmp_path / "emb"
    assert (
        _cli(
            [
                "embed",
                store,
                "--encoder",
                str(encoder),
                "--out",
                str(out),
                "--format",
                "zarr",
                "--format",
                "h5",
                "-j",
                "0",
                "--no-progress",
                "--slides",
                "slide-a",
            ]
        ).exit_code
        == 0
    )
    source = _feature_source(out, "features")
    assert isinstance(source, EmbeddingStore) and source.feature == "features"
    assert isinstance(_feature_source(h5_dir(out), "features"), H5FeatureReader)
    with pytest.raises(ValueError, match="leave --feature out"):
        _feature_source(h5_dir(out), "cls")


def _walk_with_plain_zarr(out: Path, *, warnings_as_errors: bool = True) -> tuple[list[str], list[str]]:
    """Every array of the store found by plain zarr walking the whole hierarchy, and the warnings it gave (zarr
    warns about every object inside the folder that is not part of the hierarchy): errors by default."""
    import warnings

    import zarr

    with warnings.catch_warnings(record=not warnings_as_errors) as caught:
        warnings.simplefilter("error" if warnings_as_errors else "always")
        root = zarr.open_group(str(out), mode="r")
        arrays = sorted(name for name, member in root.members(max_depth=None) if isinstance(member, zarr.Array))
    return arrays, [str(w.message) for w in caught or []]


def test_embeddings_store_opens_clean_in_plain_zarr(store, encoder, tmp_path):
    from pathdino.embed import embed_store, read_commits

    out = tmp_path / "emb"
    embed_store(store, encoder, out, _options(formats=("zarr", "h5")))
    arrays, _ = _walk_with_plain_zarr(out)
    assert arrays == [f"slides/{s}/{a}" for s in ("slide-a", "slide-b") for a in ("cls", "coords")]
    work = work_files(out)
    assert work.root == tmp_path / "emb.pathdino" and not work.legacy  # the work files are beside the store
    assert (work.h5 / "slide-a.h5").is_file() and work.lock.is_file() and len(read_commits(out)) == 2
    assert sorted(p.name for p in out.iterdir()) == ["slides", "zarr.json"]


def test_a_store_of_the_old_layout_keeps_its_work_files_inside(store, encoder, tmp_path):
    """Stores written before the work files moved beside them: their journal, h5 files and resume state are found
    inside, and a rerun adds nothing beside them."""
    from pathdino.embed import embed_store, read_commits

    out = tmp_path / "emb"
    embed_store(store, encoder, out, _options(formats=("zarr", "h5")))
    beside = work_files(out).root
    for new, old in (("lock", ".pathdino.lock"), ("commits.jsonl", "commits.jsonl"), ("h5", "h5")):
        shutil.move(beside / new, out / old)
    shutil.rmtree(beside)
    work = work_files(out)
    assert work.legacy and h5_dir(out) == out / "h5" and len(read_commits(out)) == 2
    (out / "h5" / "slide-b.h5").unlink()
    again = embed_store(store, encoder, out, _options(formats=("zarr", "h5")))
    assert again.skipped == ("slide-a", "slide-b") and again.n_tiles == 0
    assert (out / "h5" / "slide-b.h5").is_file() and not beside.exists()
    _, warned = _walk_with_plain_zarr(out, warnings_as_errors=False)
    assert len(warned) >= 3, warned  # what the old layout did to plain zarr (lock, journal, h5)
