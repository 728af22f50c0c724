"""Implementation of ``pathdino slide-embed`` (the typer command in main.py is thin)."""

from __future__ import annotations

import os
from dataclasses import replace
from typing import TYPE_CHECKING

from rich.console import Console

if TYPE_CHECKING:
    from pathdino.mil.slide_encoder import SlideMILConfig
    from pathdino.slide.slide_embed import SlideEmbedOptions

console = Console(highlight=False, soft_wrap=True)


def _step_px(store):
    def step_px(slide_id: str) -> float | None:
        attrs = store.slide_attrs(slide_id).get("slide", {})
        step = attrs.get("level0_step_px") or attrs.get("level0_tile_px")
        return float(step) if step else None

    return step_px


def slide_mil_command(
    labels_csv: str, embeddings: str, slide_encoder: str, *, out: str, force: bool, config: SlideMILConfig
) -> int:
    import math

    from pathdino.embed import EmbeddingStore
    from pathdino.mil.slide_encoder import train_slide_mil
    from pathdino.slide import check_tile_encoder, load_slide_encoder

    store = EmbeddingStore(embeddings)
    model = load_slide_encoder(slide_encoder, device=config.device)
    if len(store):
        feature_dim = int(store[store.slide_ids[0]][0].shape[1])
        check_tile_encoder(model.info, store.encoder, feature_dim=feature_dim, where=str(embeddings), force=force)
    result = train_slide_mil(labels_csv, store, out, encoder=model, step_px=_step_px(store), config=config)
    what = (
        "linear probe on frozen slide vectors"
        if config.linear_probe
        else (f"fine-tuned slide encoder + head: best epoch {result.best_epoch} of {result.epochs_run}")
    )
    console.print(f"{what}; outputs in {result.out_dir}")
    for split, metrics in result.metrics.items():
        auc = metrics.get("auc")
        auc_text = "n/a" if auc is None or math.isnan(auc) else f"{auc:.3f}"
        console.print(f"  {split}: balanced accuracy {metrics['balanced_accuracy']:.3f}, AUC {auc_text}")
    return 0


def slide_embed_command(embeddings: str, slide_encoder: str, out: str, *, options: SlideEmbedOptions) -> int:
    import torch

    from pathdino.embed import EmbeddingStore
    from pathdino.embed.plan import shard_from_env
    from pathdino.slide import check_tile_encoder, load_slide_encoder
    from pathdino.slide.slide_embed import SlideEmbedError, slide_embed

    if options.shard is None and (launched := shard_from_env()) is not None:
        options = replace(
            options,
            shard=f"{launched[0]}/{launched[1]}",
            progress=options.progress and os.environ.get("LOCAL_RANK", "0") == "0",
        )
    store = EmbeddingStore(embeddings)
    if not len(store):
        raise SlideEmbedError(f"{embeddings} holds no complete slide: run `pathdino embed` first")
    device = options.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_slide_encoder(slide_encoder, device=device)
    first = store.slide_ids[0]
    feature_dim = int(store[first][0].shape[1])
    issues = check_tile_encoder(
        model.info, store.encoder, feature_dim=feature_dim, where=str(embeddings), force=options.force
    )
    for issue in issues:
        console.print(f"[yellow]--force:[/yellow] tile-encoder mismatch accepted: {issue}")
    sizes = {sid: int(store.meta["slides"][sid].get("n_tiles", 0)) for sid in store.slide_ids}

    step_px = _step_px(store)
    source = {"embeddings": str(store.path), "tile_encoder": store.encoder, "mismatches_forced": issues}
    report = slide_embed(model, store, out=out, step_px=step_px, sizes=sizes, source=source, options=options)
    where = f"shard {report.shard[0]}/{report.shard[1]}: " if report.shard[1] > 1 else ""
    console.print(
        f"{where}embedded {len(report.embedded)} slide(s), {report.n_tiles} tiles in {report.seconds:.1f} s;"
        f" {len(report.skipped)} already done"
    )
    console.print(
        f"  slide embeddings: {report.out}/slides/<slide_id>.safetensors (cls, mean"
        + (", tiles, coords)" if options.tiles else ")")
    )
    for sid, reason in report.failed.items():
        console.print(f"  [red]failed[/red] {sid}: {reason}")
    return 1 if report.failed else 0
