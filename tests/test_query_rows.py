"""The trimmed last block (pathdino/models/query_rows.py): exactly the untrimmed computation, for what is read.

Tiny ViTs in fp32; every comparison runs the same random draws (stochastic depth) through both paths.
"""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from pathdino.losses import DINOLoss, IBOTPatchLoss, build_uniformity_loss
from pathdino.models import BackboneConfig, HeadConfig, MaskedViT, build_backbone
from pathdino.models.query_rows import QueryRowsBlock, cls_and_masked_rows, enable_query_rows, objective_tokens
from pathdino.train.model import build_student_teacher
from pathdino.train.schedules import ScheduleValues
from pathdino.train.step import Objective, StepParts, training_step

HEAD = HeadConfig(n_prototypes=64, hidden_dim=32, bottleneck_dim=16)


def _cfg(rate: float, registers: int = 2) -> BackboneConfig:
    return BackboneConfig(
        arch="custom",
        embed_dim=48,
        depth=3,
        num_heads=3,
        img_size=56,
        num_register_tokens=registers,
        drop_path_rate=rate,
    )


def _masks(n: int, n_patches: int, seed: int = 0) -> torch.Tensor:
    """Different numbers of masked patches per crop (none in some), scattered, as iBOT masks are."""
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros(n, n_patches, dtype=torch.bool)
    for i in range(n):
        k = [0, 3, 1, 7, 0, 5][i % 6]
        masks[i, torch.randperm(n_patches, generator=g)[:k]] = True
    return masks


def _close_grads(got: torch.Tensor, want: torch.Tensor, name: str) -> None:
    """fp32 summation order differs between the paths: tolerance 1e-4 of the gradient's own scale (a wrong row,
    scale or norm gives errors of the order of the gradient itself)."""
    torch.testing.assert_close(
        got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()) + 1e-12, msg=lambda m: f"{name}: {m}"
    )


