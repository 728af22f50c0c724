"""Synthetic embeddings stores for the slide-pretraining tests (written with the real ``EmbeddingWriter``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

STRIDE_PX = 224  # level-0 distance between neighbouring tiles
ENCODER = {"dir": "synthetic-tile-encoder", "weights_sha256": "0" * 64, "recipe": "cls", "embed_dim": 16}


def tissue_coords(rng: np.random.Generator, *, rows: int, cols: int, keep: float) -> np.ndarray:
    """Level-0 (x, y) of the kept cells of a rows x cols grid (a slide with holes), in a shuffled order."""
    cells = np.argwhere(rng.random((rows, cols)) < keep)[:, ::-1]  # (col, row)
    if len(cells) == 0:
        cells = np.zeros((1, 2), dtype=np.int64)
    rng.shuffle(cells)
    return (cells * STRIDE_PX + np.array([1000, 3000])).astype(np.int64)


def write_store(path: Path, slides: dict[str, tuple[np.ndarray, np.ndarray]], encoder: dict | None = None) -> Path:
    """An embeddings store holding ``slides``: id -> (features [N, D], level-0 coords [N, 2])."""
    from unittest import mock

    from pathdino.embed.store import EmbeddingWriter

    # Durability is not under test here, and fsync per file costs seconds on a busy CI disk.
    with mock.patch("os.fsync"):
        writer = EmbeddingWriter(path, encoder or ENCODER, tile_store="synthetic", features=("cls",))
        for sid, (features, coords) in slides.items():
            attrs = {
                "slide": {"slide_id": sid, "level0_step_px": STRIDE_PX, "level0_tile_px": STRIDE_PX},
                "embedding": {"encoder": encoder or ENCODER},
            }
            writer.write_slide(sid, {"cls": np.asarray(features, np.float32)}, coords, attrs, {"features": ["cls"]})
    return path


def random_store(
    path: Path, *, n_slides: int = 12, dim: int = 16, seed: int = 0, sizes: tuple[int, int] = (4, 14)
) -> Path:
    """Slides of random sizes (grids of sizes[0]..sizes[1] on a side, ~70% tissue) with random features."""
    rng = np.random.default_rng(seed)
    slides = {}
    for i in range(n_slides):
        side = int(rng.integers(*sizes))
        coords = tissue_coords(rng, rows=side, cols=side + 2, keep=0.7)
        slides[f"slide_{i:03d}"] = (rng.normal(size=(len(coords), dim)).astype(np.float32), coords)
    return write_store(path, slides)
