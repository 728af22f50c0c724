"""Teacher targets and cross-entropy over many prototypes, a few rows at a time.

iBOT's masked tokens give [M, K] logits with M ~ 1,300 and K = 65,536 on ViT-S/14 at batch 16: each elementwise pass
over them (cast to fp32, divide by the temperature, log-softmax, product with the targets, their backward) reads
and writes ~340 MB. Written as plain tensor ops, those passes took 9-14% of a bf16 CPU step, bound by memory, not
arithmetic. Here each row block is small enough to stay in the CPU's L2 cache while every pass runs over it, and the
cross-entropy has a hand-written backward that recomputes the softmax from the saved log-sum-exp instead of
keeping [M, K] intermediates. On accelerators the blocks are large (fewer, bigger kernels).

The math is that of the plain expressions, in fp32 whatever the logits' dtype:

* ``centered_softmax(z, c, tau) = softmax((z - c) / tau)`` per row;
* ``prototype_cross_entropy(s, t, tau)[i] = -sum_k t_ik log_softmax(s_i / tau)_k
  = lse_i sum_k t_ik - sum_k t_ik s_ik / tau``, with ``lse_i = logsumexp(s_i / tau)``; its gradient with respect to
  ``s_i`` is ``(sum_k t_ik softmax(s_i / tau) - t_i) / tau``. No gradient flows to the targets.
"""

from __future__ import annotations

import torch

__all__ = ["centered_softmax", "prototype_cross_entropy", "sum_over_rows"]

# fp32 elements per row block: 1 MiB on CPUs (a Zen 4 or Sapphire Rapids core has 1-2 MiB of L2), 64 MiB elsewhere.
_CPU_BLOCK_ELEMENTS = 1 << 18
_ACCELERATOR_BLOCK_ELEMENTS = 1 << 24


def _rows_per_block(x: torch.Tensor) -> int:
    elements = _CPU_BLOCK_ELEMENTS if x.device.type == "cpu" else _ACCELERATOR_BLOCK_ELEMENTS
    return max(1, elements // max(x.shape[-1], 1))


def _blocks(n_rows: int, rows: int) -> list[tuple[int, int]]:
    return [(a, min(a + rows, n_rows)) for a in range(0, n_rows, rows)]


@torch.no_grad()
def centered_softmax(logits: torch.Tensor, center: torch.Tensor, temperature: float) -> torch.Tensor:
    """``softmax((logits - center) / temperature, dim=-1)`` in fp32 for logits [N, K] and center [1, K] or [K]."""
    if logits.dim() != 2:
        raise ValueError(f"logits must be [N, K], got {tuple(logits.shape)}")
    out = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
    center = center.reshape(1, -1).float()
    with torch.autocast(logits.device.type, enabled=False):
        for a, b in _blocks(logits.shape[0], _rows_per_block(logits)):
            x = out[a:b]
            x.copy_(logits[a:b])
            x.sub_(center).div_(temperature)
            x.sub_(x.amax(dim=1, keepdim=True)).exp_()
            x.div_(x.sum(dim=1, keepdim=True))
    return out


@torch.no_grad()
def sum_over_rows(x: torch.Tensor) -> torch.Tensor:
    """``x.sum(dim=0)`` in fp32 [K] for [N, K] of any float dtype.

    On CPUs ``x.sum(dim=0, dtype=torch.float32)`` of a bf16 tensor first casts all of it to fp32: 82-90 ms for the
    iBOT center's [785, 65,536] on a 2-core AMD EPYC, up to 300 ms inside a step. Adding the rows one by one into an
    fp32 accumulator upcasts as it goes: 17 ms, same sums to fp32 rounding.
    """
    if x.dim() != 2:
        raise ValueError(f"expected [N, K], got {tuple(x.shape)}")
    if x.dtype == torch.float32 or x.device.type != "cpu":
        return x.sum(dim=0, dtype=torch.float32)
    out = torch.zeros(x.shape[1], dtype=torch.float32, device=x.device)
    for row in x:
        out.add_(row)
    return out


class _PrototypeCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
        n_rows, n_prototypes = logits.shape
        rows = _rows_per_block(logits)
        f32 = dict(dtype=torch.float32, device=logits.device)
        lse, mass, ce = (torch.empty(n_rows, **f32) for _ in range(3))
        scratch = torch.empty(min(rows, n_rows), n_prototypes, **f32)
        with torch.autocast(logits.device.type, enabled=False):
            for a, b in _blocks(n_rows, rows):
                x = scratch[: b - a]
                x.copy_(logits[a:b]).div_(temperature)
                t = targets[a:b].float()
                torch.logsumexp(x, dim=1, out=lse[a:b])
                torch.sum(t, dim=1, out=mass[a:b])
                dot = x.mul_(t).sum(dim=1)  # row-wise <t_i, s_i / tau>, in place (x is not needed again)
                torch.addcmul(-dot, lse[a:b], mass[a:b], out=ce[a:b])
        ctx.save_for_backward(logits, targets, lse, mass)
        ctx.temperature = temperature
        return ce

    @staticmethod
    def backward(ctx, grad_ce: torch.Tensor):
        logits, targets, lse, mass = ctx.saved_tensors
        temperature = ctx.temperature
        n_rows, n_prototypes = logits.shape
        rows = _rows_per_block(logits)
        grad = torch.empty_like(logits)
        scale = grad_ce.float() / temperature
        scratch = torch.empty(min(rows, max(n_rows, 1)), n_prototypes, dtype=torch.float32, device=logits.device)
        with torch.autocast(logits.device.type, enabled=False):
            for a, b in _blocks(n_rows, rows):
                p = scratch[: b - a]
                p.copy_(logits[a:b]).div_(temperature).sub_(lse[a:b, None]).exp_()  # softmax(s_i / tau)
                p.mul_(mass[a:b, None]).sub_(targets[a:b]).mul_(scale[a:b, None])
                grad[a:b].copy_(p)
        return grad, None, None


def prototype_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-row cross-entropy ``-sum_k targets_ik log_softmax(logits_i / temperature)_k`` [N], in fp32.

    ``logits`` [N, K] (any float dtype; the gradient comes back in it), ``targets`` [N, K] without gradient (teacher
    probabilities). Same values and gradients as the plain expression, computed block by block (module docstring).
    """
    if logits.dim() != 2 or targets.shape != logits.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} must both be [N, K]")
    if targets.requires_grad:
        raise ValueError("prototype_cross_entropy gives no gradient to targets: pass teacher targets detached")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature!r}")
    return _PrototypeCrossEntropy.apply(logits, targets, float(temperature))
