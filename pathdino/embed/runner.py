"""``pathdino embed``: every tile of every slide of a tile store through an encoder, on one or many processes.

Per slide: the tile embedding (the encoder's recipe: CLS, or CLS ++ mean patch token, ...) of each tile, in the
store's tile order, with its level-0 coordinates and the slide's provenance, committed atomically into an
embeddings store (``store.py``) and, with ``formats=("zarr", "h5")``, a CLAM/TRIDENT-style HDF5. Several processes
(``--shard i/N`` tasks, or ``accelerate launch`` ranks) share one output: ``plan.py`` deals slides and parts of
large slides to them, ``assembly.py`` stages and commits each slide exactly once, ``compute.py`` runs the loop.
Slides already complete with the same encoder, tile data and features are skipped, so a killed run resumes where
it stopped, with any number of processes.
"""

from __future__ import annotations

import fnmatch
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pathdino.embed.assembly import SlideAssembly, assembly_key
from pathdino.embed.compute import array_specs, run_loop, token_outputs
from pathdino.embed.plan import DEFAULT_PART_TILES, WorkItem, assign, parse_shard, plan_items, shard_from_env
from pathdino.embed.store import (
    FEATURE_NAMES,
    H5_DIR,
    EmbeddingStore,
    EmbeddingWriter,
    EmbedError,
    apply_recipe,
    recipe_arrays,
    write_h5,
)
from pathdino.export.load import EncoderInfo, load_encoder, read_encoder_config
from tiling import __version__
from tiling.fsio import file_sha256, now_iso
from tiling.store import StoreSlide, TileStore, describe_use, slide_mpp

log = logging.getLogger(__name__)
FORMATS = ("zarr", "h5")
PRECISIONS = ("auto", "bf16", "fp32")


