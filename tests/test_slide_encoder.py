"""The LongNet slide encoder (pathdino.slide): dilated attention against dense and brute-force references,
packing of variable-length slides, positions with holes, head offsets, config errors."""

from __future__ import annotations

import math

import pytest
import torch

from pathdino.slide import (
    SlideEncoder,
    SlideEncoderConfig,
    dilated_attention,
    grid_positions,
    pack_layout,
    row_major_order,
    slide_encoder_preset,
)
from pathdino.slide import attention
from pathdino.slide.attention import DilatedAttention
from tiling.configio import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny ops: OpenMP barriers cost more than the work


def _qkv(n_tiles, n_slides, heads=4, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    tiles = [torch.randn(n_tiles, heads, dim, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    cls = [torch.randn(n_slides, heads, dim, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    return tiles, cls


def _dense(tiles, cls, lengths):
    """Plain softmax attention of each slide's [CLS, tiles] over themselves."""
    outs, outs_cls, start = [], [], 0
    for b, n in enumerate(lengths):
        q, k, v = (torch.cat([c[b : b + 1], t[start : start + n]]).transpose(0, 1) for t, c in zip(tiles, cls))
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(0, 1)
        outs_cls.append(o[0])
        outs.append(o[1:])
        start += n
    return torch.cat(outs), torch.stack(outs_cls)


def _longnet_reference(tiles, cls, n, segments, ratios):
    """One slide, brute force: token i of head h attends to its CLS and, for each branch where it is selected,
    to every selected token of its segment; a key seen by several branches counts that many times."""
    q, k, v = tiles
    heads, dim = q.shape[1:]
    count = torch.zeros(heads, n + 1, n + 1, dtype=torch.float64)
    count[:, :, 0] = 1  # every token sees the CLS key once; the CLS row is dense
    count[:, 0, :] = 1
    for w, r in zip(segments, ratios):
        seg = min(w, n)
        for h in range(heads):
            off = h % r
            for i in range(n):
                if (i % seg) % r != off:
                    continue
                for j in range(n):
                    if j // seg == i // seg and (j % seg) % r == off:
                        count[h, i + 1, j + 1] += 1
    qa, ka, va = (torch.cat([c[0:1], t]).transpose(0, 1) for t, c in zip(tiles, cls))
    scores = qa @ ka.transpose(-1, -2) / math.sqrt(dim) + count.log()
    out = (scores.softmax(-1) @ va).transpose(0, 1)
    return out[1:], out[0]


def test_dilated_equals_dense_when_one_segment_covers_the_slide_and_ratio_is_one():
    lengths = [37, 12]
    tiles, cls = _qkv(sum(lengths), len(lengths))
    layout = pack_layout(lengths, segment_lengths=(64,), dilation_ratios=(1,), num_heads=4)
    out, out_cls = dilated_attention(tuple(tiles), tuple(cls), layout)
    ref, ref_cls = _dense(tiles, cls, lengths)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(out_cls, ref_cls)
    weights = ref.detach().cos(), ref_cls.detach().sin()
    grads = torch.autograd.grad((out * weights[0]).sum() + (out_cls * weights[1]).sum(), tiles + cls)
    ref_grads = torch.autograd.grad((ref * weights[0]).sum() + (ref_cls * weights[1]).sum(), tiles + cls)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("path,budget", [("cpu-flash", 1 << 20), ("math", 1 << 20), ("math", 7)])
def test_mixed_branches_equal_brute_force_longnet(path, budget, monkeypatch):
    """Both CPU paths: the fused flash kernel (log-sum-exp gradient injected), and plain matmuls in chunks
    (budget 7 scores: query-row chunks and their recomputation in the backward pass)."""
    if path == "math":
        monkeypatch.setattr(attention, "_CPU_FLASH", None)
    n, segments, ratios = 23, (4, 8, 16), (1, 2, 4)
    tiles, cls = _qkv(n, 1, heads=4)
    layout = pack_layout([n], segment_lengths=segments, dilation_ratios=ratios, num_heads=4)
    out, out_cls = dilated_attention(tuple(tiles), tuple(cls), layout, score_budget=budget)
    ref, ref_cls = _longnet_reference(tiles, cls, n, segments, ratios)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(out_cls[0], ref_cls)
    grads = torch.autograd.grad(out.square().sum(), tiles)
    ref_grads = torch.autograd.grad(ref.square().sum(), tiles)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want)


def _small_cfg(**kw):
    return SlideEncoderConfig(
        **{
            **dict(
                in_dim=12, embed_dim=32, depth=2, num_heads=4, segment_lengths=(8, 16, 32), dilation_ratios=(1, 2, 4)
            ),
            **kw,
        }
    )


def test_packed_slides_equal_one_slide_at_a_time_in_any_tile_order():
    torch.manual_seed(0)
    model = SlideEncoder(_small_cfg()).double().eval()
    lengths = [40, 7, 19]
    emb = torch.randn(sum(lengths), 12, dtype=torch.float64)
    grids = [
        torch.stack(torch.meshgrid(torch.arange(8), torch.arange(5), indexing="xy"), -1).reshape(-1, 2)[:n]
        for n in lengths
    ]
    grids = [g[torch.randperm(len(g))] for g in grids]  # tiles in a scrambled order
    packed = model(emb, torch.cat(grids), lengths)
    start = 0
    for b, (n, grid) in enumerate(zip(lengths, grids)):
        alone = model(emb[start : start + n], grid)
        torch.testing.assert_close(packed.cls[b], alone.cls[0])
        torch.testing.assert_close(packed.tiles[start : start + n], alone.tiles)
        start += n


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(1)
    model = SlideEncoder(_small_cfg()).double()
    emb = torch.randn(30, 12, dtype=torch.float64)
    grid = torch.stack([torch.arange(30) % 6, torch.arange(30) // 6], 1)
    grads = []
    for flag in (False, True):
        model.grad_checkpointing = flag
        model.zero_grad()
        out = model(emb, grid, [20, 10])
        (out.cls.square().sum() + out.tiles.sin().sum()).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_grid_positions_keep_holes_and_row_major_order():
    stride = 448.0  # 224 px tiles at 0.5 um/px from a 0.25 um/px scan
    coords = torch.tensor([[1000 + 5 * stride, 2000], [1000, 2000 + 2 * stride], [1000, 2000], [1001 + stride, 2000]])
    grid = grid_positions(coords, stride)
    assert grid.tolist() == [[5, 0], [0, 2], [0, 0], [1, 0]]  # the gap of 3 empty columns and a row is kept
    assert row_major_order(grid).tolist() == [2, 3, 0, 1]


def test_heads_take_different_offsets():
    layout = pack_layout([16], segment_lengths=(8,), dilation_ratios=(2,), num_heads=4)
    members = {tuple(g.heads.tolist()): sorted(g.index[g.valid].tolist()) for g in layout.branches[0]}
    assert members == {(0, 2): list(range(0, 16, 2)), (1, 3): list(range(1, 16, 2))}
    attn = DilatedAttention(8, num_heads=2)
    assert attn.num_heads == 2


@pytest.mark.parametrize(
    "kwargs,key",
    [
        (dict(segment_lengths=(1024, 2048)), "dilation_ratios"),  # one ratio per segment length
        (dict(dilation_ratios=(2, 2, 4, 8)), "dilation_ratios"),  # no ratio of 1
        (dict(segment_lengths=(1024, 4096, 2, 65536)), "segment_lengths"),  # segment 2 < ratio 4
        (dict(segment_lengths=(1024, 0, 16384, 65536)), "segment_lengths"),
        (dict(num_heads=3), "num_heads"),
        (dict(embed_dim=30), "embed_dim"),
        (dict(drop_path=1.5), "drop_path"),
    ],
)
def test_config_errors_name_the_key(kwargs, key):
    with pytest.raises(ConfigError, match=f"SlideEncoderConfig.{key}=") as err:
        SlideEncoderConfig(**kwargs)
    assert err.value.key == f"SlideEncoderConfig.{key}"


def test_presets():
    giga = slide_encoder_preset("gigapath")
    assert (giga.depth, giga.embed_dim, giga.num_heads) == (12, 768, 16)
    assert giga.segment_lengths == (1024, 5792, 32768, 185363, 1048576)
    assert giga.dilation_ratios == (1, 2, 4, 8, 16)
    assert slide_encoder_preset("small", in_dim=384).in_dim == 384
    with pytest.raises(ConfigError, match="preset 'huge' is unknown"):
        slide_encoder_preset("huge")


class _FakeFmha:
    """The two xformers calls the GPU path makes, in plain torch (CPU), to check its packing and the log-sum-exp
    gradient it injects; the real kernel's backward, like this one, ignores a gradient on the log-sum-exp."""

    class attn_bias:  # noqa: N801 - mirrors xformers.ops.fmha.attn_bias
        class BlockDiagonalMask:
            def __init__(self, seqlens):
                self.seqlens = seqlens

            @classmethod
            def from_seqlens(cls, seqlens):
                return cls(seqlens)

    @staticmethod
    def _scores(q, k, bias, scale):
        seg = torch.repeat_interleave(torch.arange(len(bias.seqlens)), torch.tensor(bias.seqlens))
        s = torch.einsum("bmhd,bnhd->bhmn", q, k) * scale
        return s.masked_fill(seg[:, None] != seg[None, :], float("-inf"))

    @classmethod
    def memory_efficient_attention_partial(cls, q, k, v, *, attn_bias, scale):
        s = cls._scores(q, k, attn_bias, scale)
        return torch.einsum("bhmn,bnhd->bmhd", s.softmax(-1), v), s.logsumexp(-1)

    @classmethod
    def memory_efficient_attention_backward(cls, grad, out, lse, q, k, v, *, attn_bias, scale):
        p = torch.exp(cls._scores(q, k, attn_bias, scale) - lse[..., None])
        dv = torch.einsum("bhmn,bmhd->bnhd", p, grad)
        dp = torch.einsum("bmhd,bnhd->bhmn", grad, v)
        ds = p * (dp - (grad * out).sum(-1).transpose(1, 2)[..., None])
        return (torch.einsum("bhmn,bnhd->bmhd", ds, k) * scale, torch.einsum("bhmn,bmhd->bnhd", ds, q) * scale, dv)


def test_xformers_path_packs_segments_and_injects_the_lse_gradient(monkeypatch):
    import sys
    import types

    monkeypatch.setitem(sys.modules, "xformers", types.ModuleType("xformers"))
    monkeypatch.setitem(sys.modules, "xformers.ops", types.SimpleNamespace(fmha=_FakeFmha))
    monkeypatch.setattr(attention, "resolve_backend", lambda backend, q: backend)
    lengths = [23, 9]
    tiles, cls = _qkv(sum(lengths), 2)
    layout = pack_layout(lengths, segment_lengths=(4, 8, 16), dilation_ratios=(1, 2, 4), num_heads=4)
    results = {b: dilated_attention(tuple(tiles), tuple(cls), layout, backend=b) for b in ("torch", "xformers")}
    torch.testing.assert_close(results["xformers"][0], results["torch"][0])
    grads = {b: torch.autograd.grad(r[0].square().sum() + r[1].sum(), tiles) for b, r in results.items()}
    for got, want in zip(grads["xformers"], grads["torch"]):
        torch.testing.assert_close(got, want)


def test_attention_backend_choice():
    q = torch.zeros(1, 1, 8)
    assert attention.resolve_backend("auto", q) == "torch"  # no GPU here
    with pytest.raises(ValueError, match="needs xformers installed"):
        attention.resolve_backend("xformers", q)


def test_outputs_follow_the_input_tile_order():
    torch.manual_seed(2)
    model = SlideEncoder(_small_cfg()).double().eval()
    emb = torch.randn(25, 12, dtype=torch.float64)
    grid = torch.stack([torch.arange(25) % 5, torch.arange(25) // 5], 1)
    perm = torch.randperm(25)
    with torch.no_grad():
        base, shuffled = model(emb, grid), model(emb[perm], grid[perm])
    torch.testing.assert_close(shuffled.tiles, base.tiles[perm])
    torch.testing.assert_close(shuffled.cls, base.cls)
