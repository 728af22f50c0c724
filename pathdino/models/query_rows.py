"""The last ViT block for the tokens the DINOv2 objective reads, and no others (training only).

From the backbone's final output the objective reads every crop's CLS (DINO, KoLeo/KDE, health figures) and the
global crops' patch tokens at the iBOT-masked positions (teacher and student). Every earlier block must still run on
all tokens (each one feeds the next block's keys and values), but in the last block a token that is not read needs
no query, attention output, projection or FFN: only its key and value. Running the last block's queries on the read
tokens only is an exact cut (same losses and gradients, ``tests/test_query_rows.py``); with ViT-S/14 at
2 x 224 + 8 x 98 px it removes about 80% of the last block's FLOPs, ~6% of the step (``pathdino.models.flops``).

Layout: the R selected rows are computed as a flat [R, D] stack (QKV/projection/FFN cost R rows, not B x N); only
the attention kernel runs on a padded [B, Q, D] query layout, Q the largest number of selected tokens in a sample,
with zero queries in the padding (their outputs are never read).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.layers import Attention, DropPath
from timm.models import checkpoint_seq
from timm.models.vision_transformer import Block

from pathdino.models.backbone import SUBSET_DROP_PATH_ABOVE, MaskedViT, SubsetDropPathBlock


@dataclass(frozen=True)
class QueryRows:
    """Which tokens of a [B, N, D] block input the last block computes, in output order.

    Attributes:
        token_index: [R] flat index into ``x.flatten(0, 1)`` of each selected token.
        sample: [R] the sample each selected token belongs to.
        slot: [R] flat index into the padded [B * max_per_sample] query layout.
        max_per_sample: Q, the most tokens selected in one sample (a host int: the padded layout's width).
        n_samples: B.
    """

    token_index: torch.Tensor
    sample: torch.Tensor
    slot: torch.Tensor
    max_per_sample: int
    n_samples: int


def cls_rows(n_samples: int, n_tokens: int, device: torch.device) -> QueryRows:
    """The CLS token (position 0) of every sample, in sample order."""
    sample = torch.arange(n_samples, device=device)
    return QueryRows(sample * n_tokens, sample, sample, 1, n_samples)


def cls_and_masked_rows(masks: torch.Tensor, mask_indices: torch.Tensor, n_prefix: int) -> QueryRows:
    """Every sample's CLS (rows 0..B-1), then the patches at ``mask_indices`` (flat indices into ``masks`` [B, P],
    in the order given: the order of the iBOT targets). Host-syncs once, for the padded width Q."""
    n_samples, n_patches = masks.shape
    n_tokens = n_prefix + n_patches
    device = masks.device
    mask_indices = mask_indices.to(device=device, dtype=torch.long)
    cls = torch.arange(n_samples, device=device)
    m_sample = torch.div(mask_indices, n_patches, rounding_mode="floor")
    m_token = m_sample * n_tokens + n_prefix + (mask_indices - m_sample * n_patches)
    # Slot of each masked patch within its sample: its rank among that sample's masked patches (any input order).
    counts = torch.bincount(m_sample, minlength=n_samples)
    order = torch.argsort(m_sample, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=device) - starts[m_sample[order]]
    width = 1 + int(counts.max()) if mask_indices.numel() else 1
    return QueryRows(
        token_index=torch.cat([cls * n_tokens, m_token]),
        sample=torch.cat([cls, m_sample]),
        slot=torch.cat([cls * width, m_sample * width + 1 + rank]),
        max_per_sample=width,
        n_samples=n_samples,
    )


def supports_query_rows(block: torch.nn.Module) -> bool:
    """Whether ``forward_query_rows`` reproduces this block exactly (timm pre-norm block, plain attention)."""
    attn = getattr(block, "attn", None)
    return (
        isinstance(block, Block)
        and type(attn) is Attention
        and attn.gate is None
        and attn.attn_drop.p == 0
        and isinstance(block.drop_path1, (DropPath, torch.nn.Identity))
    )


def _branch_scales(block: Block, n: int, like: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    """Per-sample residual scales (attention, FFN) and the samples whose attention is computed, drawing random
    numbers exactly as the block's own training forward does: subset stochastic depth (``SubsetDropPathBlock``:
    two ``randperm``) or per-sample drop path (timm ``DropPath``: two Bernoulli draws)."""
    if not block.training or not isinstance(block.drop_path1, DropPath):
        return None, None, None
    rate = block.drop_path1.drop_prob
    if isinstance(block, SubsetDropPathBlock) and rate > SUBSET_DROP_PATH_ABOVE:
        keep = max(int(n * (1 - rate)), 1)
        idx1 = torch.randperm(n, device=like.device)[:keep]
        idx2 = torch.randperm(n, device=like.device)[:keep]
        zeros = like.new_zeros(n)
        return zeros.index_fill(0, idx1, n / keep), zeros.index_fill(0, idx2, n / keep), idx1
    ones = like.new_ones(n, 1)
    return block.drop_path1(ones).view(n), block.drop_path2(ones).view(n), None


def _attention(attn: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """timm ``Attention``'s kernel, fused (SDPA) or plain as the module is set."""
    if attn.fused_attn:
        return F.scaled_dot_product_attention(q, k, v)
    weights = (q * attn.scale) @ k.transpose(-2, -1)
    return weights.softmax(dim=-1) @ v