def default_decode_workers() -> int:
    """4 decoding processes, or one per available CPU core where there are fewer (more only compete for the cores
    and make the DataLoader warn)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, min(4, cores))


@dataclass(frozen=True)
class EmbedOptions:
    """Knobs of :func:`embed_store` (defaults suit one GPU; the CLI exposes each as a flag)."""

    batch_size: int = 256  # tiles per forward pass (and per decoding work unit)
    # decoding processes (spawned; default_decode_workers(): 4, at most one per core); 0 decodes in the main process
    num_workers: int = field(default_factory=default_decode_workers)
    device: str | None = None  # None: "cuda" (cuda:LOCAL_RANK under accelerate) when available, else "cpu"
    precision: str = "auto"  # "auto": bf16 autocast on CUDA, fp32 on CPU; or "bf16" / "fp32" everywhere
    mean_patch: bool = False  # also store the mean patch token per tile ("mean_patch")
    patch_tokens: bool = False  # also store every patch token per tile, float16 (N, T, D), chunked
    formats: tuple[str, ...] = ("zarr",)  # add "h5" for one CLAM/TRIDENT-style HDF5 per slide in h5_dir(out)
    slides: tuple[str, ...] | None = None  # slide ids or fnmatch patterns; None: every complete slide
    force: bool = False  # embed slides whose tile size or µm/px disagree with the encoder's
    overwrite: bool = False  # recompute slides that are already complete
    mpp_tolerance: float = 0.05  # relative µm/px difference accepted between store and encoder
    progress: bool = True  # rich progress bar
    shard: tuple[int, int] | str | None = None  # (i, N) or "i/N"; None: RANK/WORLD_SIZE of a launcher, else 0/1
    part_tiles: int = DEFAULT_PART_TILES  # slides with more tiles are cut into parts embedded by several processes
    encoder_table: str | None = None  # JSON file of extra known-encoder entries (third-party encoder folders)

    def __post_init__(self) -> None:
        object.__setattr__(self, "formats", tuple(dict.fromkeys(("zarr", *self.formats))))
        bad = [f for f in self.formats if f not in FORMATS]
        if bad:
            raise EmbedError(f"unknown --format {bad}; choose from {FORMATS}")
        if self.precision not in PRECISIONS:
            raise EmbedError(f"unknown precision {self.precision!r}; choose from {PRECISIONS}")
        if self.batch_size < 1 or self.num_workers < 0 or self.part_tiles < 1:
            raise EmbedError(
                f"batch_size and part_tiles must be >= 1 and num_workers >= 0 (got {self.batch_size}, "
                f"{self.part_tiles}, {self.num_workers})"
            )
        if isinstance(self.slides, str):
            object.__setattr__(self, "slides", (self.slides,))
        if isinstance(self.shard, str):
            object.__setattr__(self, "shard", parse_shard(self.shard))

    def arrays(self, recipe: str = "cls") -> tuple[str, ...]:
        """The per-tile arrays stored: CLS always, what the recipe needs, and what was asked for."""
        names = (
            {"cls", *recipe_arrays(recipe)}
            | ({"mean_patch"} if self.mean_patch else set())
            | ({"patch_tokens"} if self.patch_tokens else set())
        )
        return tuple(n for n in FEATURE_NAMES if n in names)

    @property
    def features(self) -> tuple[str, ...]:
        return self.arrays()


@dataclass(frozen=True)
class EmbedReport:
    out: Path
    embedded: tuple[str, ...]  # slides committed by this process
    skipped: tuple[str, ...]  # already complete (h5 files re-written from the store when missing)
    failed: dict[str, str] = field(default_factory=dict)  # slide -> reason
    n_tiles: int = 0  # tiles embedded by this process in this run
    seconds: float = 0.0  # wall time of the embedding loop: worker start, decoding, model, writing (not model load)
    forced: tuple[str, ...] = ()  # slides embedded despite a tile-size / µm/px mismatch
    startup_s: float = 0.0  # part of `seconds` spent before the first batch arrived (worker start, first reads)
    shard: tuple[int, int] = (0, 1)  # this process's share of the work
    parts: int = 0  # tile ranges (whole slides or parts of slides) computed by this process
    waiting: tuple[str, ...] = ()  # slides whose parts this process finished, still waiting for other processes'
    uses: str = ""  # what this run embeds: store, slides, tiles, failed slides skipped, µm/px and tile size

    @property
    def tiles_per_s(self) -> float:
        return self.n_tiles / self.seconds if self.seconds > 0 else 0.0


def check_compatibility(info: EncoderInfo, slides: dict[str, StoreSlide], mpp_tolerance: float) -> dict[str, str]:
    """``slide_id -> what is wrong`` for slides whose tile size or µm/px differ from what the encoder was trained on.

    Multi-magnification encoders (e.g. Virchow2) accept any of the µm/px values they were trained at.
    """
    problems = {}
    trained = info.trained_mpps
    source = (
        f" ({info.pathdino['known_encoder']}, pathdino's encoder table)" if info.pathdino.get("known_encoder") else ""
    )
    for sid, slide in slides.items():
        issues = []
        if info.tile_px is not None and slide.tile_px != info.tile_px:
            issues.append(f"tiles are {slide.tile_px} px, the encoder was trained on {info.tile_px} px")
        mpp = slide.attrs.get("effective_mpp", slide.attrs.get("target_mpp"))
        if trained and mpp is not None:
            rels = [abs(float(mpp) - m) / m for m in trained]
            if min(rels) > mpp_tolerance:
                shown = " / ".join(f"{m:.4g}" for m in trained)
                issues.append(
                    f"tiles are {float(mpp):.4g} µm/px, the encoder's {shown} µm/px{source} "
                    f"({min(rels):.0%} off, tolerance {mpp_tolerance:.0%})"
                )
        if issues:
            problems[sid] = "; ".join(issues)
    return problems


def encode_tokens(model, x: torch.Tensor, mean_patch: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """CLS embedding [B, D] (what ``model(x)`` returns) and, if asked, the mean patch token [B, D]."""
    out = token_outputs(model, x, ("cls", "mean_patch") if mean_patch else ("cls",))
    return out["cls"], out.get("mean_patch")


def _select(store: TileStore, patterns: tuple[str, ...] | None) -> list[str]:
    ids = store.slide_ids
    if not ids:  # nothing to embed is a mistake to report, not an "embedded 0 slide(s)" success
        failed = len(store.failures)
        raise EmbedError(
            f"tile store {store.url} holds no usable slide ({failed} failed slide(s), none complete): "
            f"`pathdino info {store.url} --failures` says why; tile the slides again"
        )
    if patterns is None:
        return ids
    unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(s, p) for s in ids)]
    if unmatched:
        raise EmbedError(
            f"--slides {unmatched} match no complete slide of {store.url} (run `pathdino info {store.url}`)"
        )
    return [s for s in ids if any(fnmatch.fnmatchcase(s, p) for p in patterns)]


def _uses(store: TileStore, slides: dict[str, StoreSlide], patterns: tuple[str, ...] | None) -> str:
    failed = [s for s in store.failures if patterns is None or any(fnmatch.fnmatchcase(s, p) for p in patterns)]
    return describe_use(
        stores=(store.url,),
        n_slides=len(slides),
        n_tiles=sum(s.n_tiles for s in slides.values()),
        n_failed=len(failed),
        mpps=[slide_mpp(s) for s in slides.values()],
        tile_pxs=[s.tile_px for s in slides.values()],
    )


def _encoder_meta(info: EncoderInfo) -> dict[str, Any]:
    sha = info.weights_sha256 or file_sha256(info.weights_path)
    return {
        "dir": str(info.path.resolve()),
        "architecture": info.architecture,
        "weights_sha256": sha,
        "embed_dim": info.embed_dim,
        "tile_px": info.tile_px,
        "target_mpp": info.target_mpp,
        "trained_mpps": list(info.trained_mpps),
        "input_px": info.input_px,
        "mean": list(info.mean),
        "std": list(info.std),
        "recipe": info.recipe,
        "known_encoder": info.pathdino.get("known_encoder"),
        "training_step": info.pathdino.get("training", {}).get("step"),
    }


def _index_entry(store: TileStore, slide: StoreSlide, features: tuple[str, ...]) -> dict[str, Any]:
    entry = store.entries[slide.slide_id]
    return {
        "source_fingerprint": entry.fingerprint,
        "tile_params_key": slide.attrs.get("params_key"),
        "tiles_committed": entry.committed,
        "n_tiles": slide.n_tiles,
        "features": list(features),
    }


def _up_to_date(done: dict[str, Any] | None, wanted: dict[str, Any]) -> bool:
    if done is None:
        return False
    same = all(
        done.get(k) == wanted[k] for k in ("source_fingerprint", "tile_params_key", "tiles_committed", "n_tiles")
    )
    return same and set(wanted["features"]) <= set(done.get("features", []))


def _magnification(mpp: Any) -> int | None:
    """TRIDENT's magnification for a µm/px (10 / mpp: 0.5 µm/px is 20x), None when unknown."""
    return round(10.0 / float(mpp)) if mpp else None


