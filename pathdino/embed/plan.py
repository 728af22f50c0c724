"""Which process embeds which tiles: slides cut into parts, parts dealt to shards, the same way in every process.

Every process of a run (``--shard i/N`` tasks, or the ranks of ``accelerate launch``) computes the same plan from the
tile store alone (never from what is already done, which changes while they run), so the N processes agree on who
owns what without talking to each other. A slide with more than ``part_tiles`` tiles is cut into parts of
``part_tiles`` tiles; parts are dealt largest first to the least-loaded shard, so one huge slide is spread over
several processes instead of serialising the run. What a process then computes is its share minus what is already
complete (a rerun with any N picks up exactly the missing parts).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

DEFAULT_PART_TILES = 16384


@dataclass(frozen=True)
class WorkItem:
    """Tiles ``[start, stop)`` of one slide of ``n_tiles`` tiles (the whole slide when ``parts == 1``)."""

    slide_id: str
    start: int
    stop: int
    n_tiles: int
    parts: int  # how many parts the slide was cut into

    @property
    def whole(self) -> bool:
        return self.parts == 1

    @property
    def size(self) -> int:
        return self.stop - self.start


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/N"`` -> ``(i, N)`` with 0 <= i < N (``--shard``)."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not match or not 0 <= int(match[1]) < int(match[2]):
        raise ValueError(
            f"--shard {text!r}: expected i/N with 0 <= i < N, e.g. --shard 0/4 "
            "(SLURM: --shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT)"
        )
    return int(match[1]), int(match[2])


def shard_from_env() -> tuple[int, int] | None:
    """``(RANK, WORLD_SIZE)`` when started by ``accelerate launch`` / torchrun with more than one process."""
    rank, world = os.environ.get("RANK"), os.environ.get("WORLD_SIZE")
    if rank is None or world is None or int(world) <= 1:
        return None
    return int(rank), int(world)


def plan_items(slides: list[tuple[str, int]], part_tiles: int) -> list[WorkItem]:
    """Items of every ``(slide_id, n_tiles)`` in store order; slides above ``part_tiles`` tiles are cut in parts."""
    if part_tiles < 1:
        raise ValueError(f"--part-tiles must be >= 1 (got {part_tiles})")
    items = []
    for slide_id, n in slides:
        parts = max(1, math.ceil(n / part_tiles))
        for k in range(parts):
            items.append(
                WorkItem(
                    slide_id,
                    k * part_tiles if parts > 1 else 0,
                    min(n, (k + 1) * part_tiles) if parts > 1 else n,
                    n,
                    parts,
                )
            )
    return items


def assign(items: list[WorkItem], shard: tuple[int, int] | None) -> list[WorkItem]:
    """Shard ``i`` of ``N``'s items, in store order: largest first to the least-loaded shard (ties: lowest index).

    Every item costs at least one tile, so empty slides are dealt out too.
    """
    if shard is None or shard[1] == 1:
        return list(items)
    index, count = shard
    load = [0] * count
    owner: dict[WorkItem, int] = {}
    for item in sorted(items, key=lambda it: (-max(it.size, 1), it.slide_id, it.start)):
        target = min(range(count), key=lambda s: (load[s], s))
        owner[item] = target
        load[target] += max(item.size, 1)
    return [it for it in items if owner[it] == index]


def chunk_rows(part_tiles: int, bytes_per_row: int, target_bytes: int = 8 << 20) -> int:
    """Rows per Zarr chunk: about ``target_bytes``, a power of two dividing ``part_tiles`` so that the processes
    writing different parts of one slide never write the same chunk."""
    ideal = max(1, target_bytes // max(1, bytes_per_row))
    return math.gcd(part_tiles, 1 << (ideal.bit_length() - 1))
