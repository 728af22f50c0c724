"""The `pathdino` command. Thin: parse flags, call the modules, turn project errors into one-line messages.

Every command builds its options dataclass from its flags in one call (``build_config`` for `tile`, the ``Flags``
of cli/options.py for the others) and its help shows each flag's default from that dataclass, filled in when help
is shown (so `pathdino` itself starts without torch). A ``PathdinoError`` (bad config, flag, input, store,
checkpoint) prints as ``error: ...`` with exit code 2; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import List, Optional

import click
import typer
from typer.core import TyperCommand

from pathdino.cli.options import EMBED, EVAL, EXPORT, MIL, SLIDE_EMBED, SLIDE_MIL, SLIDE_ONLY_FLAGS, mil_defaults

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="pathdino: slide folders → Zarr tile stores → DINOv2 pretraining → tile encoders → slide embeddings.",
)

SAMPLE_SLIDE = Path(__file__).parents[1] / "sample_data" / "CMU-1-Small-Region.svs"


def _fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _project_error() -> type[Exception]:
    """``tiling.errors.PathdinoError``, imported when an error is handled: `pathdino` starts without ``tiling.*``."""
    from tiling.errors import PathdinoError

    return PathdinoError


def _tiling_defaults() -> dict[str, str]:
    """Each `pathdino tile` flag's effective default, from the config dataclass (one source), with its unit."""
    from tiling.config import TilingConfig

    d = TilingConfig()
    return {
        "target_mpp": f"{d.target_mpp:g} µm/px",
        "tile_px": f"{d.tile_px} px",
        "overlap_px": f"{d.overlap_px} px",
        "mpp_tolerance": f"{d.mpp_tolerance:g}, i.e. {d.mpp_tolerance:.0%}",
        "backend": d.backend,
        "min_tissue_fraction": f"{d.tissue.min_tissue_fraction:g} of the tile's area",
        "encoding": d.encoding,
        "jpeg_quality": f"{d.jpeg_quality} on 1-100",
        "workers": f"one per CPU core, {d.n_workers} here" if d.workers == 0 else f"{d.workers} processes",
        "slide_mpp": "each slide's own, from its metadata",
        "config": "none: the built-in defaults",
        "max_decode_failure_fraction": f"{d.max_decode_failure_fraction:g}, i.e. "
        f"{d.max_decode_failure_fraction:.0%} of a slide's candidate tiles",
        "shard": "all slides; a SLURM array's share when set",
    }


