"""``pathdino embed``: every tile of every slide of a tile store through an exported encoder.

Per slide: the CLS embedding (optionally the mean patch token) of each tile, in the store's tile order, with its
level-0 coordinates and the slide's provenance, written atomically into an embeddings store (``store.py``) and,
with ``formats=("zarr", "h5")``, a CLAM/TRIDENT-style HDF5. Slides already complete with the same encoder, tile
data and features are skipped, so an interrupted run resumes where it stopped. Decoding runs in DataLoader workers
ahead of the model; the forward runs under bf16 autocast on GPUs.
"""

from __future__ import annotations

import fnmatch
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pathdino.embed.loader import make_loader, plan_units
from pathdino.embed.store import (
    H5_DIR,
    EmbeddingStore,
    EmbeddingWriter,
    EmbedError,
    write_h5,
)
from pathdino.export.load import EncoderInfo, load_encoder, read_encoder_config
from tiling import __version__
from tiling.fsio import file_sha256, now_iso
from tiling.store import StoreSlide, TileStore

log = logging.getLogger(__name__)
FORMATS = ("zarr", "h5")
PRECISIONS = ("auto", "bf16", "fp32")


@dataclass(frozen=True)
class EmbedOptions:
    """Knobs of :func:`embed_store` (defaults suit one GPU; the CLI exposes each as a flag)."""

    batch_size: int = 256  # tiles per forward pass (and per decoding work unit)
    num_workers: int = 4  # decoding processes (spawned); 0 decodes in the main process
    device: str | None = None  # None: "cuda" when available, else "cpu"
    precision: str = "auto"  # "auto": bf16 autocast on CUDA, fp32 on CPU; or "bf16" / "fp32" everywhere
    mean_patch: bool = False  # also store the mean patch token per tile ("mean_patch")
    formats: tuple[str, ...] = ("zarr",)  # add "h5" for one CLAM/TRIDENT-style HDF5 per slide under <out>/h5/
    slides: tuple[str, ...] | None = None  # slide ids or fnmatch patterns; None: every complete slide
    force: bool = False  # embed slides whose tile size or µm/px disagree with the encoder's
    overwrite: bool = False  # recompute slides that are already complete
    mpp_tolerance: float = 0.05  # relative µm/px difference accepted between store and encoder
    progress: bool = True  # rich progress bar

    def __post_init__(self) -> None:
        object.__setattr__(self, "formats", tuple(dict.fromkeys(("zarr", *self.formats))))
        bad = [f for f in self.formats if f not in FORMATS]
        if bad:
            raise EmbedError(f"unknown --format {bad}; choose from {FORMATS}")
        if self.precision not in PRECISIONS:
            raise EmbedError(f"unknown precision {self.precision!r}; choose from {PRECISIONS}")
        if self.batch_size < 1 or self.num_workers < 0:
            raise EmbedError(f"batch_size must be >= 1 and num_workers >= 0 (got {self.batch_size}, "
                             f"{self.num_workers})")
        if isinstance(self.slides, str):
            object.__setattr__(self, "slides", (self.slides,))

    @property
    def features(self) -> tuple[str, ...]:
        return ("cls", "mean_patch") if self.mean_patch else ("cls",)


@dataclass(frozen=True)
class EmbedReport:
    out: Path
    embedded: tuple[str, ...]  # slides computed in this run
    skipped: tuple[str, ...]  # already complete (h5 files re-written from the store when missing)
    failed: dict[str, str] = field(default_factory=dict)  # slide -> reason
    n_tiles: int = 0  # tiles embedded in this run
    seconds: float = 0.0  # wall time of the embedding loop: worker start, decoding, model, writing (not model load)
    forced: tuple[str, ...] = ()  # slides embedded despite a tile-size / µm/px mismatch
    startup_s: float = 0.0  # part of `seconds` spent before the first batch arrived (worker start, first reads)

    @property
    def tiles_per_s(self) -> float:
        return self.n_tiles / self.seconds if self.seconds > 0 else 0.0