def forward_query_rows(block: Block, x: torch.Tensor, rows: QueryRows) -> torch.Tensor:
    """``block(x).flatten(0, 1)[rows.token_index]`` [R, D], computing queries, attention output and FFN for those
    rows only (keys and values from every token). Stochastic depth as in the block's training forward."""
    attn = block.attn
    b, n, dim = x.shape
    heads, head_dim, width = attn.num_heads, attn.head_dim, rows.max_per_sample
    scale1, scale2, attn_samples = _branch_scales(block, b, x)
    x_rows = x.flatten(0, 1).index_select(0, rows.token_index)
    w_q, w_kv = attn.qkv.weight.split([attn.attn_dim, 2 * attn.attn_dim])
    b_q, b_kv = (None, None) if attn.qkv.bias is None else attn.qkv.bias.split([attn.attn_dim, 2 * attn.attn_dim])
    # Keys and values from every token of the samples whose attention runs (all, or the stochastic-depth subset).
    x_kv = x if attn_samples is None else x.index_select(0, attn_samples)
    kv = F.linear(block.norm1(x_kv), w_kv, b_kv).reshape(x_kv.shape[0], n, 2, heads, head_dim).permute(2, 0, 3, 1, 4)
    k, v = attn.k_norm(kv[0]), kv[1]
    q_rows = attn.q_norm(F.linear(block.norm1(x_rows), w_q, b_q).reshape(-1, heads, head_dim))
    q = q_rows.new_zeros(b * width, heads, head_dim).index_copy(0, rows.slot, q_rows).view(b, width, heads, head_dim)
    if attn_samples is not None:
        q = q.index_select(0, attn_samples)
    out = _attention(attn, q.transpose(1, 2), k, v).transpose(1, 2).reshape(-1, width, attn.attn_dim)
    if attn_samples is not None:
        out = out.new_zeros(b, width, attn.attn_dim).index_copy(0, attn_samples, out)
    out_rows = out.flatten(0, 1).index_select(0, rows.slot)
    branch1 = block.ls1(attn.proj(attn.norm(out_rows)))
    x_rows = x_rows + (branch1 if scale1 is None else branch1 * scale1.index_select(0, rows.sample)[:, None])
    branch2 = block.ls2(block.mlp(block.norm2(x_rows)))
    return x_rows + (branch2 if scale2 is None else branch2 * scale2.index_select(0, rows.sample)[:, None])


