"""``pathdino slide-embed``: one vector per slide (and, on request, contextualised tile embeddings) from a slide
encoder over an embeddings store; resumable and splittable over processes like ``pathdino embed``.

Output folder (docs/slide.md, "slide-embed output")::

    <out>/slide_embed.json              what produced it: slide encoder (folder, weights sha256, tile encoder),
                                        embeddings store, options; a second run must match it (or --overwrite)
    <out>/slides/<slide_id>.safetensors "cls" [D] and "mean" [D] float32 (the CLS token; the mean of the
                                        contextualised tiles), with --tiles also "tiles" [N, D] float32 and
                                        "coords" [N, 2] int64 (level-0 px, the embeddings store's tile order);
                                        header metadata: slide_id, n_tiles, level0_step_px, created
    <out>/failures.json                 slide_id -> reason, for slides that could not be embedded (rewritten per run)

A slide is done when its file exists with the same tile count (and tiles, when asked for): a rerun skips it.
Each file is written to a temporary name and renamed, so any number of ``--shard i/N`` processes share one <out>.
"""

from __future__ import annotations

import fnmatch
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pathdino.slide.model import SlideEncoder
from pathdino.slide.positions import grid_positions
from tiling.configio import check_choice, fail, freeze_tuples
from tiling.errors import PathdinoError
from tiling.fsio import atomic_path, atomic_write_json, file_sha256, now_iso, read_json

FORMAT_NAME = "pathdino-slide-embeddings"
FORMAT_VERSION = 1
RUN_FILE = "slide_embed.json"
SLIDES_DIR = "slides"
OWNER = "SlideEmbedOptions"


class SlideEmbedError(PathdinoError, ValueError):
    """A slide-embed output that belongs to another run, or an input that cannot be embedded."""


@dataclass(frozen=True)
class SlideEmbedOptions:
    """Options of ``pathdino slide-embed`` (defaults documented here and in docs/slide.md)."""

    tiles: bool = False  # also write each slide's contextualised tile embeddings [N, D] and coords
    shard: str | None = None  # "i/N": this process's share of the slides (largest first to the least loaded)
    slides: tuple[str, ...] = ()  # only these slide ids / glob patterns (empty: every complete slide)
    device: str | None = None  # None: cuda when available, else cpu
    precision: str = "auto"  # auto (bf16 autocast on GPU, fp32 on CPU) | bf16 | fp32
    force: bool = False  # use embeddings of another tile encoder than the slide encoder's card names
    overwrite: bool = False  # recompute slides already done (and replace an output of another run)
    progress: bool = True  # a progress bar on terminals
    extra: dict = field(default_factory=dict, compare=False)  # not a flag: provenance added to slide_embed.json

    def __post_init__(self):
        freeze_tuples(self, ("slides",))
        check_choice(OWNER, "precision", self.precision, ("auto", "bf16", "fp32"))
        if self.shard is not None:
            parse_shard(self.shard)

    @property
    def shard_pair(self) -> tuple[int, int]:
        return parse_shard(self.shard) if self.shard else (0, 1)


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/N"`` -> ``(i, N)`` with 0 <= i < N."""
    try:
        i, n = (int(x) for x in str(text).split("/"))
        if not 0 <= i < n:
            raise ValueError
    except ValueError:
        fail(OWNER, "shard", text, "expected i/N with 0 <= i < N, e.g. --shard 0/4")
    return i, n


@dataclass
class SlideEmbedReport:
    out: Path
    embedded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    n_tiles: int = 0
    seconds: float = 0.0
    shard: tuple[int, int] = (0, 1)


def select_slides(slide_ids: list[str], sizes: Mapping[str, int], options: SlideEmbedOptions) -> list[str]:
    """The slides this process embeds: the --slides patterns, then its --shard (largest first to the least loaded
    shard, the same plan in every process)."""
    chosen = [
        s for s in sorted(slide_ids) if not options.slides or any(fnmatch.fnmatchcase(s, p) for p in options.slides)
    ]
    index, count = options.shard_pair
    loads = [0] * count
    mine = []
    for sid in sorted(chosen, key=lambda s: (-int(sizes.get(s, 0)), s)):
        target = loads.index(min(loads))
        loads[target] += max(1, int(sizes.get(sid, 0)))
        if target == index:
            mine.append(sid)
    return sorted(mine)


def _run_meta(model: SlideEncoder, source: Mapping[str, Any], options: SlideEmbedOptions) -> dict[str, Any]:
    info = model.info
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "slide_encoder": {
            "dir": str(Path(info.path).resolve()),
            "weights_sha256": file_sha256(Path(info.path) / "model.safetensors"),
            "tile_encoder": info.tile_encoder,
            "embed_dim": info.config.embed_dim,
        },
        "source": dict(source),
        **options.extra,
    }


def _open_out(out: Path, meta: dict[str, Any], options: SlideEmbedOptions) -> None:
    run_file = out / RUN_FILE
    if run_file.is_file():
        old = read_json(run_file, error=SlideEmbedError)
        same = (
            old.get("format") == FORMAT_NAME
            and old.get("slide_encoder", {}).get("weights_sha256") == meta["slide_encoder"]["weights_sha256"]
        )
        if not same and not options.overwrite:
            raise SlideEmbedError(
                f"{out} holds slide embeddings of another slide encoder "
                f"({old.get('slide_encoder', {}).get('dir')}): choose another --out, or pass "
                "--overwrite to replace them"
            )
        if same:
            return
    elif out.exists() and any(p.name != SLIDES_DIR for p in out.iterdir()):
        raise SlideEmbedError(f"{out} exists and is not a slide-embed output: choose another --out")
    (out / SLIDES_DIR).mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_file, {**meta, "created": now_iso()})


