"""Subset stochastic depth (dinov2's drop_add_residual_stochastic_depth) and its FLOP count."""

from __future__ import annotations

import pytest
import torch
from timm.layers import DropPath

from pathdino.models import BackboneConfig, build_backbone, dinov2_train_flops_per_image
from pathdino.models.backbone import SubsetDropPathBlock


def tiny(rate: float) -> BackboneConfig:
    return BackboneConfig(arch="custom", embed_dim=64, depth=2, num_heads=4, img_size=56, drop_path_rate=rate)


def test_rates_above_0_1_use_the_subset_block_and_keep_parameter_names():
    subset, plain = build_backbone(tiny(0.3)), build_backbone(tiny(0.1))
    assert all(type(b) is SubsetDropPathBlock for b in subset.blocks)
    assert not any(isinstance(b, SubsetDropPathBlock) for b in plain.blocks)
    assert all(isinstance(b.drop_path1, DropPath) and b.drop_path1.drop_prob == 0.3 for b in subset.blocks)
    assert [n for n, _ in subset.named_parameters()] == [n for n, _ in plain.named_parameters()]


def test_branch_runs_on_the_kept_samples_only_and_is_rescaled():
    torch.manual_seed(0)
    block = build_backbone(tiny(0.5)).blocks[0]
    with torch.no_grad():
        block.ls1.gamma.fill_(1.0)
        block.ls2.gamma.zero_()  # only the attention branch contributes
    x = torch.randn(4, 20, 64)
    branch = block.ls1(block.attn(block.norm1(x))).detach()
    block.train()
    delta = block(x).detach() - x
    changed = [i for i in range(4) if delta[i].abs().max() > 1e-6]
    assert len(changed) == 2  # int(4 * (1 - 0.5)) samples
    for i in changed:
        torch.testing.assert_close(delta[i], 2.0 * branch[i], rtol=1e-4, atol=1e-5)  # scaled by B / subset
    block.eval()  # eval: the plain block, every sample
    torch.testing.assert_close(block(x) - x, branch)


def test_gradients_reach_every_parameter_used():
    model = build_backbone(tiny(0.4)).train()
    model(torch.randn(5, 3, 56, 56)).sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if n.startswith("blocks."))


def test_flops_count_the_kept_share_of_the_student_blocks():
    cfg = BackboneConfig(arch="vit_small")
    full = dinov2_train_flops_per_image(cfg)
    subset = dinov2_train_flops_per_image(cfg, subset_drop_path=0.3)
    assert subset.teacher_backbone == full.teacher_backbone and subset.heads == full.heads
    # the patch embedding is not dropped, so a little more than 70% remains
    assert 0.70 < subset.student_backbone / full.student_backbone < 0.71
    assert dinov2_train_flops_per_image(cfg, subset_drop_path=0.0).total == pytest.approx(full.total)
