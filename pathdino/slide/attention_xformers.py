"""LongNet segments through xformers' memory-efficient attention (GPU, optional): the segments of a branch, of all
the slides of a packed batch, go as one sequence with a block-diagonal mask (no padding).

Opt-in (``SlideEncoder(cfg, attention_backend="xformers")``, or ``"auto"``: xformers when importable and the tensors
are on a GPU) until ``benchmarks/slide_encoder.py --check`` has compared it with the torch path on a GPU: no GPU
was available to the session that wrote it.
"""

from __future__ import annotations

import torch
from torch import Tensor

_EXTRA_CHANNELS = 8  # the kernels want head dims in multiples of 8; one channel carries the lse gradient


def xformers_importable() -> bool:
    try:
        from xformers.ops import fmha  # noqa: F401
    except ImportError:
        return False
    return True


class XformersSegments(torch.autograd.Function):
    """(q, k, v [1, M, H, d] segments end to end, seqlens, scale) -> (out [1, M, H, d], lse [M, H]).

    As on CPU (attention._CpuFlashSegments), the kernel's backward ignores a gradient on the log-sum-exp; it enters
    through an extra channel: q, k, v padded with zeros, out with -1 and grad_out with grad_lse in that channel.
    """

    @staticmethod
    def forward(ctx, *inputs):  # (q, k, v, seqlens, scale): Function.apply takes no keywords
        from xformers.ops import fmha

        q, k, v, seqlens, scale = inputs
        bias = fmha.attn_bias.BlockDiagonalMask.from_seqlens(list(seqlens))
        out, lse = fmha.memory_efficient_attention_partial(q, k, v, attn_bias=bias, scale=scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.bias, ctx.scale = bias, scale
        n = q.shape[1]
        return out, lse[0, :, :n].transpose(0, 1)  # lse: [1, H, M(+padding)] -> [M, H]

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        from xformers.ops import fmha

        q, k, v, out, lse = ctx.saved_tensors
        zeros = q.new_zeros(*q.shape[:-1], _EXTRA_CHANNELS)
        padded = [torch.cat([t, zeros], dim=-1) for t in (q, k, v)]
        extra_out, extra_grad = zeros.clone(), zeros.clone()
        extra_out[..., 0] = -1
        extra_grad[..., 0] = grad_lse.to(q.dtype)[None]
        out_padded = torch.cat([out.to(q.dtype), extra_out], dim=-1)
        grad_padded = torch.cat([grad_out.to(q.dtype), extra_grad], dim=-1)
        dq, dk, dv = fmha.memory_efficient_attention_backward(
            grad_padded, out_padded, lse, *padded, attn_bias=ctx.bias, scale=ctx.scale
        )
        d = q.shape[-1]
        return dq[..., :d], dk[..., :d], dv[..., :d], None, None


def xformers_group(q: Tensor, k: Tensor, v: Tensor, *, group, scale: float) -> tuple[Tensor, Tensor]:
    """One (branch, offset) group: outputs [M, Hg, d] and lse [M, Hg] of its members (group.index[group.valid])."""
    members = group.index[group.valid]
    all_heads = group.heads.numel() == q.shape[1]
    q_sel, k_sel, v_sel = (
        (t if all_heads else t.index_select(1, group.heads))[members][None].contiguous() for t in (q, k, v)
    )
    seqlens = tuple(int(n) for n in group.valid.sum(1).tolist())
    out, lse = XformersSegments.apply(q_sel, k_sel, v_sel, seqlens, scale)
    return out[0], lse