class _OptionsCommand(TyperCommand):
    """A command whose help fills in each flag's default from its options dataclass when help is shown: `pathdino`
    itself starts without importing the dataclasses' modules (torch; the tiler's scikit-image, ~1.5 s)."""

    defaults: Callable[[], dict[str, str]] = staticmethod(dict)

    def format_help(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        defaults = self.defaults()
        for param in self.params:
            if param.name in defaults:
                param.show_default = defaults[param.name]
        super().format_help(ctx, formatter)


def _defaults_from(defaults: Callable[[], dict[str, str]]) -> type[TyperCommand]:
    """A command class whose help shows ``defaults()`` (flag parameter -> default text)."""
    return type("OptionsCommand", (_OptionsCommand,), {"defaults": staticmethod(defaults)})


_TileCommand = _defaults_from(_tiling_defaults)


@app.command(cls=_TileCommand)
def tile(
    inputs: List[str] = typer.Argument(
        ...,
        help="Slide files, folders (searched recursively), globs, or a manifest "
        "CSV with columns path[,slide_id][,mpp].",
    ),
    out: str = typer.Option(..., "--out", "-o", help="Tile store: a local folder or an fsspec URL."),
    config: Optional[Path] = typer.Option(
        None, "--config", "-c", help="YAML config (see configs/tiling/); flags given here override it."
    ),
    target_mpp: Optional[float] = typer.Option(None, help="Output resolution in µm/px (0.5 ≈ 20x)."),
    tile_px: Optional[int] = typer.Option(None, help="Tile side in output pixels."),
    overlap_px: Optional[int] = typer.Option(None, help="Overlap between neighbouring tiles in output pixels."),
    mpp_tolerance: Optional[float] = typer.Option(
        None, help="A level whose µm/px is within this relative distance of --target-mpp is read as is."
    ),
    backend: Optional[str] = typer.Option(None, help="Slide reader: auto | openslide | tiffslide."),
    slide_mpp: Optional[float] = typer.Option(
        None, help="Override every slide's level-0 µm/px (a manifest's mpp column wins per slide)."
    ),
    min_tissue_fraction: Optional[float] = typer.Option(
        None, help="Keep tiles with at least this tissue fraction (0-1)."
    ),
    encoding: Optional[str] = typer.Option(None, help="Tile encoding: jpeg (lossy) | png (lossless)."),
    jpeg_quality: Optional[int] = typer.Option(None, help="JPEG quality."),
    workers: Optional[int] = typer.Option(None, "--workers", "-j", help="Worker processes."),
    shard: Optional[str] = typer.Option(None, help="i/N: tile only this machine's share of the slides (0-based)."),
    overwrite: bool = typer.Option(
        False,
        "--overwrite",
        show_default="off: complete slides are skipped",
        help="Re-tile slides that are already complete with the same inputs.",
    ),
    no_qc_images: bool = typer.Option(
        False, "--no-qc-images", show_default="off: QC images are written", help="Skip the per-slide QC PNGs."
    ),
    dry_run: bool = typer.Option(
        False,
        "--dry-run",
        show_default="off",
        help="List the slides found (and the files skipped) and stop; writes nothing.",
    ),
    fail_on_empty: bool = typer.Option(
        False,
        "--fail-on-empty",
        show_default="off: exit 0, the summary says so",
        help="Exit 1 when a slide gave no tiles (no tissue, or every tile rejected).",
    ),
    max_decode_failure_fraction: Optional[float] = typer.Option(
        None,
        help="Fail a slide when more than this share (0-1) of its candidate tiles cannot be read because "
        "source tiles fail to decode (a damaged file); fewer are dropped and counted.",
    ),
) -> None:
    """Tile whole-slide images into a sharded Zarr v3 tile store (resumable; failures recorded per slide)."""
    from pathdino.cli.tile import build_config, tile_command

    flags = {
        "target_mpp": target_mpp,
        "tile_px": tile_px,
        "overlap_px": overlap_px,
        "mpp_tolerance": mpp_tolerance,
        "backend": backend,
        "tissue.min_tissue_fraction": min_tissue_fraction,
        "encoding": encoding,
        "jpeg_quality": jpeg_quality,
        "workers": workers,
        "qc_images": False if no_qc_images else None,
        "max_decode_failure_fraction": max_decode_failure_fraction,
    }
    try:
        cfg = build_config(config, flags)
        code = tile_command(
            inputs,
            out,
            cfg,
            slide_mpp=slide_mpp,
            shard=shard,
            overwrite=overwrite,
            dry_run=dry_run,
            fail_on_empty=fail_on_empty,
        )
    except _project_error() as exc:
        _fail(str(exc))
    raise typer.Exit(code)


@app.command()
def info(
    store: str = typer.Argument(..., help="A tile store (folder or fsspec URL)."),
    failures: bool = typer.Option(
        False,
        "--failures",
        show_default="off: one line per failure",
        help="Also print each failure's full message and traceback.",
    ),
    as_json: bool = typer.Option(False, "--json", show_default="off: tables", help="Print the summary as JSON."),
) -> None:
    """Print what a tile store holds: slides, tiles, parameters, failures."""
    from pathdino.cli.tile import info_command

    try:
        code = info_command(store, failures, as_json)
    except _project_error() as exc:
        _fail(str(exc))
    raise typer.Exit(code)


# The options `train` and `slide-train` share: one definition, so the two commands cannot drift apart.
_RESUME = typer.Option(
    False,
    "--resume",
    show_default="off: a fresh run (refused if train.output_dir holds checkpoints)",
    help="Resume from the newest checkpoint in train.output_dir.",
)
_RESUME_FROM = typer.Option(
    None,
    "--resume-from",
    metavar="CHECKPOINT",
    show_default="none: see --resume",
    help="Resume from this checkpoint folder (step_*).",
)
_NUM_PROCESSES = typer.Option(
    None,
    "--num-processes",
    "-n",
    show_default="1, or the accelerate config's num_processes",
    help="Processes in total. More than 1: print the accelerate launch line to run.",
)
_ACCELERATE_CONFIG = typer.Option(
    None,
    "--accelerate-config",
    show_default="none: one process here, or the generic multi-process flags",
    help="An accelerate config (configs/accelerate/*.yaml): print the accelerate launch line that uses it.",
)


def _launch(module: str, **flags) -> None:
    """Run a trainer here or print its launch line (cli/train.py), with project errors as one-line messages."""
    from pathdino.cli.train import plan_launch, train_command

    try:
        launch = plan_launch(module=module, **flags)
    except _project_error() as exc:
        _fail(str(exc))
    raise typer.Exit(train_command(launch))


@app.command()
def train(
    *,
    config: Path = typer.Option(..., "--config", "-c", help="YAML training config, e.g. configs/train/vits14.yaml."),
    overrides: Optional[List[str]] = typer.Argument(
        None,
        metavar="[KEY=VALUE]...",
        help="Config overrides with dotted keys, e.g. train.batch_size=256 optim.base_lr=2e-4.",
    ),
    resume: bool = _RESUME,
    resume_from: Optional[str] = _RESUME_FROM,
    check: bool = typer.Option(
        False, "--check", show_default="off: train", help="Validate the config and tile stores, then exit."
    ),
    num_processes: Optional[int] = _NUM_PROCESSES,
    accelerate_config: Optional[Path] = _ACCELERATE_CONFIG,
) -> None:
    """DINOv2 pretraining: runs `python -m pathdino.train` here (one process) or prints the `accelerate launch` line."""
    _launch(
        "pathdino.train",
        config=config,
        overrides=list(overrides or []),
        resume=resume,
        resume_from=resume_from,
        check=check,
        num_processes=num_processes,
        accelerate_config=accelerate_config,
    )


@app.command("slide-train")
def slide_train(
    *,
    config: Path = typer.Option(
        ..., "--config", "-c", help="YAML slide-pretraining config, e.g. configs/slide/small.yaml."
    ),
    overrides: Optional[List[str]] = typer.Argument(
        None,
        metavar="[KEY=VALUE]...",
        help="Config overrides with dotted keys, e.g. data.embeddings=[runs/emb] optim.lr=3e-4.",
    ),
    resume: bool = _RESUME,
    resume_from: Optional[str] = _RESUME_FROM,
    check: bool = typer.Option(
        False, "--check", show_default="off: train", help="Validate the config and embeddings stores, then exit."
    ),
    num_processes: Optional[int] = _NUM_PROCESSES,
    accelerate_config: Optional[Path] = _ACCELERATE_CONFIG,
) -> None:
    """Slide-encoder pretraining (masked autoencoding on `pathdino embed` outputs): runs `python -m
    pathdino.slide.train` here (one process) or prints the `accelerate launch` line."""
    _launch(
        "pathdino.slide.train",
        config=config,
        overrides=list(overrides or []),
        resume=resume,
        resume_from=resume_from,
        check=check,
        num_processes=num_processes,
        accelerate_config=accelerate_config,
    )


@app.command()
def demo(
    out: Path = typer.Option(Path("pathdino-demo"), "--out", "-o", help="Folder for every output of the demo."),
    workers: int = typer.Option(2, "--workers", "-j", help="Tiling worker processes."),
) -> None:
    """Run the pipeline on the bundled sample slide (CMU-1-Small-Region, CC0) and print where each output is."""
    from pathdino.cli.demo import run_demo

    try:
        code = run_demo(out, workers=workers, sample_slide=SAMPLE_SLIDE)
    except _project_error() as exc:
        _fail(str(exc))
    raise typer.Exit(code)


@app.command(cls=_defaults_from(EXPORT.defaults))
def export(
    ctx: typer.Context,
    *,
    checkpoint: str = typer.Argument(
        ...,
        help="A training checkpoint (step_* or best folder) or a training output "
        "folder (--checkpoint picks which of its checkpoints).",
    ),
    out: str = typer.Option(
        ..., "--out", "-o", help="Encoder folder to write (model.safetensors, config.json, README.md)."
    ),
    tile_px: Optional[int] = typer.Option(None, help="Tile side the encoder was trained on, px."),
    target_mpp: Optional[float] = typer.Option(None, "--mpp", help="µm/px the encoder was trained at."),
    name: Optional[str] = typer.Option(None, help="Model name for the model card."),
    license_: Optional[str] = typer.Option(
        None, "--license", help="License written in the model card / pretrained_cfg."
    ),
    overwrite: bool = typer.Option(False, help="Replace an existing output folder."),
    pick: Optional[str] = typer.Option(
        None,
        "--checkpoint",
        help="Of a training output folder: latest (newest step), best (the best "
        "in-training probe score, eval.probe.keep_best) or a step number.",
    ),
) -> None:
    """Export the teacher backbone of a checkpoint as a timm encoder folder (checked by reloading it)."""
    from pathdino.cli.use import export_command

    try:
        code = export_command(checkpoint, out, EXPORT.build(ctx.params, command="export"))
    except _project_error() as exc:
        _fail(str(exc))
    raise typer.Exit(code)


@app.command(cls=_defaults_from(EMBED.defaults))
def embed(
    ctx: typer.Context,
    *,
    store: str = typer.Argument(..., help="A tile store (folder or fsspec URL)."),
    encoder: str = typer.Option(
        ...,
        "--encoder",
        "-e",
        help="An encoder folder: `pathdino export` output, or a timm hub-style folder (UNI, Virchow2, H-optimus, ...).",
    ),
    out: str = typer.Option(..., "--out", "-o", help="Embeddings store to create or complete (local folder)."),
    formats: Optional[List[str]] = typer.Option(
        None,
        "--format",
        "-f",
        help="zarr (always written) | h5: also one CLAM/TRIDENT-style HDF5 per slide in OUT/h5/.",
    ),
    mean_patch: bool = typer.Option(False, "--mean-patch", help="Also store each tile's mean patch token."),
    patch_tokens: bool = typer.Option(
        False, "--patch-tokens", help="Also store every patch token (float16, chunked) for dense tasks and heat maps."
    ),
    shard: Optional[str] = typer.Option(
        None, help="i/N: this process's share (SLURM array task, one machine); any number run at once into one OUT."
    ),
    part_tiles: Optional[int] = typer.Option(
        None, help="Slides with more tiles are cut into parts embedded by several processes."
    ),
    encoder_table: Optional[str] = typer.Option(
        None, help="JSON list of extra known-encoder entries (µm/px, mean/std, recipe) for third-party folders."
    ),
    batch_size: Optional[int] = typer.Option(None, help="Tiles per forward pass."),
    workers: Optional[int] = typer.Option(
        None, "--workers", "-j", help="Decoding worker processes (0: decode in-process)."
    ),
    device: Optional[str] = typer.Option(None, help="cuda | cpu | cuda:N."),
    precision: Optional[str] = typer.Option(None, help="auto (bf16 autocast on GPU, fp32 on CPU) | bf16 | fp32."),
    slides: Optional[List[str]] = typer.Option(
        None, "--slides", help="Only these slide ids / glob patterns (repeatable)."
    ),
    force: bool = typer.Option(False, help="Embed even if the store's tile size or µm/px differ from the encoder's."),
    overwrite: bool = typer.Option(False, help="Recompute slides that are already complete."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar."),
) -> None:
    """Embed every tile of every slide with level-0 coordinates; resumable, shardable over processes and machines."""
    from pathdino.cli.use import embed_command

    try:
        code = embed_command(store, encoder, out, options=EMBED.build(ctx.params, command="embed"))
    except _project_error() as exc:
        _fail(str(exc))
    raise typer.Exit(code)


@app.command(name="eval", cls=_defaults_from(EVAL.defaults))
def eval_(
    ctx: typer.Context,
    *,
    dataset: str = typer.Argument(
        ...,
        help="Labelled tiles: a folder with one sub-folder per class (optionally "
        "under train/val/test) or a CSV path,label[,split][,patient].",
    ),
    encoder: Optional[str] = typer.Option(
        None, "--encoder", "-e", show_default="none: give it or --arch", help="An exported encoder folder."
    ),
    arch: Optional[str] = typer.Option(
        None,
        "--arch",
        show_default="none: give it or --encoder",
        help="A timm architecture with random weights (the baseline), instead of --encoder.",
    ),
    out: str = typer.Option(..., "--out", "-o", help="JSON report to write."),
    methods: List[str] = typer.Option(
        ["knn", "linear", "fewshot", "diagnostics"],
        "--method",
        "-m",
        help="knn | linear | fewshot | diagnostics (repeatable).",
    ),
    img_size: int = typer.Option(224, help="Input size of the --arch baseline."),
    batch_size: Optional[int] = typer.Option(None, help="Tiles per forward pass."),
    workers: Optional[int] = typer.Option(None, "--workers", "-j", help="Image-decoding worker processes."),
    device: Optional[str] = typer.Option(None, help="cuda | cpu."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bars."),
    max_unreadable: Optional[float] = typer.Option(
        None,
        "--max-unreadable",
        help="Share of the dataset's images that may be unreadable (skipped with a warning); above it eval stops.",
    ),
) -> None:
    """Frozen-feature tile classification (kNN, linear probe, few-shot) and label-free diagnostics."""
    from pathdino.cli.use import eval_command

    try:
        code = eval_command(
            dataset,
            EVAL.build(ctx.params, command="eval"),
            encoder=encoder,
            arch=arch,
            out=out,
            methods=methods,
            img_size=img_size,
        )
    except _project_error() as exc:
        _fail(str(exc))
    raise typer.Exit(code)


@app.command(cls=_defaults_from(mil_defaults))
def mil(
    ctx: typer.Context,
    *,
    labels_csv: str = typer.Argument(..., help="CSV with columns slide_id,label[,split]."),
    embeddings: str = typer.Option(
        ...,
        "--embeddings",
        help="An embeddings store (`pathdino embed --out`) or a folder of <slide_id>.h5 (features, coords).",
    ),
    out: str = typer.Option(..., "--out", "-o", help="Folder for abmil.safetensors, attention.npz, metrics.json."),
    feature: str = typer.Option(
        "features",
        help="features: the encoder's tile embedding, the h5 files' 'features' "
        "(CLS, or CLS + mean patch token for Virchow/Virchow2) | cls | "
        "mean_patch (embeddings stores only).",
    ),
    max_epochs: Optional[int] = typer.Option(
        None, help="Passes over the training slides (early stopping on validation)."
    ),
    hidden_dim: Optional[int] = typer.Option(None, help="ABMIL hidden width."),
    lr: Optional[float] = typer.Option(None, help="AdamW learning rate."),
    device: Optional[str] = typer.Option(None, help="cpu | cuda."),
    skip_missing: bool = typer.Option(False, help="Drop labelled slides without embeddings instead of failing."),
    seed: Optional[int] = typer.Option(None, help="Seed of the model, slide order and the drawn split."),
    slide_encoder: Optional[str] = typer.Option(
        None,
        "--slide-encoder",
        show_default="none: ABMIL",
        help="A slide-encoder folder: fine-tune it with a linear head "
        "(GigaPath's recipe; --max-epochs, --lr then default to 5, "
        "2.5e-4) instead of ABMIL.",
    ),
    linear_probe: bool = typer.Option(
        False,
        "--linear-probe",
        help="With --slide-encoder: a logistic regression on its frozen slide vectors, no fine-tuning.",
    ),
    layer_decay: Optional[float] = typer.Option(
        None, help="With --slide-encoder: lr multiplier per layer from the top down."
    ),
    accumulate_slides: Optional[int] = typer.Option(None, help="With --slide-encoder: slides per optimizer step."),
    max_tiles: Optional[int] = typer.Option(
        None, help="With --slide-encoder: train on a random contiguous run of this many tiles per slide."
    ),
    slide_vector: Optional[str] = typer.Option(
        None, help="With --slide-encoder: cls | mean (of the contextualised tiles)."
    ),
) -> None:
    """Train and evaluate a slide classifier: ABMIL on tile embeddings, or a fine-tuned / probed slide encoder."""
    try:
        if slide_encoder is None:
            given = [f"--{f.replace('_', '-')}" for f in SLIDE_ONLY_FLAGS if ctx.params.get(f)]
            if given:
                from tiling.configio import ConfigError

                raise ConfigError(f"pathdino mil: {', '.join(given)} only apply with --slide-encoder DIR")
            from pathdino.cli.use import mil_command

            code = mil_command(labels_csv, embeddings, MIL.build(ctx.params, command="mil"), out=out, feature=feature)
        else:
            from pathdino.cli.slide import slide_mil_command

            code = slide_mil_command(
                labels_csv,
                embeddings,
                slide_encoder,
                out=out,
                force=False,
                config=SLIDE_MIL.build(ctx.params, command="mil --slide-encoder"),
            )
    except _project_error() as exc:
        _fail(str(exc))
    raise typer.Exit(code)


@app.command(name="slide-embed", cls=_defaults_from(SLIDE_EMBED.defaults))
def slide_embed(
    ctx: typer.Context,
    *,
    embeddings: str = typer.Argument(..., help="An embeddings store (`pathdino embed --out`)."),
    slide_encoder: str = typer.Option(
        ..., "--slide-encoder", help="A slide-encoder folder (`pathdino export` of a slide-encoder run)."
    ),
    out: str = typer.Option(
        ...,
        "--out",
        "-o",
        help="Folder to create or complete: slides/<slide_id>.safetensors "
        "(cls, mean[, tiles, coords]) + slide_embed.json.",
    ),
    tiles: bool = typer.Option(False, "--tiles", help="Also write each slide's contextualised tile embeddings."),
    shard: Optional[str] = typer.Option(
        None, help="i/N: this process's share of the slides; any number run at once into one OUT."
    ),
    slides: Optional[List[str]] = typer.Option(
        None, "--slides", help="Only these slide ids / glob patterns (repeatable)."
    ),
    device: Optional[str] = typer.Option(None, help="cuda | cpu | cuda:N."),
    precision: Optional[str] = typer.Option(None, help="auto (bf16 autocast on GPU, fp32 on CPU) | bf16 | fp32."),
    force: bool = typer.Option(
        False, help="Use embeddings of another tile encoder than the one the slide encoder's card names."
    ),
    overwrite: bool = typer.Option(False, help="Recompute slides already done (and replace another run's output)."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar."),
) -> None:
    """One vector per slide (CLS and mean of contextualised tiles) from a slide encoder; resumable, shardable."""
    from pathdino.cli.slide import slide_embed_command

    try:
        code = slide_embed_command(
            embeddings, slide_encoder, out, options=SLIDE_EMBED.build(ctx.params, command="slide-embed")
        )
    except _project_error() as exc:
        _fail(str(exc))
    raise typer.Exit(code)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
