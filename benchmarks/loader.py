"""pathdino.data throughput on real tissue: CPU path vs a dinov2-style PIL pipeline per core, and the GPU path.

Builds (in a temp dir) a tile store of 224-px JPEG q90 tiles cut from the bundled sample slide's tissue, then
prints in one run:
  - samples/s per worker core of the CPU path for the chosen recipe (a sample = all crops of one tile plus its
    share of the iBOT masks; read, decode, crop, augment, collate), one thread, as a DataLoader worker runs;
  - the same for a reference pipeline in dinov2's style (PIL decode, torchvision transforms per crop, torch.stack)
    on the same tiles, and the ratio; the two are timed in alternating rounds so machine load hits both alike;
  - with CUDA: the GPU path end to end through the TrainLoader (workers decode, crops and colour on the GPU) and
    the GPU augmentation alone on pre-decoded tiles.

    python benchmarks/loader.py [--samples 256] [--preset dinov2] [--jitter fused] [--workers N] [--store DIR]
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

# benchmarks/tiling.py is named like the `tiling` package: keep this folder off the import path.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import numpy as np
import torch

from pathdino.data import AugmentConfig, DataConfig, MaskConfig, build_train_loader
from pathdino.data.augment import augment_on_device
from pathdino.data.masks import BlockMasker
from pathdino.data.params import CropParams, sample_params
from pathdino.data.plan import Schedule
from pathdino.data.worker import BatchBuilder, tune_worker_allocator
from tiling.store import TileStore, encode_tile
from tiling.store_write import TileStoreWriter

SAMPLE = Path(__file__).parents[1] / "pathdino" / "sample_data" / "CMU-1-Small-Region.svs"
PATCH = 14


def build_store(url: Path, tile_px: int = 224, stride: int = 56, n_slides: int = 4) -> str:
    """Real-tissue tiles (mean intensity < 220 on over half the pixels) at an overlapping stride."""
    import openslide

    with openslide.OpenSlide(str(SAMPLE)) as s:
        img = np.asarray(s.read_region((0, 0), 0, s.dimensions).convert("RGB"))
    tiles, coords = [], []
    for y in range(0, img.shape[0] - tile_px + 1, stride):
        for x in range(0, img.shape[1] - tile_px + 1, stride):
            t = img[y : y + tile_px, x : x + tile_px]
            if (t.mean(axis=2) < 220).mean() > 0.5:
                tiles.append(encode_tile(np.ascontiguousarray(t)))
                coords.append((x, y))
    writer = TileStoreWriter(url)
    per = len(tiles) // n_slides
    for i in range(n_slides):
        w = writer.begin_slide(f"cmu1-part{i}", tile_px)
        w.add(tiles[i * per : (i + 1) * per], np.array(coords[i * per : (i + 1) * per]), np.ones(per))
        w.commit({"source_path": str(SAMPLE)})
    return str(url)


def reference_pipeline(aug: AugmentConfig):
    """dinov2's DataAugmentationDINO structure on PIL images (with the intended blur probabilities)."""
    from PIL import Image
    from torchvision import transforms as T

    bicubic = T.InterpolationMode.BICUBIC

    def blur(p: float):
        return T.RandomApply([T.GaussianBlur(aug.blur_kernel_px, sigma=aug.blur_sigma)], p=p)

    jitter = T.Compose(
        [
            T.RandomApply([T.ColorJitter(aug.brightness, aug.contrast, aug.saturation, aug.hue)], p=aug.color_jitter_p),
            T.RandomGrayscale(p=aug.grayscale_p),
        ]
    )
    norm = T.Compose([T.ToTensor(), T.Normalize(aug.mean, aug.std)])
    globals_ = [
        T.Compose(
            [
                T.RandomResizedCrop(aug.global_crop_px, scale=aug.global_crop_scale, interpolation=bicubic),
                T.RandomHorizontalFlip(aug.hflip_p),
                jitter,
                blur(aug.blur_p_global[k]),
                T.RandomSolarize(128, p=aug.solarize_p_global[k]),
                norm,
            ]
        )
        for k in range(aug.n_global_crops)
    ]
    local = T.Compose(
        [
            T.RandomResizedCrop(aug.local_crop_px, scale=aug.local_crop_scale, interpolation=bicubic),
            T.RandomHorizontalFlip(aug.hflip_p),
            jitter,
            blur(aug.blur_p_local),
            norm,
        ]
    )
    masker = BlockMasker(MaskConfig(), aug.global_crop_px // PATCH)

    def batch(encoded: list[bytes]) -> None:
        samples = []
        for data in encoded:
            im = Image.open(io.BytesIO(data)).convert("RGB")
            samples.append(([g(im) for g in globals_], [local(im) for _ in range(aug.n_local_crops)]))
        torch.stack([s[0][k] for k in range(aug.n_global_crops) for s in samples])
        torch.stack([s[1][k] for k in range(aug.n_local_crops) for s in samples])
        masker.batch(aug.n_global_crops * len(encoded), random.Random(0))

    return batch


def cpu_per_core(store: str, aug: AugmentConfig, samples: int, batch: int) -> dict:
    torch.set_num_threads(1)
    tune_worker_allocator()
    data = DataConfig(stores=(store,), num_workers=0, shuffle_buffer_tiles=4 * batch)
    ld = build_train_loader(
        data, aug, MaskConfig(), patch_size=PATCH, batch_size_per_process=batch, rank=0, world_size=1, seed=0
    )
    builder = BatchBuilder(ld.spec)
    sched = Schedule(ld.spec.epoch_size, ld.spec.layout, "drop", 0)
    encoded = [b for sid in TileStore(store).slide_ids for b in TileStore(store).slide(sid).read_encoded(0, 64)]
    ref = reference_pipeline(aug)
    builder.build(sched, 0, 0, None)
    ref(encoded[:4])  # warm-up
    ours_s = ref_s = 0.0
    n_ours = n_ref = 0
    rounds = max(1, samples // batch)
    for r in range(rounds):
        t = time.perf_counter()
        builder.build(sched, *sched.nth(1 + r), None)
        ours_s += time.perf_counter() - t
        n_ours += batch
        chunk = [encoded[(r * batch + i) % len(encoded)] for i in range(batch // 2)]
        t = time.perf_counter()
        ref(chunk)
        ref_s += time.perf_counter() - t
        n_ref += len(chunk)
    return {
        "cpu_path_samples_per_s_per_core": n_ours / ours_s,
        "reference_samples_per_s_per_core": n_ref / ref_s,
        "ratio": (n_ours / ours_s) / (n_ref / ref_s),
        "samples": n_ours,
        "reference_samples": n_ref,
    }


def gpu_path(store: str, aug: AugmentConfig, batch: int, workers: int, steps: int, decode_device: str) -> dict:
    data = DataConfig(
        stores=(store,),
        num_workers=workers,
        path="gpu",
        decode_device=decode_device,
        shuffle_buffer_tiles=2 * batch,
        samples_per_epoch=max(10_000, 4 * batch * steps),
    )
    ld = build_train_loader(
        data,
        aug,
        MaskConfig(),
        patch_size=PATCH,
        batch_size_per_process=batch,
        rank=0,
        world_size=1,
        seed=0,
        device="cuda",
    )
    it = iter(ld)
    for _ in range(3):
        next(it)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        b = next(it)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t
    ld.close()
    # The device work alone: one pre-decoded batch of tiles augmented again and again.
    tiles = torch.rand(batch, 3, 224, 224, device="cuda")
    groups = [sample_params(aug, 0, 0, i, 224, 224) for i in range(batch)]
    params = (CropParams.crop_major([g[0] for g in groups]), CropParams.crop_major([g[1] for g in groups]))
    augment_on_device(tiles, params, aug)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        augment_on_device(tiles, params, aug)
    torch.cuda.synchronize()
    dev = time.perf_counter() - t
    return {
        f"gpu_path_{decode_device}_decode_samples_per_s": steps * batch / dt,
        "gpu_augment_only_samples_per_s": steps * batch / dev,
        "gpu_batch": batch,
        "gpu_workers": workers,
        "last_batch_shapes": [list(b.global_crops.shape), list(b.local_crops.shape)],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=256, help="CPU-path samples to time (default 256)")
    ap.add_argument("--batch", type=int, default=32, help="CPU-path batch size (default 32)")
    ap.add_argument("--preset", default="dinov2", help="augmentation preset (default dinov2)")
    ap.add_argument("--jitter", default="fused", choices=("fused", "torchvision"), help="color_jitter_impl")
    ap.add_argument("--store", help="use this tile store (224-px tiles) instead of building one")
    ap.add_argument("--gpu-batch", type=int, default=256)
    ap.add_argument("--workers", type=int, default=8, help="DataLoader workers for the GPU path (default 8)")
    ap.add_argument("--gpu-steps", type=int, default=20)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()

    aug = AugmentConfig.preset(args.preset, color_jitter_impl=args.jitter)
    results: dict = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "recipe": f"{args.preset} ({aug.n_global_crops}x{aug.global_crop_px} + "
        f"{aug.n_local_crops}x{aug.local_crop_px}, jitter {args.jitter})",
    }
    with tempfile.TemporaryDirectory() as tmp:
        store = args.store or build_store(Path(tmp) / "bench.zarr")
        results["tiles"] = sum(TileStore(store).n_tiles(s) for s in TileStore(store).slide_ids)
        results.update(cpu_per_core(store, aug, args.samples, args.batch))
        print(f"recipe: {results['recipe']}; {results['tiles']} real-tissue tiles of 224 px")
        print(f"CPU path         {results['cpu_path_samples_per_s_per_core']:8.1f} samples/s per core")
        print(f"dinov2-style ref {results['reference_samples_per_s_per_core']:8.1f} samples/s per core")
        print(f"ratio            {results['ratio']:8.2f}x")
        if torch.cuda.is_available():
            torch.set_num_threads(max(1, torch.get_num_threads()))
            results["gpu"] = torch.cuda.get_device_name()
            for decode_device in ("cpu", "gpu"):
                results.update(gpu_path(store, aug, args.gpu_batch, args.workers, args.gpu_steps, decode_device))
            print(
                f"GPU path on {results['gpu']} (batch {args.gpu_batch}, {args.workers} workers): "
                f"{results['gpu_path_cpu_decode_samples_per_s']:.0f} samples/s (CPU decode), "
                f"{results['gpu_path_gpu_decode_samples_per_s']:.0f} samples/s (GPU decode); "
                f"augmentation alone {results['gpu_augment_only_samples_per_s']:.0f} samples/s"
            )
        else:
            print("GPU path: no CUDA device here (skipped)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