def check_compatibility(info: EncoderInfo, slides: dict[str, StoreSlide], mpp_tolerance: float) -> dict[str, str]:
    """``slide_id -> what is wrong`` for slides whose tile size or µm/px differ from what the encoder was trained on.
    """
    problems = {}
    for sid, slide in slides.items():
        issues = []
        if info.tile_px is not None and slide.tile_px != info.tile_px:
            issues.append(f"tiles are {slide.tile_px} px, the encoder was trained on {info.tile_px} px")
        mpp = slide.attrs.get("effective_mpp", slide.attrs.get("target_mpp"))
        if info.target_mpp is not None and mpp is not None:
            rel = abs(float(mpp) - info.target_mpp) / info.target_mpp
            if rel > mpp_tolerance:
                issues.append(f"tiles are {float(mpp):.4g} µm/px, the encoder's {info.target_mpp:.4g} µm/px "
                              f"({rel:.0%} off, tolerance {mpp_tolerance:.0%})")
        if issues:
            problems[sid] = "; ".join(issues)
    return problems


def encode_tokens(model, x: torch.Tensor, mean_patch: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """CLS embedding [B, D] (what ``model(x)`` returns) and, if asked, the mean patch token [B, D]."""
    tokens = model.forward_features(x)
    cls = tokens[:, 0]
    patch = tokens[:, model.num_prefix_tokens:].mean(1) if mean_patch else None
    return cls, patch


def _select(store: TileStore, patterns: tuple[str, ...] | None) -> list[str]:
    ids = store.slide_ids
    if patterns is None:
        return ids
    unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(s, p) for s in ids)]
    if unmatched:
        raise EmbedError(f"--slides {unmatched} match no complete slide of {store.url} "
                         f"(run `pathdino info {store.url}`)")
    return [s for s in ids if any(fnmatch.fnmatchcase(s, p) for p in patterns)]


def _encoder_meta(info: EncoderInfo) -> dict[str, Any]:
    sha = info.weights_sha256 or file_sha256(info.path / "model.safetensors")
    return {"dir": str(info.path.resolve()), "architecture": info.architecture, "weights_sha256": sha,
            "embed_dim": info.embed_dim, "tile_px": info.tile_px, "target_mpp": info.target_mpp,
            "input_px": info.input_px, "training_step": info.pathdino.get("training", {}).get("step")}


def _index_entry(store: TileStore, slide: StoreSlide, features: tuple[str, ...]) -> dict[str, Any]:
    entry = store.entries[slide.slide_id]
    return {"source_fingerprint": entry.fingerprint, "tile_params_key": slide.attrs.get("params_key"),
            "tiles_committed": entry.committed, "n_tiles": slide.n_tiles, "features": list(features)}


def _up_to_date(done: dict[str, Any] | None, wanted: dict[str, Any]) -> bool:
    if done is None:
        return False
    same = all(done.get(k) == wanted[k] for k in ("source_fingerprint", "tile_params_key", "tiles_committed",
                                                  "n_tiles"))
    return same and set(wanted["features"]) <= set(done.get("features", []))


