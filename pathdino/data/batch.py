"""The batch the DINOv2 trainer consumes: the contract between `pathdino.data` and `pathdino.train`."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class MultiCropBatch:
    """One collated multi-crop batch for B tiles.

    Crops are stored crop-major, as DINOv2 collates them: ``global_crops[k * B + i]`` is global crop ``k`` of
    tile ``i``. The teacher's targets for global crop 0 train the student's global crop 1 and vice versa.

    Attributes:
        global_crops: float tensor [n_global * B, 3, G, G], normalised with the configured mean/std.
        local_crops: float tensor [n_local * B, 3, L, L], same normalisation; may have n_local = 0.
        masks: bool tensor [n_global * B, (G / patch) ** 2], True where a patch is masked for iBOT, in the same
            order as ``global_crops``; patch index is row-major over the crop's patch grid.
        slide_ids: the slide of each tile, length B (for debugging and logging).
        tile_indices: int64 tensor [B], each tile's index within its slide's ``tiles`` array.
        store_indices: int64 tensor [B], which of the loader's stores each tile came from.
    """

    global_crops: torch.Tensor
    local_crops: torch.Tensor
    masks: torch.Tensor
    slide_ids: list[str]
    tile_indices: torch.Tensor
    store_indices: torch.Tensor

    @property
    def batch_size(self) -> int:
        return len(self.slide_ids)

    @property
    def n_global(self) -> int:
        return self.global_crops.shape[0] // self.batch_size

    @property
    def n_local(self) -> int:
        return self.local_crops.shape[0] // self.batch_size

    def to(self, device: torch.device | str, non_blocking: bool = True) -> "MultiCropBatch":
        """Move the tensors to ``device`` (pinned CPU memory makes ``non_blocking`` effective)."""
        return MultiCropBatch(
            global_crops=self.global_crops.to(device, non_blocking=non_blocking),
            local_crops=self.local_crops.to(device, non_blocking=non_blocking),
            masks=self.masks.to(device, non_blocking=non_blocking),
            slide_ids=self.slide_ids,
            tile_indices=self.tile_indices,
            store_indices=self.store_indices,
        )
