"""Random-pixel multi-crop batches with the ``TrainLoader`` contract, for benchmarks, smoke runs and the tests
that prove distribution.

The pixels are noise, so nothing useful is learned; the shapes, masked-token counts and determinism match real
batches, which is what step timing, launch checks and resume tests need.

Every sample is drawn from its own generator keyed by (seed, global sample index), and process ``rank`` of
``world_size`` takes samples ``[i*B*W + rank*B, i*B*W + (rank+1)*B)`` of its batch ``i`` (B per process, W
processes). So the samples of one optimizer step are the same whatever the number of processes or accumulation
micro-steps: a 2-process run at global batch 2B sees exactly the data of a 1-process run at batch 2B, which is
what lets tests compare DDP and FSDP2 runs with a single process number for number.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from pathdino.data.batch import MultiCropBatch
from pathdino.train.config import CropPlan


class SyntheticLoader:
    """Endless, deterministic stream of ``MultiCropBatch`` (see the module docstring for the sample order).

    Crops are those of ``plan`` (``crop_plan(cfg)``, as the tile-store loader's). iBOT masks: each global crop is
    masked with probability ``plan.mask_probability``, with a ratio drawn uniformly in ``plan.mask_ratio``
    (random patches, not blocks; only the count matters here).
    """

    samples_per_epoch = 1_000_000

    def __init__(
        self,
        plan: CropPlan,
        *,
        patch_size: int,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        device: str | torch.device = "cpu",
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.n_global, self.global_px, self.n_local, self.local_px = (
            plan.n_global,
            plan.global_px,
            plan.n_local,
            plan.local_px,
        )
        self.n_patches = (plan.global_px // patch_size) ** 2
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.mask_probability, (self.min_ratio, self.max_ratio) = plan.mask_probability, plan.mask_ratio
        self.device = torch.device(device)
        self.index = 0

    def state_dict(self) -> dict[str, Any]:
        # The position is a global sample count, so a run resumes exactly with another number of processes.
        return {"next_sample": self.index * self.batch_size * self.world_size, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state.get("seed", self.seed)) != self.seed:
            raise ValueError(f"synthetic data: the checkpoint's seed {state['seed']} differs from {self.seed}")
        per_batch = self.batch_size * self.world_size
        next_sample = int(state["next_sample"])
        if next_sample % per_batch:
            raise ValueError(
                f"synthetic data: saved position {next_sample} is not a multiple of this run's "
                f"{per_batch} samples per batch (batch size per process x processes)"
            )
        self.index = next_sample // per_batch

    def _sample(self, sample: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Global crops [G, 3, P, P], local crops [L, 3, p, p] and masks [G, N] of one sample."""
        g = torch.Generator(device="cpu").manual_seed(self.seed * 1_000_003 + sample)
        masked = torch.rand(self.n_global, generator=g) < self.mask_probability
        ratio = self.min_ratio + (self.max_ratio - self.min_ratio) * torch.rand(self.n_global, generator=g)
        n_masked = torch.where(masked, (ratio * self.n_patches).long(), torch.zeros_like(ratio, dtype=torch.long))
        order = torch.rand(self.n_global, self.n_patches, generator=g).argsort(dim=1).argsort(dim=1)
        masks = order < n_masked.unsqueeze(1)
        # Pixels are drawn on the target device: a GPU benchmark should not time host->device copies of noise.
        gd = torch.Generator(device=self.device).manual_seed(int(torch.randint(2**62, (1,), generator=g)))
        global_crops = torch.randn(self.n_global, 3, self.global_px, self.global_px, generator=gd, device=self.device)
        local_crops = torch.randn(self.n_local, 3, self.local_px, self.local_px, generator=gd, device=self.device)
        return global_crops, local_crops, masks

    def make_batch(self, index: int) -> MultiCropBatch:
        b = self.batch_size
        first = (index * self.world_size + self.rank) * b
        samples = [self._sample(first + i) for i in range(b)]
        # Crop-major rows (row k * B + i is crop k of sample i), as pathdino.data.batch.
        global_crops = torch.stack([s[0] for s in samples], dim=1).flatten(0, 1)
        local_crops = torch.stack([s[1] for s in samples], dim=1).flatten(0, 1)
        masks = torch.stack([s[2] for s in samples], dim=1).flatten(0, 1)
        return MultiCropBatch(
            global_crops=global_crops,
            local_crops=local_crops,
            masks=masks.to(self.device),
            slide_ids=[f"synthetic-{first + i}" for i in range(b)],
            tile_indices=torch.arange(first, first + b, dtype=torch.int64),
            store_indices=torch.zeros(b, dtype=torch.int64),
        )

    def __iter__(self) -> Iterator[MultiCropBatch]:
        while True:
            batch = self.make_batch(self.index)
            self.index += 1
            yield batch