def _h5_attrs(slide: StoreSlide, encoder: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    a = slide.attrs
    coords_attrs = {
        "patch_size": int(slide.tile_px),  # at the store's µm/px (TRIDENT's convention)
        "patch_size_level0": round(float(a.get("level0_tile_px", slide.tile_px))),
        "patch_level": a.get("read_level"), "mpp": a.get("effective_mpp"), "target_mpp": a.get("target_mpp"),
        "slide_mpp": a.get("slide_mpp"), "overlap": a.get("overlap_px"),
        "level0_width": a.get("level0_width"), "level0_height": a.get("level0_height"), "name": slide.slide_id,
    }
    file_attrs = {"slide_id": slide.slide_id, "source_path": a.get("source_path"), "features": "cls",
                  "encoder": encoder["dir"], "architecture": encoder["architecture"],
                  "weights_sha256": encoder["weights_sha256"]}
    return coords_attrs, file_attrs


def _write_h5_from_store(writer: EmbeddingWriter, slide: StoreSlide, encoder: dict[str, Any]) -> None:
    emb = EmbeddingStore(writer.path)
    group = emb.group(slide.slide_id)
    extra = {"mean_patch_features": np.asarray(group["mean_patch"][:])} if "mean_patch" in group else None
    coords_attrs, file_attrs = _h5_attrs(slide, encoder)
    write_h5(writer.h5_path(slide.slide_id), np.asarray(group["cls"][:]), np.asarray(group["coords"][:]),
             coords_attrs, file_attrs, extra)


def embed_store(store_url: str | Path, encoder_dir: str | Path, out: str | Path,
                options: EmbedOptions = EmbedOptions()) -> EmbedReport:
    """Embed every (selected) slide of a tile store; resumable. Returns what was embedded, skipped and failed."""
    store = TileStore(str(store_url))
    info = read_encoder_config(encoder_dir)
    slide_ids = _select(store, options.slides)
    slides = {sid: store.slide(sid) for sid in slide_ids}
    if info.tile_px is None or info.target_mpp is None:
        log.warning("encoder %s does not record the tile size / µm/px it was trained at: the store is not checked "
                    "against it (re-export with --tile-px and --mpp)", info.path)
    problems = check_compatibility(info, slides, options.mpp_tolerance)
    lines = [f"slide {sid!r}: {why}" for sid, why in problems.items()]
    if problems and not options.force:
        shown = "\n  ".join(lines[:10]) + (f"\n  ... and {len(lines) - 10} more" if len(lines) > 10 else "")
        raise EmbedError(f"tile store {store.url} does not match encoder {info.path}:\n  {shown}\n"
                         "embed a store tiled at the encoder's tile size and µm/px (`pathdino tile --tile-px ... "
                         "--target-mpp ...`), or pass --force to embed anyway")
    forced = tuple(problems)
    for line in lines:
        log.warning("--force: %s", line)
    encoder = _encoder_meta(info)
    writer = EmbeddingWriter(out, encoder, store.url, options.features)
    writer.set_features(options.features)
    wanted = {sid: _index_entry(store, s, options.features) for sid, s in slides.items()}
    done_meta = writer.meta().get("slides", {})
    pending, skipped = [], []
    for sid in slide_ids:
        if not options.overwrite and _up_to_date(done_meta.get(sid), wanted[sid]):
            skipped.append(sid)
            if "h5" in options.formats and not writer.h5_path(sid).is_file():
                _write_h5_from_store(writer, slides[sid], encoder)
        else:
            if sid in done_meta:
                writer.forget(sid)
            pending.append(sid)
    failed, n_done, seconds, startup = _run(store, slides, pending, info, encoder, writer, options, set(forced))
    embedded = tuple(s for s in pending if s not in failed)
    return EmbedReport(out=writer.path, embedded=embedded, skipped=tuple(skipped), failed=failed, n_tiles=n_done,
                       seconds=seconds, forced=tuple(s for s in forced if s in embedded), startup_s=startup)


def _progress(enabled: bool, total: int):
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[rate]} tiles/s"), TimeRemainingColumn(), disable=not enabled)
    return bar, bar.add_task("embedding", total=total, rate="-")


