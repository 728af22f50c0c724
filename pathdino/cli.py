"""The `pathdino` command. Thin: parse flags, call the modules, turn known errors into one-line messages."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="pathdino: slide folders → Zarr tile stores → DINOv2 pretraining → tile encoders → "
                       "slide embeddings.")

SAMPLE_SLIDE = Path(__file__).parent / "sample_data" / "CMU-1-Small-Region.svs"


def _fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _known_errors() -> tuple[type[BaseException], ...]:
    from tiling.configio import ConfigError
    from tiling.inputs import InputError
    from tiling.store import StoreError

    return (ConfigError, InputError, StoreError, ValueError, FileNotFoundError)


@app.command()
def tile(
    inputs: List[str] = typer.Argument(..., help="Slide files, folders (searched recursively), globs, or a manifest "
                                                 "CSV with columns path[,slide_id][,mpp]."),
    out: str = typer.Option(..., "--out", "-o", help="Tile store: a local folder or an fsspec URL."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML config (see configs/tiling/); "
                                                                        "flags given here override it."),
    target_mpp: Optional[float] = typer.Option(None, help="Output resolution in µm/px [default 0.5]."),
    tile_px: Optional[int] = typer.Option(None, help="Tile side in output pixels [default 224]."),
    overlap_px: Optional[int] = typer.Option(None, help="Overlap between tiles in output pixels [default 0]."),
    mpp_tolerance: Optional[float] = typer.Option(None, help="Relative tolerance for using a level as is "
                                                             "[default 0.05]."),
    backend: Optional[str] = typer.Option(None, help="auto | openslide | tiffslide [default auto]."),
    slide_mpp: Optional[float] = typer.Option(None, help="Override every slide's level-0 µm/px (a manifest's mpp "
                                                         "column wins per slide)."),
    min_tissue_fraction: Optional[float] = typer.Option(None, help="Keep tiles with at least this tissue fraction."),
    encoding: Optional[str] = typer.Option(None, help="jpeg (default) | png (lossless)."),
    jpeg_quality: Optional[int] = typer.Option(None, help="JPEG quality [default 90]."),
    workers: Optional[int] = typer.Option(None, "--workers", "-j", help="Worker processes [default: all cores]."),
    shard: Optional[str] = typer.Option(None, help="i/N: tile only this machine's share of the slides (0-based); "
                                                   "SLURM array variables are used when absent."),
    overwrite: bool = typer.Option(False, help="Re-tile slides that are already complete with the same inputs."),
    no_qc_images: bool = typer.Option(False, "--no-qc-images", help="Skip the per-slide QC PNGs."),
) -> None:
    """Tile whole-slide images into a sharded Zarr v3 tile store (resumable; failures recorded per slide)."""
    from pathdino.cli_tile import build_config, tile_command

    flags = {"target_mpp": target_mpp, "tile_px": tile_px, "overlap_px": overlap_px, "mpp_tolerance": mpp_tolerance,
             "backend": backend, "tissue.min_tissue_fraction": min_tissue_fraction, "encoding": encoding,
             "jpeg_quality": jpeg_quality, "workers": workers, "qc_images": False if no_qc_images else None}
    try:
        cfg = build_config(config, flags)
        code = tile_command(inputs, out, cfg, slide_mpp=slide_mpp, shard=shard, overwrite=overwrite)
    except _known_errors() as exc:
        _fail(str(exc))
    raise typer.Exit(code)


@app.command()
def info(
    store: str = typer.Argument(..., help="A tile store (folder or fsspec URL)."),
    failures: bool = typer.Option(False, "--failures", help="Also print each failure's traceback."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Print what a tile store holds: slides, tiles, parameters, failures."""
    from pathdino.cli_tile import info_command

    try:
        code = info_command(store, failures, as_json)
    except _known_errors() as exc:
        _fail(str(exc))
    raise typer.Exit(code)


@app.command()
def demo(
    out: Path = typer.Option(Path("pathdino-demo"), "--out", "-o", help="Folder for every output of the demo."),
    workers: int = typer.Option(2, "--workers", "-j", help="Tiling worker processes."),
) -> None:
    """Run the pipeline on the bundled sample slide (CMU-1-Small-Region, CC0) and print where each output is."""
    from pathdino.demo import run_demo

    try:
        code = run_demo(out, workers=workers, sample_slide=SAMPLE_SLIDE)
    except _known_errors() as exc:
        _fail(str(exc))
    raise typer.Exit(code)


def _use_errors() -> tuple[type[BaseException], ...]:
    from pathdino.cli_use import known_errors

    return known_errors()


@app.command()
def export(
    checkpoint: str = typer.Argument(..., help="A training checkpoint (step_* folder) or a training output folder "
                                               "(its newest complete checkpoint is used)."),
    out: str = typer.Option(..., "--out", "-o", help="Encoder folder to write (model.safetensors, config.json, "
                                                     "README.md)."),
    tile_px: Optional[int] = typer.Option(None, help="Tile side the encoder was trained on [default: read from the "
                                                     "training stores]."),
    target_mpp: Optional[float] = typer.Option(None, "--mpp", help="µm/px the encoder was trained at [default: read "
                                                                   "from the training stores]."),
    name: Optional[str] = typer.Option(None, help="Model name for the model card [default: the folder name]."),
    license_: str = typer.Option("other", "--license", help="License written in the model card / pretrained_cfg."),
    overwrite: bool = typer.Option(False, help="Replace an existing output folder."),
) -> None:
    """Export the teacher backbone of a checkpoint as a timm encoder folder (checked by reloading it)."""
    from pathdino.cli_use import export_command

    try:
        code = export_command(checkpoint, out, tile_px, target_mpp, name, license_, overwrite)
    except _use_errors() as exc:
        _fail(str(exc))
    raise typer.Exit(code)


