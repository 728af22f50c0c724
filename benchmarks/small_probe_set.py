"""Write the labelled probe set of the small-budget measurements (docs/training.md, "Small budgets").

No labelled tile set with enough images can be reached from the development machines (the real labelled crops
under ../shared/data/tiles are 9 and 36 images: too few for a probe whose accuracy one image does not swing). So
the probe is cut from the bundled slide itself: ``crop_px`` crops every ``stride_px`` at level 0 (0.499 µm/px)
with at least ``min_tissue`` tissue, labelled by a cellularity proxy: the count of hematoxylin blobs (skimage HED
deconvolution, fixed threshold, connected components of >= ``min_nucleus_px`` pixels) in tertiles over all crops.
It is a proxy, not a pathologist's label, and it is partly colour-driven (more nuclei = more purple), which is why a
randomly initialised ViT already scores well above chance on it.

The split is spatial: the slide is cut into square blocks of ``block_px`` in a checkerboard; crops inside white
blocks fit the probes (``train``), crops inside black ones score them (``test``), and crops that straddle a block
border are dropped, so no scored crop shares a pixel with a fitted one.

    python benchmarks/small_probe_set.py --out /tmp/probe_cmu1     # writes tiles/*.png and labels.csv
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
from PIL import Image

BUNDLED = Path(__file__).resolve().parents[1] / "pathdino" / "sample_data" / "CMU-1-Small-Region.svs"


def _tissue_fraction(rgb: np.ndarray) -> float:
    hsv = np.asarray(Image.fromarray(rgb).convert("HSV"))
    return float(((hsv[..., 1] > 20) & (hsv[..., 2] < 235)).mean())


def _nuclei_count(rgb: np.ndarray, threshold: float, min_px: int) -> int:
    from skimage.color import rgb2hed
    from skimage.measure import label

    components = label(rgb2hed(rgb)[..., 0] > threshold)
    sizes = np.bincount(components.ravel())[1:]
    return int((sizes >= min_px).sum())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--slide", type=Path, default=BUNDLED, help="a small single-region slide: level 0 is read into memory whole"
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--crop-px", type=int, default=112)
    parser.add_argument("--min-tissue", type=float, default=0.5)
    parser.add_argument("--hema-threshold", type=float, default=0.05)
    parser.add_argument("--min-nucleus-px", type=int, default=20)
    parser.add_argument("--stride-px", type=int, default=56)
    parser.add_argument("--block-px", type=int, default=336, help="checkerboard block side, in level-0 pixels")
    args = parser.parse_args(argv)

    import tiffslide

    slide = tiffslide.TiffSlide(str(args.slide))
    width, height = slide.dimensions
    region = np.asarray(slide.read_region((0, 0), 0, (width, height)).convert("RGB"))
    c, b = args.crop_px, args.block_px
    crops = []
    for y in range(0, height - c + 1, args.stride_px):
        for x in range(0, width - c + 1, args.stride_px):
            if (y // b != (y + c - 1) // b) or (x // b != (x + c - 1) // b):
                continue  # straddles a block border: would share pixels with the other split
            rgb = region[y : y + c, x : x + c]
            if _tissue_fraction(rgb) >= args.min_tissue:
                crops.append((y, x, rgb, _nuclei_count(rgb, args.hema_threshold, args.min_nucleus_px)))
    counts = np.array([n for *_, n in crops])
    edges = np.quantile(counts, [1 / 3, 2 / 3])
    names = ("low_cellularity", "mid_cellularity", "high_cellularity")
    (args.out / "tiles").mkdir(parents=True, exist_ok=True)
    rows = []
    for y, x, rgb, n in crops:
        label = names[int(np.searchsorted(edges, n, side="right"))]
        split = "train" if (y // b + x // b) % 2 == 0 else "test"
        name = f"tiles/y{y:04d}_x{x:04d}.png"
        Image.fromarray(rgb).save(args.out / name)
        rows.append({"path": name, "label": label, "split": split})
    tmp = args.out / "labels.csv.tmp"
    with tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["path", "label", "split"])
        writer.writeheader()
        writer.writerows(rows)
    tmp.rename(args.out / "labels.csv")
    for split in ("train", "test"):
        per = {k: sum(r["split"] == split and r["label"] == k for r in rows) for k in names}
        print(f"{split}: {per}")
    print(f"{len(rows)} crops of {c} px; nuclei-count tertile edges {edges.tolist()}; wrote {args.out / 'labels.csv'}")


if __name__ == "__main__":
    main()
