"""Random-pixel multi-crop batches with the ``TrainLoader`` contract, for benchmarks and smoke runs.

The pixels are noise, so nothing useful is learned; the shapes, masked-token counts and determinism match real
batches, which is what step timing, launch checks and resume tests need.
"""

from __future__ import annotations

from typing import Any

import torch

from pathdino.data.batch import MultiCropBatch


class SyntheticLoader:
    """Endless, deterministic stream of ``MultiCropBatch``: batch ``i`` depends only on (seed, rank, i).

    iBOT masks: each global crop is masked with probability ``mask_probability``, with a ratio drawn uniformly in
    ``[min_ratio, max_ratio]`` (random patches, not blocks; only the count matters here).
    """

    samples_per_epoch = 1_000_000

    def __init__(self, n_global: int, global_px: int, n_local: int, local_px: int, patch_size: int,
                 batch_size: int, rank: int = 0, seed: int = 0, mask_probability: float = 0.5,
                 min_ratio: float = 0.1, max_ratio: float = 0.5, device: str | torch.device = "cpu") -> None:
        self.n_global, self.global_px, self.n_local, self.local_px = n_global, global_px, n_local, local_px
        self.n_patches = (global_px // patch_size) ** 2
        self.batch_size, self.rank, self.seed = batch_size, rank, seed
        self.mask_probability, self.min_ratio, self.max_ratio = mask_probability, min_ratio, max_ratio
        self.device = torch.device(device)
        self.index = 0

    def state_dict(self) -> dict[str, Any]:
        return {"index": self.index, "seed": self.seed, "rank": self.rank}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.index = int(state["index"])

    def make_batch(self, index: int) -> MultiCropBatch:
        g = torch.Generator(device="cpu").manual_seed(self.seed * 1_000_003 + self.rank * 7_919 + index)
        b = self.batch_size
        n_g = self.n_global * b
        masked = torch.rand(n_g, generator=g) < self.mask_probability
        ratio = self.min_ratio + (self.max_ratio - self.min_ratio) * torch.rand(n_g, generator=g)
        n_masked = torch.where(masked, (ratio * self.n_patches).long(), torch.zeros_like(ratio, dtype=torch.long))
        order = torch.rand(n_g, self.n_patches, generator=g).argsort(dim=1).argsort(dim=1)  # random ranks
        masks = order < n_masked.unsqueeze(1)
        # Pixels are drawn on the target device: a GPU benchmark should not time host->device copies of noise.
        gd = torch.Generator(device=self.device).manual_seed(int(torch.randint(2**62, (1,), generator=g)))
        global_crops = torch.randn(n_g, 3, self.global_px, self.global_px, generator=gd, device=self.device)
        local_crops = torch.randn(self.n_local * b, 3, self.local_px, self.local_px, generator=gd,
                                  device=self.device)
        return MultiCropBatch(
            global_crops=global_crops,
            local_crops=local_crops,
            masks=masks.to(self.device),
            slide_ids=[f"synthetic-{index}-{i}" for i in range(b)],
            tile_indices=torch.arange(b, dtype=torch.int64) + index * b,
            store_indices=torch.zeros(b, dtype=torch.int64),
        )

    def __iter__(self):
        while True:
            batch = self.make_batch(self.index)
            self.index += 1
            yield batch
