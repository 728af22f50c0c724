"""Tile stores and random-weight encoders for the embedding tests (no downloads: every encoder is built here)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SAMPLE_SLIDE = REPO / "pathdino" / "sample_data" / "CMU-1-Small-Region.svs"
TILE_PX = 56
SLIDE_SIZES = {"big": 600, "mid": 170, "small": 33, "tiny": 3, "empty": 0}


def make_store(url: Path, sizes: dict[str, int] = SLIDE_SIZES, mpp: float = 0.5) -> str:
    """Slides of the given tile counts, real H&E JPEG tiles cut from the bundled slide (cycled), at ``mpp``."""
    import shutil

    from test_train_resume import make_tile_store
    from tiling.store import TileStore
    from tiling.store_write import TileStoreWriter

    seed = make_tile_store(url.with_name(url.name + ".seed"), n_side=30, tile_px=TILE_PX)
    source = TileStore(seed).slide("cmu1")
    pool, xy = source.read_encoded(0, source.n_tiles), source.coords
    shutil.rmtree(seed)
    writer = TileStoreWriter(url)
    for k, (sid, n) in enumerate(sizes.items()):
        idx = (np.arange(n) * 7 + k) % len(pool)  # a different tile order per slide
        sw = writer.begin_slide(sid, TILE_PX, encoding="jpeg", tiles_per_shard=64)
        sw.add([pool[i] for i in idx], np.asarray(xy, dtype=np.int64)[idx].reshape(-1, 2), np.ones(n, np.float32))
        sw.commit(
            {
                "source_path": str(SAMPLE_SLIDE),
                "source_fingerprint": f"fp-{sid}",
                "slide_id": sid,
                "effective_mpp": mpp,
                "target_mpp": mpp,
                "slide_mpp": 0.499,
                "level0_tile_px": TILE_PX,
                "read_level": 0,
                "level0_width": 2220,
                "level0_height": 2967,
                "overlap_px": 0,
            }
        )
    return str(url)