def _h5_attrs(slide: StoreSlide, encoder: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    a = slide.attrs
    coords_attrs = {  # TRIDENT's coords attributes first, then pathdino's
        "patch_size": int(slide.tile_px),  # at the store's µm/px (TRIDENT's convention)
        "patch_size_level0": round(float(a.get("level0_tile_px", slide.tile_px))),
        "level0_magnification": _magnification(a.get("slide_mpp")),
        "target_magnification": _magnification(a.get("effective_mpp", a.get("target_mpp"))),
        "overlap": a.get("overlap_px"),
        "name": slide.slide_id,
        "level0_width": a.get("level0_width"),
        "level0_height": a.get("level0_height"),
        "patch_level": a.get("read_level"),
        "mpp": a.get("effective_mpp"),
        "target_mpp": a.get("target_mpp"),
        "slide_mpp": a.get("slide_mpp"),
    }
    file_attrs = {
        "slide_id": slide.slide_id,
        "source_path": a.get("source_path"),
        "features": encoder.get("recipe", "cls"),
        "encoder": encoder["dir"],
        "encoder_name": encoder.get("known_encoder"),
        "architecture": encoder["architecture"],
        "weights_sha256": encoder["weights_sha256"],
    }
    return coords_attrs, file_attrs


def _write_h5(path: Path, slide: StoreSlide, encoder: dict[str, Any], group, coords: np.ndarray) -> None:
    """The slide's h5 from its Zarr group (features = the recipe's tile embedding)."""
    arrays = {name: np.asarray(group[name][:]) for name in ("cls", "mean_patch") if name in group}
    extra = {"mean_patch_features": arrays["mean_patch"]} if "mean_patch" in arrays else None
    coords_attrs, file_attrs = _h5_attrs(slide, encoder)
    write_h5(path, apply_recipe(encoder.get("recipe", "cls"), arrays), coords, coords_attrs, file_attrs, extra)


class _Run:
    """What every step of one process's run shares: store, encoder, output, plan, and how to commit a slide."""

    def __init__(
        self,
        store: TileStore,
        slides: dict[str, StoreSlide],
        info: EncoderInfo,
        encoder: dict[str, Any],
        writer: EmbeddingWriter,
        options: EmbedOptions,
        forced: set[str],
        items: list[WorkItem],
    ):
        self.store, self.slides, self.info, self.encoder = store, slides, info, encoder
        self.writer, self.options, self.forced = writer, options, forced
        self.arrays = options.arrays(info.recipe)
        self.wanted = {sid: _index_entry(store, s, self.arrays) for sid, s in slides.items()}
        self.items_of: dict[str, list[WorkItem]] = {}
        for item in items:
            self.items_of.setdefault(item.slide_id, []).append(item)
        self.n_patch = 0
        self.provenance: dict[str, Any] = {}

    def assembly(self, slide_id: str) -> SlideAssembly:
        """The slide's assembly, created on first use (by whichever process gets there first)."""
        asm = SlideAssembly(self.writer, slide_id, assembly_key(self.wanted[slide_id], self.options.part_tiles))
        if not asm.path.is_dir():
            asm.create(
                array_specs(
                    self.slides[slide_id].n_tiles,
                    self.info.embed_dim,
                    self.n_patch,
                    self.arrays,
                    self.options.part_tiles,
                )
            )
        return asm

    def peek_assembly(self, slide_id: str) -> SlideAssembly:
        return SlideAssembly(self.writer, slide_id, assembly_key(self.wanted[slide_id], self.options.part_tiles))

    def attrs(self, slide: StoreSlide) -> dict[str, Any]:
        return {
            "slide": slide.attrs,
            "embedding": {
                "encoder": self.encoder,
                "features": list(self.arrays),
                "recipe": self.info.recipe,
                "dim": self.info.embed_dim,
                "tile_store": self.store.url,
                "forced": slide.slide_id in self.forced,
                "created": now_iso(),
                "parts": len(self.items_of[slide.slide_id]),
                "part_tiles": self.options.part_tiles,
                "pathdino_version": __version__,
                **self.provenance,
            },
        }

    def try_commit(self, slide_id: str) -> bool:
        """Commit the slide if all its parts are done and no other process is committing it. True if committed."""
        asm = self.peek_assembly(slide_id)
        if not asm.complete(self.items_of[slide_id]) or not asm.claim_merge():
            return False
        slide = self.slides[slide_id]
        try:
            group = asm.group()
            coords = np.asarray(slide.coords, dtype=np.int64)
            group.create_array("coords", data=coords, chunks=(max(1, len(coords)), 2), compressors=None, overwrite=True)
            group.attrs["pathdino"] = self.attrs(slide)
            if "h5" in self.options.formats:  # before the index entry: a listed slide always has its h5
                _write_h5(self.writer.h5_path(slide_id), slide, self.encoder, group, coords)
            self.writer.commit_staged(slide_id, asm.path, self.wanted[slide_id])
        except BaseException:
            asm.release_merge()
            raise
        asm.discard_parts()
        return True

    def write_empty(self, slide_id: str) -> None:
        slide = self.slides[slide_id]
        dim = self.info.embed_dim
        arrays = {k: np.zeros((0, dim), np.float32) for k in self.arrays if k != "patch_tokens"}
        if "h5" in self.options.formats:
            coords_attrs, file_attrs = _h5_attrs(slide, self.encoder)
            write_h5(
                self.writer.h5_path(slide_id),
                apply_recipe(self.info.recipe, arrays),
                np.zeros((0, 2), np.int64),
                coords_attrs,
                file_attrs,
            )
        if "patch_tokens" in self.arrays:
            arrays["patch_tokens"] = np.zeros((0, max(self.n_patch, 1), dim), np.float16)
        self.writer.write_slide(slide_id, arrays, np.zeros((0, 2), np.int64), self.attrs(slide), self.wanted[slide_id])


def _device(options: EmbedOptions) -> torch.device:
    if options.device:
        return torch.device(options.device)
    if torch.cuda.is_available():
        local = os.environ.get("LOCAL_RANK")
        return torch.device(f"cuda:{local}" if local is not None else "cuda")
    return torch.device("cpu")


def _check(store: TileStore, info: EncoderInfo, slides: dict[str, StoreSlide], options: EmbedOptions) -> set[str]:
    """Refuse (or, with force, warn about) slides the encoder was not trained for; returns the forced ones."""
    if info.tile_px is None and not info.trained_mpps:
        hint = (
            "add it to an encoder table (--encoder-table) with target_mpp"
            if info.third_party
            else "re-export with --tile-px and --mpp"
        )
        log.warning(
            "encoder %s does not record the µm/px it was trained at: the store is not checked against it (%s)",
            info.path,
            hint,
        )
    elif not info.trained_mpps:
        log.warning("encoder %s does not record the µm/px it was trained at: only the tile size is checked", info.path)
    problems = check_compatibility(info, slides, options.mpp_tolerance)
    lines = [f"slide {sid!r}: {why}" for sid, why in problems.items()]
    if problems and not options.force:
        shown = "\n  ".join(lines[:10]) + (f"\n  ... and {len(lines) - 10} more" if len(lines) > 10 else "")
        raise EmbedError(
            f"tile store {store.url} does not match encoder {info.path}:\n  {shown}\n"
            "embed a store tiled at the encoder's tile size and µm/px (`pathdino tile --tile-px ... "
            "--target-mpp ...`), or pass --force to embed anyway"
        )
    for line in lines:
        log.warning("--force: %s", line)
    return set(problems)


def embed_store(
    store_url: str | Path, encoder_dir: str | Path, out: str | Path, options: EmbedOptions = EmbedOptions()
) -> EmbedReport:
    """Embed every (selected) slide of a tile store; this process's share when sharded; resumable.

    Any number of processes may run this at once on one ``out`` (each with its own ``shard``); together they
    commit every slide exactly once. Returns what this process committed, skipped and saw fail.
    """
    store = TileStore(str(store_url))
    info = read_encoder_config(encoder_dir, options.encoder_table)
    slide_ids = _select(store, options.slides)
    slides = {sid: store.slide(sid) for sid in slide_ids}
    forced = _check(store, info, slides, options)
    shard = options.shard or shard_from_env() or (0, 1)
    encoder = _encoder_meta(info)
    arrays = options.arrays(info.recipe)
    writer = EmbeddingWriter(out, encoder, store.url, arrays)
    writer.set_features(arrays)
    items = plan_items([(sid, slides[sid].n_tiles) for sid in slide_ids], options.part_tiles)
    run = _Run(store, slides, info, encoder, writer, options, forced, items)
    done_meta = writer.meta().get("slides", {})
    mine, skipped, todo, empty = assign(items, shard), [], [], []
    for item in mine:
        sid = item.slide_id
        if not options.overwrite and _up_to_date(done_meta.get(sid), run.wanted[sid]):
            if item.start == 0:
                skipped.append(sid)
                if "h5" in options.formats and not writer.h5_path(sid).is_file():
                    group = EmbeddingStore(writer.path).group(sid)
                    _write_h5(writer.h5_path(sid), slides[sid], encoder, group, np.asarray(group["coords"][:]))
            continue
        if item.start == 0 and sid in done_meta:
            writer.forget(sid)  # a killed rerun must never show the stale version as complete
        if item.size == 0:
            empty.append(sid)
        elif not run.peek_assembly(sid).done(item):
            todo.append(item)
    committed: list[str] = []
    for sid in empty:  # nothing to compute: write the empty slide
        run.write_empty(sid)
        committed.append(sid)
    result = _compute(run, todo, shard)
    committed += result.committed
    for sid in dict.fromkeys(it.slide_id for it in mine if it.size):  # parts finished by a killed run, or here
        if sid not in committed and sid not in result.failed and sid not in skipped and run.try_commit(sid):
            committed.append(sid)
    waiting = tuple(
        s for s in dict.fromkeys(it.slide_id for it in todo) if s not in committed and s not in result.failed
    )
    return EmbedReport(
        out=writer.path,
        embedded=tuple(s for s in slide_ids if s in committed),
        skipped=tuple(skipped),
        failed=result.failed,
        n_tiles=result.n_tiles,
        seconds=result.seconds,
        forced=tuple(s for s in slide_ids if s in forced and s in committed),
        startup_s=result.startup_s,
        shard=shard,
        parts=result.parts_done,
        waiting=waiting,
        uses=_uses(store, slides, options.slides),
    )


def _compute(run: _Run, todo: list[WorkItem], shard: tuple[int, int]):
    from pathdino.embed.compute import LoopResult

    if not todo:
        return LoopResult()
    options = run.options
    device = _device(options)
    bf16 = options.precision == "bf16" or (options.precision == "auto" and device.type == "cuda")
    model, transform = load_encoder(run.info, device=str(device))
    if "patch_tokens" in run.arrays:
        with torch.inference_mode():
            probe = torch.zeros(1, 3, run.info.input_px, run.info.input_px, device=device)
            run.n_patch = int(model.forward_features(probe).shape[1] - model.num_prefix_tokens)
    run.provenance = {"precision": "bf16-autocast" if bf16 else "fp32", "device": device.type}
    log.info(
        "shard %d/%d: %d tile range(s), %d tiles on %s",
        shard[0],
        shard[1],
        len(todo),
        sum(it.size for it in todo),
        device,
    )

    def on_failure(slide_id: str, error: str) -> None:
        run.writer.record_failure(slide_id, {"reason": error, "stage": "read/decode", "shard": list(shard)})

    return run_loop(run, todo, run.try_commit, on_failure, options, device, bf16, model, transform, run.n_patch)


__all__ = ["H5_DIR", "EmbedOptions", "EmbedReport", "check_compatibility", "embed_store", "encode_tokens"]