class _QueryRowsForward:
    """Adds ``query_rows`` to a block's forward; without it the block runs as before. Called through the module
    (``block(x, query_rows=...)``), so FSDP2's per-block hooks and torch.compile wrap the trimmed pass too."""

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
        query_rows: QueryRows | None = None,
    ) -> torch.Tensor:
        if query_rows is None:
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        return forward_query_rows(self, x, query_rows)


class QueryRowsBlock(_QueryRowsForward, Block):
    """A timm ``Block`` whose forward also takes ``query_rows`` (same parameters and names)."""


class QueryRowsSubsetDropPathBlock(_QueryRowsForward, SubsetDropPathBlock):
    """A ``SubsetDropPathBlock`` whose forward also takes ``query_rows`` (same parameters and names)."""


_WITH_QUERY_ROWS = {Block: QueryRowsBlock, SubsetDropPathBlock: QueryRowsSubsetDropPathBlock}


def enable_query_rows(block: torch.nn.Module) -> bool:
    """Let ``block`` take ``query_rows`` (in place: class swap, parameters untouched). False if unsupported."""
    if isinstance(block, _QueryRowsForward):
        return True
    cls = _WITH_QUERY_ROWS.get(type(block))
    if cls is None or not supports_query_rows(block):
        return False
    block.__class__ = cls
    return True


def _read_rows(vit: MaskedViT, x: torch.Tensor, masks: torch.Tensor | None, rows_for) -> torch.Tensor:
    """The final-norm output [R, D] at the rows ``rows_for(n_tokens)`` selects, for images ``x``."""
    bb = vit.backbone
    tokens = vit.embed(x, masks)
    *body, last = bb.blocks
    if bb.grad_checkpointing and torch.is_grad_enabled():
        tokens = checkpoint_seq(torch.nn.Sequential(*body), tokens)
    else:
        for block in body:
            tokens = block(tokens)
    rows = rows_for(tokens.shape[1])
    if isinstance(last, _QueryRowsForward):
        out = last(tokens, query_rows=rows)
    else:  # a block this module cannot trim: run it whole, then read the same rows
        out = last(tokens).flatten(0, 1).index_select(0, rows.token_index)
    return bb.norm(out)


def objective_tokens(
    vit: MaskedViT,
    global_crops: torch.Tensor,
    local_crops: torch.Tensor | None,
    masks: torch.Tensor,
    mask_indices: torch.Tensor | None = None,
    mask_input: bool = True,
) -> dict[str, torch.Tensor | None]:
    """What the DINOv2 objective reads from the backbone, after the final norm, and nothing more:

    ``global_cls`` [G*B, D], ``masked_patch`` [M, D] (global-crop patches at ``mask_indices``, flat indices into
    ``masks`` [G*B, P], default ``masks.flatten().nonzero()``, in that order) and ``local_cls`` [L*B, D] (None
    without local crops). Equal to ``vit.forward_crops`` read at those tokens; the last block runs its queries
    on them only when it was prepared with ``enable_query_rows``. ``mask_input=False`` (the teacher) feeds the
    global crops unmasked and still reads the masked positions.
    """
    if mask_indices is None:
        mask_indices = masks.flatten().nonzero().squeeze(1)
    n_prefix = vit.backbone.num_prefix_tokens
    g_rows = _read_rows(
        vit,
        global_crops,
        masks if mask_input else None,
        lambda n_tokens: cls_and_masked_rows(masks, mask_indices, n_prefix),
    )
    n_global = global_crops.shape[0]
    local_cls = None
    if local_crops is not None and local_crops.shape[0] > 0:
        local_cls = _read_rows(
            vit, local_crops, None, lambda n_tokens: cls_rows(local_crops.shape[0], n_tokens, local_crops.device)
        )
    return {"global_cls": g_rows[:n_global], "masked_patch": g_rows[n_global:], "local_cls": local_cls}