def _run(store: TileStore, slides: dict[str, StoreSlide], pending: list[str], info: EncoderInfo,
         encoder: dict[str, Any], writer: EmbeddingWriter, options: EmbedOptions,
         forced: set[str]) -> tuple[dict[str, str], int, float, float]:
    """Embed ``pending`` slides; returns failures, tiles embedded, the loop's wall time (after model load) and the
    time until its first batch arrived."""
    device = torch.device(options.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    bf16 = options.precision == "bf16" or (options.precision == "auto" and device.type == "cuda")
    failed: dict[str, str] = {}
    n_done = 0
    for sid in [s for s in pending if slides[s].n_tiles == 0]:  # nothing to compute: write the empty slide
        _finish_slide(writer, store, slides[sid], encoder, options, forced, bf16, device, info.embed_dim,
                      {k: np.zeros((0, info.embed_dim), np.float32) for k in options.features})
    work = [(s, slides[s].n_tiles) for s in pending if slides[s].n_tiles > 0]
    if not work:
        return failed, 0, 0.0, 0.0
    model, transform = load_encoder(info.path, device=str(device))
    units = plan_units(work, options.batch_size)
    loader = make_loader(store.url, units, {s: slides[s].tile_px for s, _ in work}, options.num_workers,
                         pin_memory=device.type == "cuda")
    buffers: dict[str, torch.Tensor] = {}
    bar, task = _progress(options.progress, sum(n for _, n in work))
    t0 = time.perf_counter()
    startup = None
    with bar, torch.inference_mode():
        for i, tiles, error in loader:
            if startup is None:
                startup = time.perf_counter() - t0
            unit = units[i]
            sid = unit.slide_id
            if sid in failed:
                continue
            if error:
                failed[sid] = error
                writer.record_failure(sid, {"reason": error, "stage": "read/decode"})
                buffers.clear()
                continue
            if unit.start == 0:
                shape = (slides[sid].n_tiles, info.embed_dim)
                buffers = {k: torch.empty(shape, dtype=torch.float32, pin_memory=device.type == "cuda")
                           for k in options.features}
                bar.update(task, description=sid)
            x = transform.batch(tiles.to(device, non_blocking=True))
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                cls, patch = encode_tokens(model, x, options.mean_patch)
            # Asynchronous copies into pinned memory: no device sync per batch, one per slide.
            buffers["cls"][unit.start:unit.stop].copy_(cls.float(), non_blocking=True)
            if patch is not None:
                buffers["mean_patch"][unit.start:unit.stop].copy_(patch.float(), non_blocking=True)
            n_done += unit.stop - unit.start
            bar.update(task, advance=unit.stop - unit.start,
                       rate=f"{n_done / max(time.perf_counter() - t0, 1e-9):.0f}")
            if unit.last:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                _finish_slide(writer, store, slides[sid], encoder, options, forced, bf16, device, info.embed_dim,
                              {k: v.numpy() for k, v in buffers.items()})
                buffers = {}
    return failed, n_done, time.perf_counter() - t0, startup or 0.0


def _finish_slide(writer: EmbeddingWriter, store: TileStore, slide: StoreSlide, encoder: dict[str, Any],
                  options: EmbedOptions, forced: set[str], bf16: bool, device: torch.device, dim: int,
                  arrays: dict[str, np.ndarray]) -> None:
    coords = slide.coords
    attrs = {"slide": slide.attrs,
             "embedding": {"encoder": encoder, "features": list(options.features), "dim": dim,
                           "precision": "bf16-autocast" if bf16 else "fp32", "device": device.type,
                           "tile_store": store.url, "forced": slide.slide_id in forced, "created": now_iso(),
                           "pathdino_version": __version__}}
    if "h5" in options.formats:  # before the index entry: a slide listed as complete always has its h5
        coords_attrs, file_attrs = _h5_attrs(slide, encoder)
        extra = {"mean_patch_features": arrays["mean_patch"]} if "mean_patch" in arrays else None
        write_h5(writer.h5_path(slide.slide_id), arrays["cls"], coords, coords_attrs, file_attrs, extra)
    writer.write_slide(slide.slide_id, arrays, coords, attrs, _index_entry(store, slide, options.features))


__all__ = ["H5_DIR", "EmbedOptions", "EmbedReport", "check_compatibility", "embed_store", "encode_tokens"]
