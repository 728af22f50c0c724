"""Implementations of ``pathdino export``, ``embed``, ``eval`` and ``mil`` (the typer commands in main.py are thin).

Each returns a process exit code and prints where its outputs are. Heavy modules (torch, timm) are imported here,
never by main.py at import time, so ``pathdino tile`` stays light.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from rich.console import Console

console = Console(highlight=False, soft_wrap=True)


def known_errors() -> tuple[type[BaseException], ...]:
    """Errors that are the user's input at fault: printed as one line, no traceback."""
    from pathdino.embed.store import EmbedError
    from pathdino.export.load import EncoderFormatError
    from pathdino.export.source import ExportError
    from tiling.store import StoreError

    return (ExportError, EncoderFormatError, EmbedError, StoreError, ValueError, FileNotFoundError, KeyError)


def export_command(checkpoint: str, out: str, *, tile_px: int | None, target_mpp: float | None, name: str | None,
                   license_: str, overwrite: bool) -> int:
    from pathdino.export import ExportOptions, export_checkpoint

    result = export_checkpoint(checkpoint, out, ExportOptions(tile_px=tile_px, target_mpp=target_mpp,
                                                              model_name=name, license=license_,
                                                              overwrite=overwrite))
    console.print(f"exported {result.architecture} (step {result.step}) to {result.out_dir}")
    console.print(f"  trained on {result.tile_px} px tiles at {result.target_mpp} µm/px; reload check: max "
                  f"|difference| {result.max_abs_diff:.3g}")
    for note in result.notes:
        console.print(f"  [yellow]note:[/yellow] {note}")
    console.print(f"  load it: pathdino.load_encoder({str(result.out_dir)!r}) or "
                  f"timm.create_model('local-dir:{result.out_dir}', pretrained=True)")
    return 0


def embed_command(store: str, encoder: str, out: str, formats: list[str], mean_patch: bool, batch_size: int,
                  workers: int | None, device: str | None, precision: str, slides: list[str] | None, force: bool,
                  overwrite: bool, progress: bool, patch_tokens: bool = False, shard: str | None = None,
                  part_tiles: int = 16384, encoder_table: str | None = None) -> int:
    from pathdino.embed import EmbedOptions, embed_store
    from pathdino.embed.plan import shard_from_env
    from pathdino.embed.runner import default_decode_workers

    if shard is None and (launched := shard_from_env()) is not None:
        progress = progress and os.environ.get("LOCAL_RANK", "0") == "0"  # one bar per machine
        console.print(f"rank {launched[0]} of {launched[1]} (from the launcher): shard {launched[0]}/{launched[1]}")
    workers = default_decode_workers() if workers is None else workers
    options = EmbedOptions(batch_size=batch_size, num_workers=workers, device=device, precision=precision,
                           mean_patch=mean_patch, patch_tokens=patch_tokens, formats=tuple(formats),
                           slides=tuple(slides) if slides else None, force=force, overwrite=overwrite,
                           progress=progress, shard=shard, part_tiles=part_tiles, encoder_table=encoder_table)
    report = embed_store(store, encoder, out, options)
    where = f"shard {report.shard[0]}/{report.shard[1]}: " if report.shard[1] > 1 else ""
    console.print(f"{where}embedded {len(report.embedded)} slide(s), {report.n_tiles} tiles in {report.seconds:.1f} s "
                  f"({report.tiles_per_s:.0f} tiles/s); {len(report.skipped)} already complete")
    if report.waiting:
        console.print(f"  {len(report.waiting)} slide(s) wait for parts other processes embed; whichever finishes "
                      "a slide's last part commits it (rerun to finish if those processes died)")
    console.print(f"  embeddings: {report.out}" + (f"  (h5: {report.out / 'h5'})" if "h5" in options.formats else ""))
    if report.forced:
        console.print(f"  [yellow]--force:[/yellow] {len(report.forced)} slide(s) embedded despite a tile-size or "
                      "µm/px mismatch (recorded in their attributes)")
    for sid, reason in report.failed.items():
        console.print(f"  [red]failed[/red] {sid}: {reason}")
    return 1 if report.failed else 0


def eval_command(dataset: str, *, encoder: str | None, arch: str | None, out: str, methods: list[str],
                 img_size: int, batch_size: int, workers: int, device: str | None, progress: bool) -> int:
    from pathdino.eval import EvalOptions, eval_transform, random_baseline_encoder, run_eval

    if (encoder is None) == (arch is None):
        raise ValueError("give exactly one of --encoder DIR (an exported encoder) or --arch TIMM_ARCH "
                         "(random-weight baseline)")
    if encoder is not None:
        from pathdino.export import load_encoder

        model, transform = load_encoder(encoder)
    else:
        model, transform = random_baseline_encoder(arch, img_size), eval_transform(img_size)
    options = EvalOptions(batch_size=batch_size, num_workers=workers, device=device, progress=progress)
    report = run_eval(model, transform, dataset, methods=tuple(methods), out_json=out, options=options)
    console.print(f"evaluated on {report['eval_split']} split ({report['feature_dim']}-d features); report: {out}")
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


def mil_command(labels_csv: str, embeddings: str, *, out: str, feature: str, max_epochs: int, hidden_dim: int,
                lr: float, device: str, skip_missing: bool, seed: int) -> int:
    from pathdino.mil import MILConfig, train_abmil

    source = _feature_source(Path(embeddings), feature)
    config = MILConfig(max_epochs=max_epochs, hidden_dim=hidden_dim, lr=lr, device=device,
                       skip_missing_slides=skip_missing, seed=seed)
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
            raise ValueError(f"--feature {feature}: h5 folders hold one 'features' array (the encoder's tile "
                             "embedding); leave --feature out, or point --embeddings at the embeddings store")
        return H5FeatureReader(path)
    raise FileNotFoundError(f"--embeddings {path}: neither an embeddings store (zarr.json) nor a folder of "
                            "<slide_id>.h5 files; create one with `pathdino embed`")
