"""LongNet dilated attention over packed batches of variable-length slides, with a global CLS token per slide.

Each slide's tiles form one row-major token sequence; slides of a batch are packed end to end into [N_total]
and described by their ``lengths``. For branch i, a slide's sequence is cut into segments of
``w_i = min(segment_lengths[i], n)`` tokens and, in head h, the tokens at positions ``h % r_i, h % r_i + r_i, ...``
of a segment attend among themselves (``r_i = dilation_ratios[i]``). Every branch yields, per token and head, an
output and its log-sum-exp (the log of its softmax denominator); the branches are merged by those, which is
exactly softmax attention over the union of the keys each branch saw. The CLS token of a slide attends to all its
tiles, and every tile sees its slide's CLS as one more key, so the slide vector is read from the whole slide.

Dense attention is the case ``w >= n, r = 1``. On CPU (and on GPU without xformers) segments are attended in
chunks of at most ``score_budget`` scores with plain matmuls, each chunk recomputed in the backward pass
(``torch.utils.checkpoint``), so memory grows with the tile count, not its square.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from pathdino.slide.attention_xformers import xformers_group, xformers_importable

DEFAULT_SCORE_BUDGET = 1 << 25  # attention scores held at once per chunk: 128 MiB in fp32


@dataclass(frozen=True)
class SegmentGroup:
    """Segments of one branch and one head offset that share a padded length L."""

    heads: Tensor  # [Hg] long: the heads that take this offset
    index: Tensor  # [S, L] long: packed token index of each member (padding points at a valid token)
    valid: Tensor  # [S, L] bool: False on padding


@dataclass(frozen=True)
class PackedLayout:
    """The segment plan of a packed batch, built once per forward and shared by every block."""

    lengths: tuple[int, ...]
    starts: tuple[int, ...]
    slide_of_token: Tensor  # [N_total] long
    branches: tuple[tuple[SegmentGroup, ...], ...]  # per (segment length, dilation ratio)


def pack_layout(
    lengths: Sequence[int],
    *,
    segment_lengths: Sequence[int],
    dilation_ratios: Sequence[int],
    num_heads: int,
    device: torch.device | str = "cpu",
) -> PackedLayout:
    """Plan the segments of every branch for slides of ``lengths`` tokens packed end to end."""
    lengths = tuple(int(n) for n in lengths)
    if any(n < 1 for n in lengths):
        raise ValueError(f"every slide needs at least one tile, got lengths {lengths}")
    starts = tuple(int(s) for s in torch.tensor((0,) + lengths[:-1]).cumsum(0).tolist())
    slide_of_token = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)).to(device)
    branches = tuple(
        _branch_groups(lengths, starts, segment=w, ratio=r, num_heads=num_heads, device=device)
        for w, r in zip(segment_lengths, dilation_ratios)
    )
    return PackedLayout(lengths, starts, slide_of_token, branches)


def _branch_groups(lengths, starts, *, segment: int, ratio: int, num_heads: int, device) -> tuple[SegmentGroup, ...]:
    groups = []
    for offset in range(min(ratio, num_heads)):
        heads = torch.arange(offset, num_heads, ratio)
        by_length: dict[int, list[tuple[Tensor, Tensor]]] = {}
        for n, start in zip(lengths, starts):
            seg = min(segment, n)
            if offset >= seg:
                continue
            members = (seg - offset + ratio - 1) // ratio
            pos = (
                torch.arange(math.ceil(n / seg))[:, None] * seg + offset + ratio * torch.arange(members)[None, :]
            )  # [segments, members] within the slide
            valid = pos < n
            keep = valid[:, 0]
            pos, valid = pos[keep], valid[keep]
            by_length.setdefault(members, []).append((start + torch.where(valid, pos, offset), valid))
        for parts in by_length.values():
            groups.append(
                SegmentGroup(
                    heads.to(device),
                    torch.cat([p[0] for p in parts]).to(device),
                    torch.cat([p[1] for p in parts]).to(device),
                )
            )
    return tuple(groups)


def _wide(x: Tensor) -> Tensor:
    """Scores and log-sum-exps in float32 at least (bf16/fp16 inputs), float64 kept (tests)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _attend(q: Tensor, k: Tensor, v: Tensor, *, valid: Tensor | None, scale: float) -> tuple[Tensor, Tensor]:
    """Softmax attention with its log-sum-exp: q [S, H, Lq, d], k/v [S, H, L, d], valid [S, L] (keys; None: all).

    In-place on the score tensor (one [S, H, Lq, L] buffer): the max is detached because it cancels out of both
    the output and the log-sum-exp, so autograd only keeps exp's result for the backward pass.
    """
    scores = _wide(torch.matmul(q * scale, k.transpose(-1, -2)))
    if valid is not None:
        scores.masked_fill_(~valid[:, None, None, :], float("-inf"))
    shift = scores.detach().amax(dim=-1, keepdim=True)
    probs = scores.sub_(shift).exp_()
    denominator = probs.sum(dim=-1)
    out = torch.matmul(probs.to(v.dtype), v) / denominator[..., None].to(v.dtype)
    return out, denominator.log() + shift[..., 0]