def test_rows_are_cls_then_masked_patches_in_the_given_order():
    masks = torch.tensor([[0, 1, 0, 1], [0, 0, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    rows = cls_and_masked_rows(masks, masks.flatten().nonzero().squeeze(1), n_prefix=3)
    n_tokens = 7
    assert rows.token_index.tolist() == [0, n_tokens, 2 * n_tokens, 3 + 1, 3 + 3, 2 * n_tokens + 3]
    assert rows.sample.tolist() == [0, 1, 2, 0, 0, 2] and rows.max_per_sample == 3
    assert rows.slot.tolist() == [0, 3, 6, 1, 2, 7]  # unique slots within each sample's padded row
    shuffled = cls_and_masked_rows(masks, torch.tensor([8, 3, 1]), n_prefix=3)  # any order is kept
    assert shuffled.token_index.tolist()[3:] == [2 * n_tokens + 3, 3 + 3, 3 + 1]
    assert sorted(shuffled.slot.tolist()) == sorted(rows.slot.tolist())


@pytest.mark.parametrize("rate,registers,fused", [(0.0, 2, True), (0.1, 2, False), (0.3, 0, True), (0.3, 4, False)])
def test_objective_tokens_and_their_gradients_match_the_full_forward(rate, registers, fused):
    torch.manual_seed(0)
    vit = MaskedViT(build_backbone(_cfg(rate, registers))).train()
    for block in vit.backbone.blocks:
        block.attn.fused_attn = fused
    with torch.no_grad():  # LayerScale at 1e-5 would hide a wrong branch inside the tolerance
        for block in vit.backbone.blocks:
            block.ls1.gamma.normal_()
            block.ls2.gamma.normal_()
    g = torch.randn(6, 3, 56, 56)
    loc = torch.randn(4, 3, 28, 28)
    masks = _masks(6, 16)
    idx = masks.flatten().nonzero().squeeze(1)

    def run(trim: bool):
        vit.zero_grad()
        if trim:
            assert enable_query_rows(vit.backbone.blocks[-1])
        torch.manual_seed(1)
        if trim:
            out = objective_tokens(vit, g, loc, masks, idx)
            picked = [out["global_cls"], out["masked_patch"], out["local_cls"]]
        else:
            full = vit.forward_crops(g, loc, masks)
            picked = [full["global"]["cls"], full["global"]["patch"][masks], full["local"]["cls"]]
        weights = [torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) for i, p in enumerate(picked)]
        sum((p * w).sum() for p, w in zip(picked, weights)).backward()
        return [p.detach() for p in picked], {n: p.grad.clone() for n, p in vit.named_parameters()}

    full_out, full_grads = run(False)
    trim_out, trim_grads = run(True)
    assert type(vit.backbone.blocks[-1]).__name__.startswith("QueryRows")
    for a, b in zip(trim_out, full_out):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert full_grads.keys() == trim_grads.keys()
    for name in full_grads:
        _close_grads(trim_grads[name], full_grads[name], name)


def _parts(student, teacher) -> StepParts:
    losses = nn.ModuleDict(
        {"dino": DINOLoss(64, 0.1, "centering", 0.9, 3), "ibot": IBOTPatchLoss(64, 0.1, "centering", 0.9, 3)}
    )
    objective = Objective(
        dino_weight=1.0,
        ibot_weight=1.0,
        uniformity_weight=0.1,
        student_temp=0.1,
        update_centers=True,
        grad_accum_steps=1,
        clip_grad=3.0,
        freeze_last_layer="zero_lr",
    )
    return StepParts(
        student=student,
        teacher=teacher,
        model=student,
        losses=losses,
        uniformity=build_uniformity_loss("koleo", duplicate_tol=1e-6),
        optimizer=torch.optim.SGD(student.parameters(), lr=0.0),
        clip_modules={},
        autocast=contextlib.nullcontext(),
        objective=objective,
    )


@pytest.mark.parametrize("separate", [False, True])
def test_training_step_losses_and_gradients_equal_the_untrimmed_step(separate):
    torch.manual_seed(0)
    student, teacher = build_student_teacher(_cfg(0.3), HEAD, HEAD if separate else None)
    assert student.trim_last_block and teacher.trim_last_block
    assert isinstance(teacher.backbone.backbone.blocks[-1], QueryRowsBlock)
    with torch.no_grad():
        for model in (student, teacher):
            for block in model.backbone.backbone.blocks:
                block.ls1.gamma.fill_(0.5)
                block.ls2.gamma.fill_(-0.5)
        teacher.load_state_dict(student.state_dict())
    gen = torch.Generator().manual_seed(3)
    batch = SimpleNamespace(
        global_crops=torch.randn(6, 3, 56, 56, generator=gen),
        local_crops=torch.randn(6, 3, 28, 28, generator=gen),
        masks=_masks(6, 16),
        n_global=2,
    )
    values = ScheduleValues(lr=0.0, weight_decay=0.0, momentum=0.99, teacher_temp=0.05, last_layer_frozen=False)
    results = {}
    for trim in (False, True):
        student.trim_last_block = teacher.trim_last_block = trim
        student.zero_grad()
        torch.manual_seed(7)
        out = training_step(_parts(student, teacher), batch, values, sync=True)
        results[trim] = (out, {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None})
    (full, full_grads), (trim, trim_grads) = results[False], results[True]
    torch.testing.assert_close(trim.terms, full.terms, rtol=1e-5, atol=1e-6)
    for a, b in (
        (trim.teacher_patch_logits, full.teacher_patch_logits),
        (trim.teacher_cls, full.teacher_cls),
        (trim.student_cls_logits, full.student_cls_logits),
    ):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert trim_grads.keys() == full_grads.keys() == {n for n, _ in student.named_parameters()}
    for name in full_grads:
        _close_grads(trim_grads[name], full_grads[name], name)


def test_export_and_embedding_paths_keep_the_plain_block():
    backbone = build_backbone(_cfg(0.0))
    assert type(backbone.blocks[-1]).__name__ == "Block"
    vit = MaskedViT(backbone)
    assert type(vit.backbone.blocks[-1]).__name__ == "Block"  # only the trainer's SSLModel trims
