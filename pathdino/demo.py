"""`pathdino demo`: the README's main job, on the bundled sample slide."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from tiling.config import TilingConfig
from tiling.inputs import collect_slides
from tiling.runner import run_tiling
from tiling.store import TileStore, summarise

console = Console()


def run_demo(out_dir: Path, workers: int, sample_slide: Path) -> int:
    """Tile the sample slide into `out_dir/tiles.zarr` and print the store summary. Returns an exit code."""
    out_dir.mkdir(parents=True, exist_ok=True)
    store_url = str(out_dir / "tiles.zarr")
    console.rule("1. tile the sample slide")
    cfg = TilingConfig(workers=workers)
    outcomes = run_tiling(collect_slides([str(sample_slide)]), store_url, cfg)
    for o in outcomes:
        if o.status == "failed":
            console.print(f"[red]tiling failed[/]: {o.reason}")
            return 1
    store = TileStore(store_url)
    summary = summarise(store)
    for sid in store.slide_ids:
        slide = store.slide(sid)
        attrs = slide.attrs
        console.print(f"slide [bold]{sid}[/]: {slide.n_tiles} tiles of {slide.tile_px} px at "
                      f"{attrs['effective_mpp']:.3f} µm/px (slide {attrs['slide_mpp']:.3f} µm/px from "
                      f"{attrs['slide_mpp_source']}, read level {attrs['read_level']}, {attrs['pixel_source']})")
    console.print(f"tile store: {store_url}  ({summary['n_slides']} slide(s), {summary['n_tiles']} tiles)")
    console.print(f"QC images:  {out_dir / 'tiles.zarr' / 'qc'}")
    console.print(f"inspect it: pathdino info {store_url}")
    return 0
