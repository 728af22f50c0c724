"""`pathdino demo`: the README's main job — the whole pipeline on the bundled sample slide, on a CPU.

tile → short DINOv2 pretraining (the CPU smoke preset: a tiny ViT, a few steps) → export → embed. The model
learns nothing useful in a few steps; the demo shows every stage working and where its output goes.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from tiling.config import TilingConfig
from tiling.errors import MissingFileError
from tiling.inputs import collect_slides
from tiling.runner import run_tiling
from tiling.store import TileStore, summarise

console = Console()
SMOKE_CONFIG = Path(__file__).parents[2] / "configs" / "train" / "cpu_smoke.yaml"


def _tile(sample_slide: Path, store_url: str, workers: int) -> bool:
    console.rule("1/4  tile the sample slide")
    outcomes = run_tiling(collect_slides([str(sample_slide)]), store_url, TilingConfig(workers=workers))
    for o in outcomes:
        if o.status in ("failed", "empty"):
            console.print(f"[red]tiling {o.status}[/]: {o.reason}")
            return False
    store = TileStore(store_url)
    for sid in store.slide_ids:
        slide = store.slide(sid)
        attrs = slide.attrs
        console.print(
            f"slide [bold]{sid}[/]: {slide.n_tiles} tiles of {slide.tile_px} px at "
            f"{attrs['effective_mpp']:.3f} µm/px (slide {attrs['slide_mpp']:.3f} µm/px from "
            f"{attrs['slide_mpp_source']}, read level {attrs['read_level']}, {attrs['pixel_source']})"
        )
    summary = summarise(store)
    console.print(
        f"tile store: {store_url}  ({summary['n_slides']} slide(s), {summary['n_tiles']} tiles); "
        f"QC image: {store.qc_image_path(store.slide_ids[0]) if store.slide_ids else '-'}"
    )
    return True


def _pretrain(store_url: str, run_dir: Path, steps: int) -> None:
    from pathdino.train.config import load_config
    from pathdino.train.loop import train

    console.rule(f"2/4  pretrain a tiny ViT for {steps} steps (CPU smoke preset)")
    if not SMOKE_CONFIG.is_file():
        raise MissingFileError(
            f"{SMOKE_CONFIG} not found: run the demo from a source checkout (pip install -e .), which ships configs/"
        )
    cfg = load_config(
        SMOKE_CONFIG,
        [
            f"data.stores=[{store_url}]",
            f"train.output_dir={run_dir}",
            f"train.total_steps={steps}",
            f"train.checkpoint_every_steps={steps}",
        ],
    )
    train(cfg, resume=True)
    console.print(f"checkpoints: {run_dir / 'checkpoints'}; metrics: {run_dir / 'metrics.jsonl'}")
    console.print(
        f"{steps} steps of a tiny ViT learn nothing yet: the losses, entropies and embedding rank in "
        "metrics.jsonl only show that every stage runs (collapse warnings start at step "
        f"{cfg.log.collapse_after_steps}, log.collapse_after_steps)"
    )


def _export(run_dir: Path, encoder_dir: Path) -> None:
    from pathdino.export.export import ExportOptions, export_checkpoint

    console.rule("3/4  export the teacher as a timm encoder")
    result = export_checkpoint(run_dir, encoder_dir, ExportOptions(overwrite=True, model_name="pathdino-demo"))
    console.print(
        f"encoder: {result.out_dir} ({result.architecture}, step {result.step}; reloaded with timm, "
        f"max |diff| {result.max_abs_diff:.1e})"
    )
    console.print(f"load it:  model, transform = pathdino.load_encoder({str(result.out_dir)!r})")


def _embed(store_url: str, encoder_dir: Path, embeddings_dir: Path) -> bool:
    from pathdino.embed.runner import EmbedOptions, embed_store
    from pathdino.embed.store import h5_dir

    console.rule("4/4  embed every tile of every slide")
    report = embed_store(
        store_url,
        encoder_dir,
        embeddings_dir,
        EmbedOptions(batch_size=64, num_workers=0, formats=("zarr", "h5"), progress=False),
    )
    if report.failed:
        console.print(f"[red]embedding failed[/]: {report.failed}")
        return False
    console.print(
        f"embeddings: {embeddings_dir} (Zarr) and {h5_dir(embeddings_dir)} (CLAM/TRIDENT h5); "
        f"{report.n_tiles} tiles embedded, {len(report.skipped)} slide(s) already done"
    )
    return True


def run_demo(out_dir: Path, *, workers: int, sample_slide: Path, train_steps: int = 6) -> int:
    """Run tile → pretrain → export → embed under `out_dir`; rerunning resumes. Returns an exit code."""
    out_dir.mkdir(parents=True, exist_ok=True)
    store_url = str(out_dir / "tiles.zarr")
    run_dir, encoder_dir, embeddings_dir = out_dir / "train", out_dir / "encoder", out_dir / "embeddings"
    if not _tile(sample_slide, store_url, workers):
        return 1
    _pretrain(store_url, run_dir, train_steps)
    _export(run_dir, encoder_dir)
    if not _embed(store_url, encoder_dir, embeddings_dir):
        return 1
    console.rule("done")
    console.print(f"everything is under {out_dir.resolve()}: tiles.zarr/, train/, encoder/, embeddings/")
    console.print(
        f"next: the notebooks in notebooks/ use these outputs when started with "
        f"PATHDINO_NOTEBOOK_DIR={out_dir.resolve()} (03 trains an ABMIL model and maps its attention)"
    )
    return 0
