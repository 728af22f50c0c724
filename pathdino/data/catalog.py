"""Which slides of which stores a training run reads: opening, selecting and validating stores up front.

The catalog is a small picklable description (store URLs, slide ids, tile counts, tile sizes, shard sizes). It is
built once in the training process and sent to the DataLoader workers, which open the stores themselves.
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from pathdino.data.config import AugmentConfig, DataConfig
from tiling.store import (
    TILE_ENCODINGS,
    StoreError,
    TileStore,
    describe_use,
    is_remote_url,
    local_root,
    slide_mpp,
)

log = logging.getLogger("pathdino.data")
_GLOB_CHARS = set("*?[")
MIXED_MPP_TOLERANCE = 0.05  # relative µm/px difference still counted as one resolution (as pathdino embed's default)


@dataclass(frozen=True)
class Catalog:
    """The selected slides, one row per slide, in a fixed order (stores in config order, slides sorted).

    Attributes:
        store_urls: the stores, in the order of ``DataConfig.stores``.
        store_index: int64 [S], the store of each slide.
        slide_ids: the id of each slide.
        n_tiles: int64 [S], tiles per slide.
        tile_px: int64 [S], tile side per slide.
        tiles_per_shard: int64 [S], shard length per slide.
        encodings: tile encoding per slide (``"jpeg"`` or ``"png"``).
        fingerprint: a hash of the selection (stores, slides, tile counts): resuming checks it.
        uses: one line saying what a run uses (stores, slides, tiles, failed slides skipped, µm/px, tile size).
    """

    store_urls: tuple[str, ...]
    store_index: np.ndarray
    slide_ids: tuple[str, ...]
    n_tiles: np.ndarray
    tile_px: np.ndarray
    tiles_per_shard: np.ndarray
    encodings: tuple[str, ...]
    fingerprint: str
    uses: str = ""

    @property
    def n_slides(self) -> int:
        return len(self.slide_ids)

    @property
    def total_tiles(self) -> int:
        return int(self.n_tiles.sum())

    @property
    def max_tile_px(self) -> int:
        return int(self.tile_px.max())

    def describe(self, slide: int) -> str:
        return f"slide {self.slide_ids[slide]!r} of {self.store_urls[int(self.store_index[slide])]}"


def _select(ids: list[str], patterns: tuple[str, ...] | None) -> tuple[list[str], set[str]]:
    """Ids matching any pattern (all ids when patterns is None), and the patterns that matched something."""
    if patterns is None:
        return list(ids), set()
    chosen: list[str] = []
    used: set[str] = set()
    for sid in ids:
        hit = False
        for pat in patterns:
            if (pat == sid) if not (_GLOB_CHARS & set(pat)) else fnmatch.fnmatchcase(sid, pat):
                used.add(pat)
                hit = True
        if hit:
            chosen.append(sid)
    return chosen, used


def _slide_meta(store: TileStore, slide_id: str) -> tuple[int, int, str, float | None]:
    slide = store.slide(slide_id)
    return slide.tile_px, slide.tiles_per_shard, slide.encoding, slide_mpp(slide)


def _check_distinct(urls: tuple[str, ...]) -> None:
    """The same store twice would sample every tile twice: an error (``store_weights`` weights a store)."""
    seen: dict[str, str] = {}
    for url in urls:
        key = str(local_root(url).resolve()) if not is_remote_url(url) else url.rstrip("/")
        if key in seen:
            raise StoreError(
                f"tile store {url} is listed twice in data.stores (as {seen[key]!r} and {url!r}): every "
                "tile would be drawn twice; list it once (data.store_weights gives a store a larger "
                "share)"
            )
        seen[key] = url


def _check_one_resolution(
    rows: list[tuple[int, str, int]], metas: list[tuple[int, int, str, float | None]], data: DataConfig
) -> None:
    """Slides at other µm/px or tile sizes than the first one are an error unless data.allow_mixed_resolutions."""
    if data.allow_mixed_resolutions:
        return
    first = None
    for (si, sid, _), (tile_px, _, _, mpp) in zip(rows, metas):
        where = f"slide {sid!r} of {data.stores[si]} ({tile_px} px tiles at {_mpp_text(mpp)})"
        if first is None:
            first = (where, tile_px, mpp)
            continue
        _, px0, mpp0 = first
        if tile_px != px0 or (mpp is not None and mpp0 is not None and abs(mpp - mpp0) > MIXED_MPP_TOLERANCE * mpp0):
            raise StoreError(
                f"data.stores mix resolutions: {first[0]} but {where}; train on stores tiled at one "
                "µm/px and tile size, or set data.allow_mixed_resolutions=true to mix them on purpose"
            )


def _mpp_text(mpp: float | None) -> str:
    return "unknown µm/px" if mpp is None else f"{mpp:g} µm/px"


def _failed_selected(store: TileStore, patterns: tuple[str, ...] | None) -> int:
    """Failed slides of ``store`` that the selection would have taken (skipped: they have no tiles to serve)."""
    return len(_select(sorted(store.failures), patterns)[0])


def validate_stores(data: DataConfig, aug: AugmentConfig) -> Catalog:
    """Open every store, select the slides and check they can feed this recipe; returns the `Catalog`.

    Raises `StoreError` naming the store or slide for: a path that is not a tile store, an unknown store format
    version, an empty store, a slide pattern that matches nothing, a slide with no tiles (unless
    ``data.skip_empty_slides``), an unknown tile encoding, crops larger than a slide's tiles, a store listed twice,
    and slides at different µm/px or tile sizes (unless ``data.allow_mixed_resolutions``).
    """
    _check_distinct(data.stores)
    stores: list[TileStore] = []
    for url in data.stores:
        store = TileStore(url)  # raises StoreError for missing stores and unknown format versions
        if not store.slide_ids:
            raise StoreError(
                f"tile store {url} holds no complete slides: tile slides into it with "
                f"`pathdino tile SLIDES --out {url}`, or remove it from data.stores"
            )
        stores.append(store)

    rows: list[tuple[int, str, int]] = []
    used: set[str] = set()
    for si, store in enumerate(stores):
        chosen, matched = _select(store.slide_ids, data.slides)
        used |= matched
        for sid in chosen:
            n = store.n_tiles(sid)
            if n == 0:
                if data.skip_empty_slides:
                    log.warning("skipping slide %r of %s: it has no tiles", sid, store.url)
                    continue
                raise StoreError(
                    f"slide {sid!r} in tile store {store.url} has no tiles (no tissue found?): "
                    "exclude it with data.slides, or set data.skip_empty_slides=True"
                )
            rows.append((si, sid, n))
    if data.slides is not None:
        unmatched = [p for p in data.slides if p not in used]
        if unmatched:
            example = ", ".join(repr(s) for s in stores[0].slide_ids[:3])
            raise StoreError(
                f"data.slides entries {unmatched} match no complete slide in stores "
                f"{list(data.stores)} (slides look like {example}); `pathdino info STORE` lists them"
            )
    if not rows:
        raise StoreError(f"no slides with tiles selected from stores {list(data.stores)}")

    # Per-slide array metadata (tile size, shard length, encoding) lives in each slide's group: read in parallel
    # because object stores answer slowly one request at a time.
    with ThreadPoolExecutor(max_workers=min(16, len(rows))) as pool:
        metas = list(pool.map(lambda r: _slide_meta(stores[r[0]], r[1]), rows))

    for (si, sid, _), (tile_px, _, encoding, _) in zip(rows, metas):
        where = f"slide {sid!r} of tile store {data.stores[si]}"
        if encoding not in TILE_ENCODINGS:
            raise StoreError(f"{where} has tile encoding {encoding!r}; this pathdino reads {TILE_ENCODINGS}")
        for name, px in (("global_crop_px", aug.global_crop_px), ("local_crop_px", aug.local_crop_px)):
            if name == "local_crop_px" and aug.n_local_crops == 0:
                continue
            if px > tile_px:
                raise StoreError(
                    f"AugmentConfig.{name}={px} is larger than the {tile_px}-px tiles of {where}: "
                    f"use crops of at most {tile_px} px or re-tile with --tile-px {px}"
                )

    _check_one_resolution(rows, metas, data)
    digest = hashlib.sha1()
    for si, sid, n in rows:
        digest.update(f"{data.stores[si]}\0{sid}\0{n}\n".encode())
    return Catalog(
        store_urls=tuple(data.stores),
        store_index=np.array([r[0] for r in rows], dtype=np.int64),
        slide_ids=tuple(r[1] for r in rows),
        n_tiles=np.array([r[2] for r in rows], dtype=np.int64),
        tile_px=np.array([m[0] for m in metas], dtype=np.int64),
        tiles_per_shard=np.array([m[1] for m in metas], dtype=np.int64),
        encodings=tuple(m[2] for m in metas),
        fingerprint=digest.hexdigest()[:16],
        uses=describe_use(
            stores=tuple(data.stores),
            n_slides=len(rows),
            n_tiles=sum(r[2] for r in rows),
            n_failed=sum(_failed_selected(s, data.slides) for s in stores),
            mpps=[m[3] for m in metas],
            tile_pxs=[m[0] for m in metas],
        ),
    )
