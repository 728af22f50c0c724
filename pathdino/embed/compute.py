"""The embedding loop of one process: decode -> device -> forward -> host -> chunked writes -> commit.

Decoding runs in DataLoader workers ahead of the model. On a GPU the uint8 batch goes up with a non-blocking copy
from pinned memory, is normalised there, runs under bf16 autocast, and its outputs come back with non-blocking
copies into two alternating pinned buffers; batch k is written to disk while batch k+1 is on the GPU (one CUDA
event per batch, no synchronisation of the whole device). Each tile range (a slide, or a part of one) is written
into its slide's assembly (``assembly.py``); the process that completes a slide's last part commits it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from pathdino.embed.assembly import RowWriter, SlideAssembly
from pathdino.embed.loader import make_loader, plan_units
from pathdino.embed.plan import WorkItem, chunk_rows


def token_outputs(model, x: torch.Tensor, arrays: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The per-tile arrays asked for, from one forward pass: ``cls`` [B, D], ``mean_patch`` [B, D] (patch tokens
    only: registers and CLS excluded), ``patch_tokens`` [B, T, D] (float16)."""
    tokens = model.forward_features(x)
    patch = tokens[:, model.num_prefix_tokens :]
    out = {"cls": tokens[:, 0].float()}
    if "mean_patch" in arrays:
        out["mean_patch"] = patch.float().mean(1)
    if "patch_tokens" in arrays:
        out["patch_tokens"] = patch.half()
    return out


def array_specs(
    n_tiles: int, dim: int, n_patch: int, arrays: tuple[str, ...], part_tiles: int
) -> dict[str, tuple[tuple[int, ...], str, int]]:
    """``name -> (shape, dtype, chunk rows)`` of a slide's assembly arrays."""
    specs = {}
    for name in arrays:
        if name == "patch_tokens":
            specs[name] = ((n_tiles, n_patch, dim), "float16", chunk_rows(part_tiles, n_patch * dim * 2, 4 << 20))
        else:
            specs[name] = ((n_tiles, dim), "float32", chunk_rows(part_tiles, dim * 4))
    return specs


@dataclass
class LoopResult:
    failed: dict[str, str] = field(default_factory=dict)
    committed: list[str] = field(default_factory=list)
    parts_done: int = 0
    n_tiles: int = 0
    seconds: float = 0.0
    startup_s: float = 0.0


class _ItemSink:
    """Receives one tile range's outputs batch by batch and writes them chunk-aligned into its assembly."""

    def __init__(self, assembly: SlideAssembly, item: WorkItem, arrays: tuple[str, ...]):
        group = assembly.group()
        self.assembly, self.item = assembly, item
        self.writers = {name: RowWriter(group[name], item.start, group[name].chunks[0]) for name in arrays}

    def add(self, outputs: dict[str, np.ndarray]) -> None:
        for name, writer in self.writers.items():
            writer.add(outputs[name])

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()
        self.assembly.mark_done(self.item)


def run_loop(
    ctx: Any,
    items: list[WorkItem],
    try_commit: Callable[[str], bool],
    on_failure: Callable[[str, str], None],
    options: Any,
    device: torch.device,
    bf16: bool,
    model,
    transform,
    n_patch: int,
) -> LoopResult:
    """Embed ``items`` (tile ranges not done yet); commit each slide whose last part finishes here."""
    result = LoopResult()
    if not items:
        return result
    arrays = ctx.arrays
    units = plan_units([(it.slide_id, it.start, it.stop) for it in items], options.batch_size)
    cuda = device.type == "cuda"
    loader = make_loader(
        ctx.store.url,
        units,
        {it.slide_id: ctx.slides[it.slide_id].tile_px for it in items},
        options.num_workers,
        pin_memory=cuda,
    )
    sinks: dict[int, _ItemSink] = {}
    pinned = _PinnedPair(cuda)
    pending: list[tuple[Any, dict[str, torch.Tensor], Any]] = []

    def handle(unit, host: dict[str, torch.Tensor], event) -> None:
        if event is not None:
            event.synchronize()
        if unit.slide_id in result.failed:
            return
        n = unit.stop - unit.start
        sink = sinks[unit.item]
        sink.add({k: v[:n].numpy().copy() for k, v in host.items()})
        result.n_tiles += n
        bar.update(task, advance=n, rate=f"{result.n_tiles / max(time.perf_counter() - t0, 1e-9):.0f}")
        if unit.last:
            sink.close()
            del sinks[unit.item]
            result.parts_done += 1
            if try_commit(unit.slide_id):
                result.committed.append(unit.slide_id)

    bar, task = progress_bar(options.progress, sum(it.size for it in items))
    t0 = time.perf_counter()
    startup = None
    with bar, torch.inference_mode():
        for i, tiles, error in loader:
            if startup is None:
                startup = time.perf_counter() - t0
            unit = units[i]
            if unit.slide_id in result.failed:
                continue
            if error:
                result.failed[unit.slide_id] = error
                on_failure(unit.slide_id, error)
                continue
            if unit.item not in sinks:
                item = items[unit.item]
                sinks[unit.item] = _ItemSink(ctx.assembly(item.slide_id), item, arrays)
                bar.update(task, description=item.slide_id)
            x = transform.batch(tiles.to(device, non_blocking=True))
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                out = token_outputs(model, x, arrays)
            host = pinned.copy(out)
            event = torch.cuda.Event() if cuda else None
            if event is not None:
                event.record()
            pending.append((unit, host, event))
            if len(pending) > 1:  # write the previous batch while this one runs on the device
                handle(*pending.pop(0))
        while pending:
            handle(*pending.pop(0))
    result.seconds = time.perf_counter() - t0
    result.startup_s = startup or 0.0
    return result


class _PinnedPair:
    """Two alternating pinned host buffers per output (GPU); on the CPU the outputs are used as they are."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.buffers: list[dict[str, torch.Tensor]] = [{}, {}]
        self.turn = 0

    def copy(self, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if not self.cuda:
            return out
        slot = self.buffers[self.turn]
        self.turn ^= 1
        host = {}
        for name, value in out.items():
            buf = slot.get(name)
            if buf is None or buf.shape[0] < value.shape[0] or buf.shape[1:] != value.shape[1:]:
                buf = slot[name] = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
            host[name] = buf[: value.shape[0]]
            host[name].copy_(value, non_blocking=True)
        return host


def progress_bar(enabled: bool, total: int):
    """The embedding progress bar (rich; disabled unless ``enabled``) and its task."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]} tiles/s"),
        TimeRemainingColumn(),
        disable=not enabled,
    )
    return bar, bar.add_task("embedding", total=total, rate="-")


__all__ = ["LoopResult", "array_specs", "run_loop", "token_outputs"]