@app.command()
def embed(
    store: str = typer.Argument(..., help="A tile store (folder or fsspec URL)."),
    encoder: str = typer.Option(..., "--encoder", "-e", help="An encoder folder: `pathdino export` output, or a timm "
                                                             "hub-style folder (UNI, Virchow2, H-optimus, ...)."),
    out: str = typer.Option(..., "--out", "-o", help="Embeddings store to create or complete (local folder)."),
    formats: List[str] = typer.Option(["zarr"], "--format", "-f", help="zarr (always written) | h5: also one "
                                                                       "CLAM/TRIDENT-style HDF5 per slide in OUT/h5/."),
    mean_patch: bool = typer.Option(False, "--mean-patch", help="Also store each tile's mean patch token."),
    patch_tokens: bool = typer.Option(False, "--patch-tokens", help="Also store every patch token (float16, "
                                                                    "chunked) for dense tasks and heat maps."),
    shard: Optional[str] = typer.Option(None, help="i/N: this process's share (SLURM array task, one machine); "
                                                   "any number run at once into one OUT [default: the launcher's "
                                                   "RANK/WORLD_SIZE under accelerate, else all]."),
    part_tiles: int = typer.Option(16384, help="Slides with more tiles are cut into parts embedded by several "
                                               "processes."),
    encoder_table: Optional[str] = typer.Option(None, help="JSON list of extra known-encoder entries (µm/px, "
                                                           "mean/std, recipe) for third-party folders."),
    batch_size: int = typer.Option(256, help="Tiles per forward pass."),
    workers: int = typer.Option(4, "--workers", "-j", help="Decoding worker processes (0: decode in-process)."),
    device: Optional[str] = typer.Option(None, help="cuda | cpu | cuda:N [default: cuda when available]."),
    precision: str = typer.Option("auto", help="auto (bf16 autocast on GPU, fp32 on CPU) | bf16 | fp32."),
    slides: Optional[List[str]] = typer.Option(None, "--slides", help="Only these slide ids / glob patterns "
                                                                      "(repeatable)."),
    force: bool = typer.Option(False, help="Embed even if the store's tile size or µm/px differ from the "
                                           "encoder's."),
    overwrite: bool = typer.Option(False, help="Recompute slides that are already complete."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar."),
) -> None:
    """Embed every tile of every slide with level-0 coordinates; resumable, shardable over processes and machines."""
    from pathdino.cli_use import embed_command

    try:
        code = embed_command(store, encoder, out, formats, mean_patch, batch_size, workers, device, precision,
                             slides, force, overwrite, not no_progress, patch_tokens=patch_tokens, shard=shard,
                             part_tiles=part_tiles, encoder_table=encoder_table)
    except _use_errors() as exc:
        _fail(str(exc))
    raise typer.Exit(code)


@app.command(name="eval")
def eval_(
    dataset: str = typer.Argument(..., help="Labelled tiles: a folder with one sub-folder per class (optionally "
                                            "under train/val/test) or a CSV path,label[,split][,patient]."),
    encoder: Optional[str] = typer.Option(None, "--encoder", "-e", help="An exported encoder folder."),
    arch: Optional[str] = typer.Option(None, "--arch", help="A timm architecture with random weights (the "
                                                            "baseline), instead of --encoder."),
    out: str = typer.Option(..., "--out", "-o", help="JSON report to write."),
    methods: List[str] = typer.Option(["knn", "linear", "fewshot", "diagnostics"], "--method", "-m",
                                      help="knn | linear | fewshot | diagnostics (repeatable)."),
    img_size: int = typer.Option(224, help="Input size of the --arch baseline."),
    batch_size: int = typer.Option(64, help="Tiles per forward pass."),
    workers: int = typer.Option(0, "--workers", "-j", help="Image-decoding worker processes."),
    device: Optional[str] = typer.Option(None, help="cuda | cpu [default: cuda when available]."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bars."),
) -> None:
    """Frozen-feature tile classification (kNN, linear probe, few-shot) and label-free diagnostics."""
    from pathdino.cli_use import eval_command

    try:
        code = eval_command(dataset, encoder, arch, out, methods, img_size, batch_size, workers, device,
                            not no_progress)
    except _use_errors() as exc:
        _fail(str(exc))
    raise typer.Exit(code)


@app.command()
def mil(
    labels_csv: str = typer.Argument(..., help="CSV with columns slide_id,label[,split]."),
    embeddings: str = typer.Option(..., "--embeddings", help="An embeddings store (`pathdino embed --out`) or a "
                                                             "folder of <slide_id>.h5 (features, coords)."),
    out: str = typer.Option(..., "--out", "-o", help="Folder for abmil.safetensors, attention.npz, metrics.json."),
    feature: str = typer.Option("cls", help="cls | mean_patch (embeddings stores made with --mean-patch)."),
    max_epochs: int = typer.Option(50, help="Passes over the training slides (early stopping on validation)."),
    hidden_dim: int = typer.Option(256, help="ABMIL hidden width."),
    lr: float = typer.Option(2e-4, help="AdamW learning rate."),
    device: str = typer.Option("cpu", help="cpu | cuda."),
    skip_missing: bool = typer.Option(False, help="Drop labelled slides without embeddings instead of failing."),
    seed: int = typer.Option(0, help="Seed of the model, slide order and the drawn split."),
) -> None:
    """Train and evaluate a gated-attention MIL (ABMIL) slide classifier on slide embeddings."""
    from pathdino.cli_use import mil_command

    try:
        code = mil_command(labels_csv, embeddings, out, feature, max_epochs, hidden_dim, lr, device, skip_missing,
                           seed)
    except _use_errors() as exc:
        _fail(str(exc))
    raise typer.Exit(code)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
