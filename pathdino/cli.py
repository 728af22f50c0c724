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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
