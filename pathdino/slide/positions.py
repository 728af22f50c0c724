"""Where each tile sits on its slide's tile grid, the row-major token order, and 2D sin-cos position embeddings.

Positions come from level-0 pixel coordinates, not from a tile's index in the store: a slide with holes in its
tissue (or several tissue pieces) keeps its true geometry, so two tiles 10 tiles apart are 10 steps apart.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tiling.errors import PathdinoError


class PositionError(PathdinoError, ValueError):
    """Tile coordinates that do not describe a tile grid (wrong shape, non-positive stride)."""


def grid_positions(coords_level0_px: Tensor, tile_stride_level0_px: float | Tensor) -> Tensor:
    """(col, row) of each tile on the slide's tile grid, as a LongTensor [N, 2], the top-left tile at (0, 0).

    ``coords_level0_px`` [N, 2] holds each tile's (x, y) top-left corner in level-0 pixels (as
    ``pathdino embed`` stores them); ``tile_stride_level0_px`` is the level-0 distance between neighbouring tiles
    (the tile size in level-0 px when tiles do not overlap): a scalar, or a [N] tensor when slides of a packed
    batch differ. Coordinates are rounded to the nearest grid cell, so resampling jitter of a pixel is harmless.
    """
    coords = torch.as_tensor(coords_level0_px)
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise PositionError(f"tile coordinates must be [N, 2] (x, y) level-0 px, got shape {tuple(coords.shape)}")
    stride = torch.as_tensor(tile_stride_level0_px, dtype=torch.float64)
    if bool((stride <= 0).any()):
        raise PositionError(f"tile_stride_level0_px must be > 0, got {stride.tolist()}")
    if coords.shape[0] == 0:
        return torch.zeros(0, 2, dtype=torch.long)
    cells = torch.round(coords.double() / (stride[:, None] if stride.ndim else stride)).long()
    return cells - cells.min(dim=0).values


def row_major_order(grid_xy: Tensor) -> Tensor:
    """The permutation that sorts tiles row by row (top to bottom), left to right within a row: LongTensor [N].

    LongNet's segments are runs of this order, so neighbours on a row share a segment and a segment of w tokens
    is a band of about w / (tiles per row) rows. Ties (the same cell twice) keep their input order.
    """
    grid_xy = torch.as_tensor(grid_xy).long()
    if grid_xy.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long, device=grid_xy.device)
    width = int(grid_xy[:, 0].max()) + 1
    key = grid_xy[:, 1] * width + grid_xy[:, 0]
    return torch.sort(key, stable=True).indices


def sincos_2d(grid_xy: Tensor, embed_dim: int, *, scale: float = 1.0, temperature: float = 10000.0) -> Tensor:
    """MAE-style 2D sin-cos embedding [N, embed_dim] of grid (col, row) positions, computed per tile.

    The first half of the channels encodes the column, the second the row, each as sin and cos at
    ``embed_dim / 4`` frequencies. Computed from the positions themselves (no table of a maximum grid size), so
    any slide size works; ``scale`` divides the positions (grid units per step).
    """
    if embed_dim % 4:
        raise PositionError(f"embed_dim must be a multiple of 4 for 2D sin-cos positions, got {embed_dim}")
    quarter = embed_dim // 4
    omega = 1.0 / temperature ** (torch.arange(quarter, dtype=torch.float64, device=grid_xy.device) / quarter)
    parts = []
    for axis in (0, 1):
        angle = grid_xy[:, axis].double()[:, None] / scale * omega[None, :]
        parts += [torch.sin(angle), torch.cos(angle)]
    return torch.cat(parts, dim=1).float()
