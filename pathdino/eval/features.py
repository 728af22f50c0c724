"""Frozen-encoder feature extraction for tile datasets.

The encoder is a timm model built with ``num_classes=0``, so ``encoder(x)`` is the pooled (CLS) embedding
``[B, D]``. On CUDA the forward runs under bf16 autocast (what pathology foundation models are evaluated with);
on CPU it stays fp32 because CPU bf16 changes the numbers for little gain at evaluation batch sizes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import NamedTuple

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from pathdino.eval.datasets import TileImageDataset, TileRecord


class ExtractedFeatures(NamedTuple):
    """Unpacks as ``features, labels, paths``."""

    features: torch.Tensor  # float32 [N, D] on CPU
    labels: torch.Tensor  # int64 [N] (-1 where the dataset gives no label)
    paths: list[str]  # source file per row when known, else ""


class _Transformed(Dataset):
    """Applies ``transform`` to the image of a dataset yielding ``(image, label)``."""

    def __init__(self, base: Dataset, transform: Callable[[object], object] | None):
        self.base = base
        self.transform = transform

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[object, int]:
        image, label = self.base[i]
        return (self.transform(image) if self.transform is not None else image), label


class _RecordImages(Dataset):
    """``(image, label, index)`` of a :class:`TileImageDataset`; ``skip``: an unreadable image gives ``None`` (dropped
    by ``_collate_readable``) instead of stopping the whole extraction."""

    def __init__(self, base: TileImageDataset, skip: bool):
        self.base = base
        self.skip = skip

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> tuple[object, int, int]:
        try:
            image, label = self.base[i]
        except OSError:
            if not self.skip:
                raise
            return None, -1, i
        return image, label, i


def _collate_readable(batch: list[tuple[object, int, int]]) -> tuple[object, object, list[int]]:
    from torch.utils.data import default_collate

    kept = [(image, label) for image, label, _ in batch if image is not None]
    images, labels = default_collate(kept) if kept else (None, None)
    return images, labels, [i for image, _, i in batch if image is not None]


def _progress_bar(enabled: bool):
    """A transient rich progress bar, or None when disabled."""
    if not enabled:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), transient=True
    )


@torch.no_grad()  # not inference_mode: its tensors cannot later feed autograd (the linear probe)
def extract_features(
    encoder: nn.Module,
    transform: Callable[[object], object] | None,
    dataset: Sequence[TileRecord] | TileImageDataset | Dataset,
    *,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    progress: bool = True,
    description: str = "features",
    skip_unreadable: bool = False,
) -> ExtractedFeatures:
    """Embed every item of ``dataset`` with ``encoder`` (kept frozen, in eval mode).

    ``dataset`` is a list/tuple of :class:`TileRecord` or a :class:`TileImageDataset` (images are read from disk),
    or any map-style dataset returning ``(image, label)``; ``transform`` (image -> CHW float tensor) is applied to
    each image. Rows keep the dataset order, so two calls with a random ``transform`` give paired views of the same
    tiles. ``skip_unreadable``: an image file that cannot be read is left out (its row is absent from the result,
    and its path from ``paths``) instead of raising ``OSError``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = torch.device(device)
    if isinstance(dataset, TileImageDataset):
        dataset = dataset.records  # re-read with this call's transform
    if isinstance(dataset, (list, tuple)) and all(isinstance(r, TileRecord) for r in dataset):
        ds: Dataset = _RecordImages(TileImageDataset(dataset, transform), skip_unreadable)
        paths = [str(r.path) for r in dataset]
        collate = _collate_readable
    else:
        ds = _Transformed(dataset, transform)  # type: ignore[arg-type]
        paths = [""] * len(dataset)  # type: ignore[arg-type]
        collate = None
    n = len(ds)  # type: ignore[arg-type]
    loader = DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
        collate_fn=collate,
    )
    kept: list[int] = []
    was_training = encoder.training
    encoder.eval()
    feats: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    bar = _progress_bar(progress and n > 0)
    try:
        with bar if bar is not None else nullcontext():
            task = bar.add_task(description, total=n) if bar is not None else None
            for images, ys, *index in loader:
                if index:
                    kept += index[0]
                    if images is None:  # every image of the batch was unreadable
                        if bar is not None:
                            bar.advance(task, batch_size)
                        continue
                images = images.to(device, non_blocking=True)
                with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
                    out = encoder(images)
                if isinstance(out, (tuple, list)):
                    out = out[0]
                if out.ndim != 2:
                    raise ValueError(
                        f"encoder returned shape {tuple(out.shape)}; expected [B, D] pooled embeddings "
                        "(build the timm model with num_classes=0)"
                    )
                feats.append(out.float().cpu())
                labels.append(torch.as_tensor(ys, dtype=torch.int64))
                if bar is not None:
                    bar.advance(task, len(out))
    finally:
        encoder.train(was_training)
    if collate is not None:
        paths = [paths[i] for i in kept]
    if not feats:
        dim = int(getattr(encoder, "num_features", 0))
        return ExtractedFeatures(torch.zeros(0, dim), torch.zeros(0, dtype=torch.int64), [])
    return ExtractedFeatures(torch.cat(feats), torch.cat(labels), paths)