# torch's fused CPU flash-attention kernel returns the log-sum-exp SDPA keeps to itself; private, so looked up once
# and the plain-matmul path below stays the fallback (tests/test_private_apis.py pins it)
_CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_CPU_FLASH_BACKWARD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)


class _CpuFlashSegments(torch.autograd.Function):
    """(q, k, v [S, H, L, d], additive key mask [S, 1, 1, L] or None) -> (out, lse) through the fused CPU kernel.

    The kernel's backward ignores a gradient on the log-sum-exp, which the branch merge needs. It enters through
    one extra head channel: with q, k, v padded by a zero column, out by -1 and grad_out by grad_lse, the kernel's
    rowsum(grad_out * out) becomes D - grad_lse, which is exactly where d lse / d scores = softmax adds in.
    """

    @staticmethod
    def forward(ctx, *inputs):  # (q, k, v, mask, scale): Function.apply takes no keywords
        q, k, v, mask, scale = inputs
        out, lse = _CPU_FLASH(q, k, v, 0.0, False, attn_mask=mask, scale=scale)[:2]
        ctx.save_for_backward(q, k, v, mask, out, lse)
        ctx.scale = scale
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, mask, out, lse = ctx.saved_tensors
        zero = q.new_zeros(*q.shape[:-1], 1)
        padded = [torch.cat([t, zero], dim=-1) for t in (q, k, v)]
        out_padded = torch.cat([out, -torch.ones_like(zero)], dim=-1)
        grad_padded = torch.cat([grad_out, grad_lse.to(grad_out.dtype)[..., None]], dim=-1).contiguous()
        dq, dk, dv = _CPU_FLASH_BACKWARD(
            grad_padded, *padded, out_padded, lse, 0.0, False, attn_mask=mask, scale=ctx.scale
        )
        return dq[..., :-1], dk[..., :-1], dv[..., :-1], None, None


