"""Doubtful stores never pass silently (issue 19, item 7): `train` and `embed` say what they use (stores, slides,
tiles, failed slides skipped, µm/px, tile size), refuse a store listed twice and mixed resolutions (unless
data.allow_mixed_resolutions), and `embed` on a store holding only failures is an error naming the store."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from pathdino.cli import app
from pathdino.data import AugmentConfig, DataConfig, validate_stores
from tiling.store import StoreError, encode_tile
from tiling.store_write import TileStoreWriter

sys.path.insert(0, str(Path(__file__).parent))
from test_train_resume import SMOKE  # noqa: E402

AUG = AugmentConfig(global_crop_px=28, local_crop_px=14, n_local_crops=2)
TILE = encode_tile(np.full((32, 32, 3), 180, np.uint8))


def write_store(
    url: Path, *, slides: dict[str, int], mpp: float = 0.5, tile_px: int = 32, failed: tuple[str, ...] = ()
) -> str:
    """Slides of ``n`` flat 32-px tiles at ``mpp``, plus failure records for ``failed``."""
    writer = TileStoreWriter(url)
    tile = TILE if tile_px == 32 else encode_tile(np.full((tile_px, tile_px, 3), 180, np.uint8))
    for sid, n in slides.items():
        w = writer.begin_slide(sid, tile_px, tiles_per_shard=8, tiles_per_chunk=8)
        w.add([tile] * n, np.zeros((n, 2), np.int64), np.ones(n))
        w.commit({"source_path": f"{sid}.svs", "target_mpp": mpp, "effective_mpp": mpp})
    for sid in failed:
        writer.record_failure(sid, {"reason": "unreadable file", "stage": "open"})
    return str(url)


def test_the_catalog_says_what_a_run_uses_with_failures_skipped(tmp_path):
    a = write_store(tmp_path / "a.zarr", slides={"s1": 5, "s2": 3}, failed=("bad1", "bad2"))
    b = write_store(tmp_path / "b.zarr", slides={"t1": 4})
    uses = validate_stores(DataConfig(stores=(a, b)), AUG).uses
    assert uses == (
        f"2 store(s) ({a}, {b}): 3 slide(s), 12 tiles, 0.5 µm/px, 32 px tiles; 2 failed slide(s) "
        "skipped (`pathdino info STORE` lists them)"
    )
    only_s = validate_stores(DataConfig(stores=(a,), slides=("s*",)), AUG).uses
    assert "2 slide(s), 8 tiles" in only_s and "failed" not in only_s  # failures the selection would not take


def test_a_store_listed_twice_is_an_error(tmp_path):
    a = write_store(tmp_path / "a.zarr", slides={"s1": 5})
    with pytest.raises(StoreError, match="listed twice in data.stores"):
        validate_stores(DataConfig(stores=(a, a)), AUG)
    with pytest.raises(StoreError, match="listed twice"):  # the same folder under another spelling
        validate_stores(DataConfig(stores=(a, f"{tmp_path}/./a.zarr/")), AUG)


@pytest.mark.parametrize("other", [{"mpp": 1.0}, {"tile_px": 48}])
def test_mixed_resolutions_are_an_error_unless_allowed(tmp_path, other):
    a = write_store(tmp_path / "a.zarr", slides={"s1": 5})
    b = write_store(tmp_path / "b.zarr", slides={"t1": 4}, **other)
    with pytest.raises(StoreError, match="mix resolutions: slide 's1' .* but slide 't1'.*allow_mixed_resolutions"):
        validate_stores(DataConfig(stores=(a, b)), AUG)
    uses = validate_stores(DataConfig(stores=(a, b), allow_mixed_resolutions=True), AUG).uses
    assert ("0.5/1 µm/px" if "mpp" in other else "32/48 px tiles") in uses
    close = write_store(tmp_path / "c.zarr", slides={"u1": 2}, mpp=0.51)  # within 5%: one resolution
    validate_stores(DataConfig(stores=(a, close)), AUG)


def test_train_check_and_train_print_what_they_use(tmp_path, caplog):
    a = write_store(tmp_path / "a.zarr", slides={"s1": 40}, failed=("bad",))
    common = [
        "--config",
        str(SMOKE),
        f"data.stores=[{a}]",
        "augment.global_crop_px=28",
        "augment.local_crop_px=14",
        "log.trackers=[]",
        f"train.output_dir={tmp_path / 'run'}",
    ]
    check = CliRunner().invoke(app, ["train", *common, "--check"])
    assert check.exit_code == 0, check.output
    assert "1 slide(s), 40 tiles, 0.5 µm/px, 32 px tiles; 1 failed slide(s) skipped" in check.output
    dup = CliRunner().invoke(app, ["train", *common, f"data.stores=[{a},{a}]", "--check"])
    assert dup.exit_code == 2 and "listed twice" in dup.output


def test_embed_on_a_store_of_failures_is_an_error_and_a_good_one_says_what_it_used(tmp_path):
    from pathdino.export import export_untrained_encoder

    encoder = export_untrained_encoder(tmp_path / "enc", tile_px=32).out_dir
    dead = write_store(tmp_path / "dead.zarr", slides={}, failed=("x", "y"))
    result = CliRunner().invoke(
        app, ["embed", dead, "-e", str(encoder), "-o", str(tmp_path / "e1"), "-j", "0", "--no-progress"]
    )
    assert result.exit_code == 2, result.output
    assert f"tile store {dead} holds no usable slide (2 failed slide(s), none complete)" in result.output
    good = write_store(tmp_path / "good.zarr", slides={"s1": 3}, failed=("x",))
    result = CliRunner().invoke(
        app, ["embed", good, "-e", str(encoder), "-o", str(tmp_path / "e2"), "-j", "0", "--no-progress"]
    )
    assert result.exit_code == 0, result.output
    assert "1 slide(s), 3 tiles, 0.5 µm/px, 32 px tiles; 1 failed slide(s) skipped" in result.output
