"""The tiler's configuration: one typed dataclass, filled from `configs/tiling/*.yaml` and/or CLI flags."""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from typing import Literal

from tiling.configio import ConfigError, to_dict
from tiling.pixel_qc import PixelQCConfig
from tiling.tissue import TissueConfig


@dataclass(frozen=True)
class TilingConfig:
    """What `pathdino tile` does; every default is documented here and in docs/tiling.md."""

    target_mpp: float = 0.5
    """Output resolution in µm per pixel (0.5 ≈ "20x")."""
    tile_px: int = 224
    """Output tile side in pixels."""
    overlap_px: int = 0
    """Overlap between neighbouring tiles, in output pixels (step = tile_px - overlap_px)."""
    mpp_tolerance: float = 0.05
    """A pyramid level whose mpp is within this relative distance of target_mpp is read as is."""
    backend: Literal["auto", "openslide", "tiffslide"] = "auto"
    """Slide reader; auto picks the one that sees all pyramid levels."""
    tissue: TissueConfig = field(default_factory=TissueConfig)
    """Tissue mask and per-tile tissue threshold (see tiling/tissue.py)."""
    pixel_qc: PixelQCConfig = field(default_factory=PixelQCConfig)
    """Per-tile white/black/blur checks on the decoded pixels (see tiling/pixel_qc.py)."""
    encoding: Literal["jpeg", "png"] = "jpeg"
    """Tile encoding in the store: jpeg (lossy, ~8x smaller) or png (lossless)."""
    jpeg_quality: int = 90
    """JPEG quality (1-100) when encoding is jpeg."""
    jpeg_subsampling: Literal["420", "444"] = "420"
    """JPEG chroma subsampling: 420 is faster and smaller; 444 keeps colour detail (see tiling.store.encode_tile)."""
    tiles_per_shard: int = 256
    """Tiles per shard file (one file per shard)."""
    tiles_per_chunk: int = 16
    """Tiles per chunk inside a shard (the unit of partial reads)."""
    block_tiles: int = 8
    """Tiles are read in blocks of block_tiles x block_tiles grid cells (one region read per block)."""
    workers: int = 0
    """Worker processes; 0 means one per CPU core."""
    qc_images: bool = True
    """Write qc/<slide_id>.jpg (thumbnail, tissue outline, kept tiles)."""
    tiff_fast_path: bool = True
    """Decode TIFF source tiles directly (each once) instead of going through the reader's read_region."""
    max_decode_failure_fraction: float = 0.05
    """A slide fails (DecodeFailuresError) when more than this share of its candidate tiles could not be read
    because source tiles fail to decode (a damaged file); up to it, those tiles are dropped, counted
    (`n_decode_failures`) and shown in the summary and `pathdino info`. 0: any unreadable tile fails the slide;
    1: never. 5% keeps a slide with a few corrupt source tiles (each costs the ~4 output tiles it touches) and
    fails one whose file is damaged throughout."""
    virtual_levels: bool = True
    """Offer every pyramid level decoded at 1/2, 1/4 and 1/8 as a level too (JPEG and JPEG 2000 reduce while
    decoding, other codecs by an area mean), under the same mpp_tolerance rule as stored levels: a 40x scan at
    0.2527 µm/px is read at 1/2 as 0.5054 µm/px instead of being resampled by 1.98. false: stored levels only."""

    def __post_init__(self) -> None:
        problems = []
        if not (math.isfinite(self.target_mpp) and self.target_mpp > 0):
            problems.append(f"target_mpp must be a positive number of µm/px, got {self.target_mpp}")
        if not 0 <= self.max_decode_failure_fraction <= 1:
            problems.append(f"max_decode_failure_fraction must be in [0, 1], got {self.max_decode_failure_fraction}")
        if self.tile_px < 8:
            problems.append(f"tile_px must be >= 8, got {self.tile_px}")
        if not 0 <= self.overlap_px < self.tile_px:
            problems.append(f"overlap_px must be in [0, tile_px), got {self.overlap_px}")
        if not 0 <= self.mpp_tolerance < 0.5:  # NaN fails every comparison, so it is caught too
            problems.append(f"mpp_tolerance must be in [0, 0.5), got {self.mpp_tolerance}")
        if not 1 <= self.jpeg_quality <= 100:
            problems.append(f"jpeg_quality must be in [1, 100], got {self.jpeg_quality}")
        if self.tiles_per_chunk < 1 or self.tiles_per_shard % self.tiles_per_chunk:
            problems.append(
                f"tiles_per_shard ({self.tiles_per_shard}) must be a positive multiple of "
                f"tiles_per_chunk ({self.tiles_per_chunk})"
            )
        if self.block_tiles < 1:
            problems.append(f"block_tiles must be >= 1, got {self.block_tiles}")
        if self.workers < 0:
            problems.append(f"workers must be >= 0, got {self.workers}")
        if problems:  # all of them at once: a config file is fixed in one go
            raise ConfigError("TilingConfig: " + "; ".join(problems))

    @property
    def n_workers(self) -> int:
        return self.workers or max(
            1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        )

    def params_key(self) -> str:
        """A hash of every parameter that changes the tiles written; resume compares it with the store's."""
        params = to_dict(self)
        # run-only settings: they change how a run goes or what it accepts, never the tiles written
        for run_only in ("workers", "qc_images", "max_decode_failure_fraction"):
            params.pop(run_only)
        return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]