def _attend_chunked(q, k, v, *, valid, scale: float, score_budget: int) -> tuple[Tensor, Tensor]:
    """_attend over chunks of segments (or of query rows when one segment exceeds the budget); on CPU, the fused
    flash kernel over all segments at once (its memory does not grow with the segment length)."""
    if q.device.type == "cpu" and _CPU_FLASH is not None and _CPU_FLASH_BACKWARD is not None:
        mask = None
        if valid is not None:
            mask = torch.zeros(valid.shape[0], 1, 1, valid.shape[1], dtype=q.dtype)
            mask.masked_fill_(~valid[:, None, None, :], float("-inf"))
        out, lse = _CpuFlashSegments.apply(q.contiguous(), k.contiguous(), v.contiguous(), mask, scale)
        return out, lse.to(_wide(out).dtype)
    n_seg, heads, length, _ = q.shape
    recompute = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)

    def run(q_part, k_part, v_part, *, valid_part: Tensor | None):
        if recompute:
            return checkpoint(_attend, q_part, k_part, v_part, valid=valid_part, scale=scale, use_reentrant=False)
        return _attend(q_part, k_part, v_part, valid=valid_part, scale=scale)

    per_segment = heads * length * length
    outs, lses = [], []
    if per_segment <= score_budget:
        step = max(1, score_budget // per_segment)
        for s0 in range(0, n_seg, step):
            part = slice(s0, s0 + step)
            o, lse = run(q[part], k[part], v[part], valid_part=None if valid is None else valid[part])
            outs.append(o)
            lses.append(lse)
        return torch.cat(outs), torch.cat(lses)
    rows = max(1, score_budget // (heads * length))
    for s in range(n_seg):
        one = slice(s, s + 1)
        parts = [
            run(q[one, :, r0 : r0 + rows], k[one], v[one], valid_part=None if valid is None else valid[one])
            for r0 in range(0, length, rows)
        ]
        outs.append(torch.cat([p[0] for p in parts], dim=2))
        lses.append(torch.cat([p[1] for p in parts], dim=2))
    return torch.cat(outs), torch.cat(lses)


def _branch(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    groups: Sequence[SegmentGroup],
    scale: float,
    score_budget: int,
    backend: str = "torch",
) -> tuple[Tensor, Tensor]:
    """One (w, r) branch: output [N, H, d] and log-sum-exp [N, H] (-inf where a head skips a token)."""
    n_tokens, heads, dim = q.shape
    rows, cols, values, lses = [], [], [], []
    for group in groups:
        members = group.index[group.valid]  # [M]
        rows.append(members[:, None].expand(-1, group.heads.numel()))
        cols.append(group.heads[None, :].expand(members.numel(), -1))
        if backend == "xformers":
            out, lse = xformers_group(q, k, v, group=group, scale=scale)
            values.append(out)
            lses.append(lse.to(_wide(q).dtype))
            continue
        all_heads = group.heads.numel() == heads
        qh, kh, vh = (
            (t if all_heads else t.index_select(1, group.heads))[group.index].permute(0, 2, 1, 3) for t in (q, k, v)
        )
        valid = None if bool(group.valid.all()) else group.valid
        out, lse = _attend_chunked(qh, kh, vh, valid=valid, scale=scale, score_budget=score_budget)
        values.append(out.permute(0, 2, 1, 3)[group.valid])  # [M, Hg, d]
        lses.append(lse.permute(0, 2, 1)[group.valid])  # [M, Hg]
    index = (torch.cat([r.reshape(-1) for r in rows]), torch.cat([c.reshape(-1) for c in cols]))
    out = q.new_zeros(n_tokens, heads, dim).index_put(index, torch.cat([x.reshape(-1, dim) for x in values]))
    lse = torch.full((n_tokens, heads), float("-inf"), device=q.device, dtype=_wide(q).dtype).index_put(
        index, torch.cat([x.reshape(-1) for x in lses])
    )
    return out, lse


def resolve_backend(backend: str, q: Tensor) -> str:
    """ "torch" or "xformers" for a requested backend and where the tensors are."""
    if backend not in ("torch", "xformers", "auto"):
        raise ValueError(f"attention backend {backend!r}: expected torch, xformers or auto")
    if backend == "torch":
        return "torch"
    usable = q.device.type == "cuda" and xformers_importable()
    if backend == "xformers" and not usable:
        raise ValueError(
            "attention backend 'xformers' needs xformers installed (pip install -e '.[xformers]') and "
            "the model on a GPU"
        )
    return "xformers" if usable else "torch"


def _cls_attention(
    q_cls: Tensor, k: Tensor, v: Tensor, *, k_cls: Tensor, v_cls: Tensor, layout: PackedLayout, scale: float
) -> Tensor:
    """Each slide's CLS query over its own CLS and all its tiles (dense: one query row per head)."""
    outs = []
    for b, (start, n) in enumerate(zip(layout.starts, layout.lengths)):
        keys = torch.cat([k_cls[b : b + 1], k[start : start + n]])  # [n + 1, H, d]
        values = torch.cat([v_cls[b : b + 1], v[start : start + n]])
        scores = _wide(torch.einsum("hd,nhd->hn", q_cls[b], keys)) * scale
        outs.append(torch.einsum("hn,nhd->hd", scores.softmax(-1).to(values.dtype), values))
    return torch.stack(outs)


def dilated_attention(
    qkv: tuple[Tensor, Tensor, Tensor],
    cls_qkv: tuple[Tensor, Tensor, Tensor],
    layout: PackedLayout,
    *,
    score_budget: int = DEFAULT_SCORE_BUDGET,
    backend: str = "torch",
) -> tuple[Tensor, Tensor]:
    """LongNet attention of packed tiles (q, k, v, each [N, H, d]) and their slides' CLS tokens (each [B, H, d]).

    ``backend``: "torch" (CPU flash kernel / chunked matmuls), "xformers" (GPU, attention_xformers.py) or "auto"
    (xformers when importable and q is on a GPU, else torch).

    Returns (tile outputs [N, H, d], CLS outputs [B, H, d]).
    """
    q, k, v = qkv
    q_cls, k_cls, v_cls = cls_qkv
    scale = q.shape[-1] ** -0.5
    # the CLS key is every tile's first branch: its log-sum-exp is finite, so the merge never sees -inf - -inf
    k_own, v_own = k_cls[layout.slide_of_token], v_cls[layout.slide_of_token]
    lse_total = _wide((q * k_own).sum(-1)) * scale
    out_total = v_own
    for groups in layout.branches:
        out, lse = _branch(
            q, k, v, groups=groups, scale=scale, score_budget=score_budget, backend=resolve_backend(backend, q)
        )
        merged = torch.logaddexp(lse_total, lse)
        out_total = out_total * torch.exp(lse_total - merged)[..., None].to(q.dtype) + out * torch.exp(lse - merged)[
            ..., None
        ].to(q.dtype)
        lse_total = merged
    return out_total, _cls_attention(q_cls, k, v, k_cls=k_cls, v_cls=v_cls, layout=layout, scale=scale)


class DilatedAttention(nn.Module):
    """Multi-head LongNet self-attention over packed slides (tiles [N, D]) and their CLS tokens ([B, D])."""

    def __init__(
        self,
        dim: int,
        *,
        num_heads: int,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        score_budget: int = DEFAULT_SCORE_BUDGET,
        backend: str = "torch",
    ):
        super().__init__()
        self.num_heads = num_heads
        self.backend = backend
        self.score_budget = score_budget
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, tiles: Tensor, cls: Tensor, layout: PackedLayout) -> tuple[Tensor, Tensor]:
        n_tiles, dim = tiles.shape
        qkv = self.qkv(torch.cat([tiles, cls])).reshape(-1, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.unbind(1)
        out, out_cls = dilated_attention(
            (q[:n_tiles], k[:n_tiles], v[:n_tiles]),
            (q[n_tiles:], k[n_tiles:], v[n_tiles:]),
            layout,
            score_budget=self.score_budget,
            backend=self.backend,
        )
        out = self.proj_drop(self.proj(torch.cat([out, out_cls]).reshape(-1, dim)))
        return out[:n_tiles], out[n_tiles:]