def _done(path: Path, n_tiles: int, want_tiles: bool) -> bool:
    from safetensors import safe_open

    if not path.is_file():
        return False
    try:
        with safe_open(str(path), framework="np") as fh:
            meta, keys = fh.metadata() or {}, set(fh.keys())
    except Exception:  # a torn or foreign file: recompute it
        return False
    return int(meta.get("n_tiles", -1)) == n_tiles and (not want_tiles or "tiles" in keys)


def embed_one_slide(
    model: SlideEncoder,
    features: np.ndarray,
    coords: np.ndarray,
    *,
    level0_step_px: float | None,
    precision: str = "fp32",
) -> dict[str, torch.Tensor]:
    """``{"cls": [D], "mean": [D], "tiles": [N, D]}`` (float32, CPU) of one slide's tile features and coords."""
    device = next(model.parameters()).device
    coords_t = torch.as_tensor(np.asarray(coords), dtype=torch.long)
    step = level0_step_px or infer_step_px(coords_t)
    grid = grid_positions(coords_t, step)
    emb = torch.as_tensor(np.asarray(features, dtype=np.float32)).to(device)
    low = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=low):
        out = model(emb, grid.to(device))
    tiles = out.tiles.float()
    return {"cls": out.cls[0].float().cpu(), "mean": tiles.mean(0).cpu(), "tiles": tiles.cpu()}


def infer_step_px(coords: torch.Tensor) -> float:
    """The tile grid's step (level-0 px) from coordinates alone: the smallest non-zero gap along x or y."""
    gaps = []
    for axis in (0, 1):
        values = torch.unique(coords[:, axis])
        if values.numel() > 1:
            gaps.append(int((values[1:] - values[:-1]).min()))
    if not gaps:
        return 1.0  # one tile (or one row and one column): any step gives the same grid
    return float(min(gaps))


def slide_embed(
    model: SlideEncoder,
    slides: Mapping[str, tuple[np.ndarray, np.ndarray]],
    *,
    out: str | Path,
    step_px: Callable[[str], float | None],
    sizes: Mapping[str, int],
    source: Mapping[str, Any],
    options: SlideEmbedOptions,
) -> SlideEmbedReport:
    """Embed this process's share of ``slides`` (slide_id -> (features [N, in_dim], coords [N, 2] level-0 px))
    into ``out``; ``step_px(slide_id)`` is the level-0 tile step (None: inferred from the coords); ``sizes`` the
    tile counts (for the shard plan); ``source`` is recorded in slide_embed.json."""
    from safetensors.torch import save_file

    out = Path(out)
    report = SlideEmbedReport(out=out, shard=options.shard_pair)
    _open_out(out, _run_meta(model, source, options), options)
    chosen = select_slides(list(slides), sizes, options)
    bar = _progress(chosen, options.progress)
    start = time.perf_counter()
    for sid in bar:
        path = out / SLIDES_DIR / f"{sid}.safetensors"
        n_tiles = int(sizes.get(sid, -1))
        if not options.overwrite and _done(path, n_tiles, options.tiles):
            report.skipped.append(sid)
            continue
        try:
            features, coords = slides[sid]
            result = embed_one_slide(model, features, coords, level0_step_px=step_px(sid), precision=options.precision)
        except (PathdinoError, ValueError, KeyError) as exc:
            report.failed[sid] = str(exc)
            continue
        tensors = {"cls": result["cls"].contiguous(), "mean": result["mean"].contiguous()}
        if options.tiles:
            tensors["tiles"] = result["tiles"].contiguous()
            tensors["coords"] = torch.as_tensor(np.asarray(coords), dtype=torch.int64).contiguous()
        meta = {"slide_id": sid, "n_tiles": str(len(coords)), "level0_step_px": str(step_px(sid)), "created": now_iso()}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)
        report.embedded.append(sid)
        report.n_tiles += len(coords)
    report.seconds = time.perf_counter() - start
    if report.failed:
        atomic_write_json(out / f"failures.{report.shard[0]}of{report.shard[1]}.json", report.failed)
    return report


def _progress(items: list[str], enabled: bool):
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc="slide-embed", unit="slide")


def read_slide_embeddings(out: str | Path, *, which: str = "cls") -> dict[str, np.ndarray]:
    """``slide_id -> vector`` (``which``: "cls" or "mean") of a slide-embed output, for probes and plots."""
    from safetensors import safe_open

    out = Path(out)
    meta = read_json(out / RUN_FILE, error=SlideEmbedError, hint="is it a `pathdino slide-embed --out` folder?")
    if meta.get("format") != FORMAT_NAME:
        raise SlideEmbedError(f"{out / RUN_FILE} is not a slide-embed output (format {meta.get('format')!r})")
    if which not in ("cls", "mean"):
        raise SlideEmbedError(f"which={which!r}: expected 'cls' or 'mean'")
    vectors = {}
    for path in sorted((out / SLIDES_DIR).glob("*.safetensors")):
        with safe_open(str(path), framework="np") as fh:
            vectors[path.stem] = fh.get_tensor(which)
    return vectors
