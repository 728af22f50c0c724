"""Block-wise prototype cross-entropy and centered softmax equal the plain tensor expressions, values and grads."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pathdino.losses import prototype_ce
from pathdino.losses.prototype_ce import centered_softmax, prototype_cross_entropy, sum_over_rows


def _plain_ce(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    return -(targets.float() * F.log_softmax(logits.float() / temperature, dim=-1)).sum(dim=-1)


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    # Blocks of 3 rows at K = 257: several blocks and a ragged last one, as at K = 65,536 on a CPU.
    monkeypatch.setattr(prototype_ce, "_CPU_BLOCK_ELEMENTS", 3 * 257)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n_rows", [0, 1, 7, 12])
def test_cross_entropy_values_and_gradient_equal_the_plain_expression(dtype, n_rows):
    g = torch.Generator().manual_seed(n_rows)
    logits = (torch.randn(n_rows, 257, generator=g) * 3).to(dtype).requires_grad_()
    targets = F.softmax(torch.randn(n_rows, 257, generator=g) / 0.05, dim=-1)
    weights = torch.rand(n_rows, generator=g)

    ours = prototype_cross_entropy(logits, targets, 0.1)
    (ours * weights).sum().backward()
    grad, logits.grad = logits.grad, None
    ref = _plain_ce(logits, targets, 0.1)
    (ref * weights).sum().backward()

    assert ours.dtype == torch.float32 and ours.shape == (n_rows,)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    assert grad.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # the gradient is rounded to the logits' dtype
    torch.testing.assert_close(grad.float(), logits.grad.float(), rtol=tol, atol=tol)


def test_cross_entropy_under_autocast_stays_fp32_and_targets_need_not_sum_to_one():
    logits = torch.randn(5, 257).bfloat16().requires_grad_()
    targets = torch.rand(5, 257) * 0.01  # unnormalised: the lse * sum(t) term must carry the row mass
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = prototype_cross_entropy(logits, targets, 0.07)
    ours.sum().backward()
    grad = logits.grad
    logits.grad = None
    _plain_ce(logits, targets, 0.07).sum().backward()
    torch.testing.assert_close(ours, _plain_ce(logits, targets, 0.07), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.float(), logits.grad.float(), rtol=1e-2, atol=1e-4)


def test_cross_entropy_refuses_bad_input():
    with pytest.raises(ValueError, match="both be"):
        prototype_cross_entropy(torch.zeros(2, 3), torch.zeros(2, 4), 0.1)
    with pytest.raises(ValueError, match="no gradient to targets"):
        prototype_cross_entropy(torch.zeros(2, 3), torch.zeros(2, 3, requires_grad=True), 0.1)
    with pytest.raises(ValueError, match="positive"):
        prototype_cross_entropy(torch.zeros(2, 3), torch.zeros(2, 3), 0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_centered_softmax_equals_softmax_of_centered_logits(dtype):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(11, 257, generator=g) * 4).to(dtype)
    center = torch.randn(1, 257, generator=g)
    ours = centered_softmax(logits, center, 0.04)
    ref = F.softmax((logits.float() - center) / 0.04, dim=-1)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ours.sum(dim=1), torch.ones(11))
    assert centered_softmax(logits[:0], center, 0.04).shape == (0, 257)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sum_over_rows_is_the_fp32_column_sum(dtype):
    x = (torch.randn(13, 257, generator=torch.Generator().manual_seed(3)) * 4).to(dtype)
    ours = sum_over_rows(x)
    assert ours.dtype == torch.float32 and ours.shape == (257,)
    torch.testing.assert_close(ours, x.double().sum(dim=0).float(), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(sum_over_rows(x[:0]), torch.zeros(257))
    with pytest.raises(ValueError, match=r"\[N, K\]"):
        sum_over_rows(x[0])
