"""Implementations of ``pathdino export``, ``embed``, ``eval`` and ``mil`` (the typer commands in main.py are thin).

Each takes its options dataclass (built from the flags by main.py in one call), returns a process exit code and
prints where its outputs are. Heavy modules (torch, timm) are imported here, never by main.py at import time, so
``pathdino tile`` stays light. Errors the user can fix are ``PathdinoError``s (main.py prints them as one line).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console

from tiling.configio import ConfigError
from tiling.errors import MissingFileError

if TYPE_CHECKING:
    from pathdino.embed import EmbedOptions
    from pathdino.eval import EvalOptions
    from pathdino.export import ExportOptions
    from pathdino.mil import MILConfig

console = Console(highlight=False, soft_wrap=True)


def export_command(checkpoint: str, out: str, options: ExportOptions) -> int:
    from pathdino.export import export_checkpoint
    from pathdino.export.source import resolve_checkpoint_dir
    from pathdino.slide.pretrained import is_slide_checkpoint

    if is_slide_checkpoint(resolve_checkpoint_dir(checkpoint)):
        return _export_slide(resolve_checkpoint_dir(checkpoint), out, options)
    result = export_checkpoint(checkpoint, out, options)
    console.print(f"exported {result.architecture} (step {result.step}) to {result.out_dir}")
    console.print(
        f"  trained on {result.tile_px} px tiles at {result.target_mpp} µm/px; reload check: max "
        f"|difference| {result.max_abs_diff:.3g}"
    )
    for note in result.notes:
        console.print(f"  [yellow]note:[/yellow] {note}")
    console.print(
        f"  load it: pathdino.load_encoder({str(result.out_dir)!r}) or "
        f"timm.create_model('local-dir:{result.out_dir}', pretrained=True)"
    )
    return 0


def _export_slide(checkpoint: Path, out: str, options: ExportOptions) -> int:
    """``pathdino export`` of a slide-pretraining run: a slide-encoder folder (pathdino.slide.pretrained)."""
    from pathdino.slide.pretrained import export_slide_checkpoint

    result = export_slide_checkpoint(checkpoint, out, overwrite=options.overwrite)
    console.print(f"exported the slide encoder ({result.weights} weights, step {result.step}) to {result.out_dir}")
    console.print(
        f"  reads embeddings of the tile encoder {result.tile_encoder!r}; reload check: max |difference| "
        f"{result.max_abs_diff:.3g}"
    )
    console.print(f"  load it: pathdino.load_slide_encoder({str(result.out_dir)!r})")
    return 0


def embed_command(store: str, encoder: str, out: str, *, options: EmbedOptions) -> int:
    from pathdino.embed import embed_store, h5_dir
    from pathdino.embed.plan import shard_from_env

    if options.shard is None and (launched := shard_from_env()) is not None:
        one_bar_per_machine = os.environ.get("LOCAL_RANK", "0") == "0"
        options = replace(options, progress=options.progress and one_bar_per_machine)
        console.print(f"rank {launched[0]} of {launched[1]} (from the launcher): shard {launched[0]}/{launched[1]}")
    report = embed_store(store, encoder, out, options)
    where = f"shard {report.shard[0]}/{report.shard[1]}: " if report.shard[1] > 1 else ""
    console.print(f"{where}uses {report.uses}")
    console.print(
        f"{where}embedded {len(report.embedded)} slide(s), {report.n_tiles} tiles in {report.seconds:.1f} s "
        f"({report.tiles_per_s:.0f} tiles/s); {len(report.skipped)} already complete"
    )
    if report.waiting:
        console.print(
            f"  {len(report.waiting)} slide(s) wait for parts other processes embed; whichever finishes "
            "a slide's last part commits it (rerun to finish if those processes died)"
        )
    console.print(f"  embeddings: {report.out}" + (f"  (h5: {h5_dir(report.out)})" if "h5" in options.formats else ""))
    if report.forced:
        console.print(
            f"  [yellow]--force:[/yellow] {len(report.forced)} slide(s) embedded despite a tile-size or "
            "µm/px mismatch (recorded in their attributes)"
        )
    for sid, reason in report.failed.items():
        console.print(f"  [red]failed[/red] {sid}: {reason}")
    return 1 if report.failed else 0


def eval_command(
    dataset: str,
    options: EvalOptions,
    *,
    encoder: str | None,
    arch: str | None,
    out: str,
    methods: list[str],
    img_size: int,
) -> int:
    from pathdino.eval import eval_transform, random_baseline_encoder, run_eval

    if (encoder is None) == (arch is None):
        raise ConfigError(
            "give exactly one of --encoder DIR (an exported encoder) or --arch TIMM_ARCH (random-weight baseline)"
        )
    if encoder is not None:
        from pathdino.export import load_encoder

        model, transform = load_encoder(encoder)
    else:
        model, transform = random_baseline_encoder(arch, img_size), eval_transform(img_size)
    report = run_eval(model, transform, dataset, methods=tuple(methods), out_json=out, options=options)
    console.print(f"evaluated on {report['eval_split']} split ({report['feature_dim']}-d features); report: {out}")
    if report["unreadable"]["n"]:
        console.print(
            f"  [yellow]skipped {report['unreadable']['n']} unreadable image(s)[/yellow] (listed in the "
            "report's 'unreadable')"
        )
    for method, result in report["methods"].items():
        console.print(f"  {method}: {_headline(result)}")
    return 0


def _headline(result: object) -> str:
    """The few numbers worth a line: balanced accuracy / macro-F1 wherever they appear, or RankMe."""
    found: list[str] = []

    def walk(obj: object, path: str) -> None:
        if isinstance(obj, dict):
            for key, value in obj.items():
                if key in ("balanced_accuracy", "macro_f1", "rankme") and isinstance(value, (int, float)):
                    found.append(f"{path}{key}={value:.3f}")
                elif isinstance(value, dict) and len(found) < 8:
                    walk(value, f"{path}{key}.")

    walk(result, "")
    return ", ".join(found[:8]) or json.dumps(result)[:200]


def mil_command(labels_csv: str, embeddings: str, config: MILConfig, *, out: str, feature: str) -> int:
    from pathdino.mil import train_abmil

    source = _feature_source(Path(embeddings), feature)
    result = train_abmil(labels_csv, source, out, config=config)
    console.print(f"ABMIL: best epoch {result.best_epoch} of {result.epochs_run}; outputs in {Path(out)}")
    for split, metrics in result.metrics.items():
        auc = metrics.get("auc")
        auc_text = "n/a" if auc is None or math.isnan(auc) else f"{auc:.3f}"
        console.print(f"  {split}: balanced accuracy {metrics['balanced_accuracy']:.3f}, AUC {auc_text}")
    console.print(f"  attention for heat maps: {result.attention_path} (pathdino.mil.load_attention)")
    return 0


def _feature_source(path: Path, feature: str):
    """An embeddings store (``pathdino embed --out``), its ``h5/`` folder, or any folder of CLAM/TRIDENT h5 files."""
    from pathdino.embed import EmbeddingStore
    from pathdino.mil import H5FeatureReader

    if (path / "zarr.json").is_file():
        return EmbeddingStore(path, feature=feature)
    if path.is_dir() and any(path.glob("*.h5")):
        if feature != "features":
            raise ConfigError(
                f"--feature {feature}: h5 folders hold one 'features' array (the encoder's tile "
                "embedding); leave --feature out, or point --embeddings at the embeddings store"
            )
        return H5FeatureReader(path)
    raise MissingFileError(
        f"--embeddings {path}: neither an embeddings store (zarr.json) nor a folder of "
        "<slide_id>.h5 files; create one with `pathdino embed`"
    )
