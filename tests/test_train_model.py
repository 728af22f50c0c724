"""pathdino.train model side: student/teacher pair, EMA, parameter groups, frozen last layer, gradient clipping."""

from __future__ import annotations

import pytest
import torch

from pathdino.models import BackboneConfig, HeadConfig
from pathdino.train.step import clip_gradients
from pathdino.train.model import SSLModel, build_student_teacher, ema_update_
from pathdino.train.param_groups import apply_schedule, drop_frozen_grads, param_groups
from pathdino.train.schedules import ScheduleValues

DEPTH = 3
BACKBONE = BackboneConfig(
    arch="custom", embed_dim=32, depth=DEPTH, num_heads=2, img_size=28, num_register_tokens=2, drop_path_rate=0.2
)
HEAD = HeadConfig(n_prototypes=64, hidden_dim=32, bottleneck_dim=16)


def _pair(separate: bool = False):
    torch.manual_seed(0)
    return build_student_teacher(BACKBONE, HEAD, HEAD if separate else None)


def _batch(b: int = 3, n_local: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    global_crops = torch.randn(2 * b, 3, 28, 28, generator=g)
    local_crops = torch.randn(n_local * b, 3, 14, 14, generator=g)
    masks = torch.zeros(2 * b, 4, dtype=torch.bool)
    masks[0, :2] = True
    masks[4, 1] = True
    return global_crops, local_crops, masks


@pytest.mark.parametrize("separate", [False, True])
def test_forward_shapes_and_teacher_sees_unmasked_crops(separate):
    student, teacher = _pair(separate)
    g, loc, masks = _batch()
    out = student(g, loc, masks)
    assert out["global_cls_logits"].shape == (6, 64) and out["local_cls_logits"].shape == (6, 64)
    assert out["masked_patch_logits"].shape == (3, 64) and out["global_cls"].shape == (6, 32)
    t_out = teacher(g, None, masks, teacher=True)
    assert t_out["local_cls_logits"] is None and t_out["masked_patch_logits"].shape == (3, 64)
    # The teacher ignores the masks' content for its input: other masks at the same positions change nothing.
    other = masks.clone()
    other[1, 3] = True
    t_other = teacher(g, None, other, teacher=True)
    torch.testing.assert_close(t_other["global_cls_logits"], t_out["global_cls_logits"])
    assert (student.ibot_head is not None) == separate


def test_teacher_starts_equal_without_grads_or_drop_path():
    student, teacher = _pair()
    for (ns, ps), (nt, pt) in zip(student.named_parameters(), teacher.named_parameters()):
        assert ns == nt and torch.equal(ps, pt)
        assert ps.requires_grad and not pt.requires_grad
    assert not teacher.training
    assert {b.drop_path1.__class__.__name__ for b in teacher.backbone.backbone.blocks} == {"Identity"}
    assert {b.drop_path1.drop_prob for b in student.backbone.backbone.blocks} == {0.2}


def test_ema_update_is_exact_convex_combination():
    student, teacher = _pair()
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    before = {n: p.clone() for n, p in teacher.named_parameters()}
    ema_update_(teacher, student, 0.9)
    for n, p in teacher.named_parameters():
        expected = 0.9 * before[n] + 0.1 * dict(student.named_parameters())[n]
        torch.testing.assert_close(p, expected, rtol=0, atol=1e-6)
    frozen = [p.clone() for p in teacher.parameters()]
    ema_update_(teacher, student, 1.0)  # momentum 1 (the end of the schedule) leaves the teacher alone
    assert all(torch.equal(p, q) for p, q in zip(teacher.parameters(), frozen))
    other = SSLModel(BACKBONE, HEAD, HEAD)
    with pytest.raises(ValueError, match="parameters differ"):
        ema_update_(teacher, other, 0.9)


def _group_of(groups, name):
    return next(g for g in groups if name in g["names"])


def test_param_groups_decay_and_lr_multipliers():
    student, _ = _pair(separate=True)
    groups = param_groups(student.named_parameters(), DEPTH, layerwise_decay=0.9, patch_embed_lr_mult=0.2)
    names = [n for g in groups for n in g["names"]]
    assert sorted(names) == sorted(n for n, _ in student.named_parameters())  # each parameter exactly once
    undecayed = [
        "backbone.backbone.blocks.0.attn.qkv.bias",
        "backbone.backbone.blocks.1.norm1.weight",
        "backbone.backbone.blocks.2.ls1.gamma",
        "backbone.backbone.norm.bias",
        "dino_head.mlp.0.bias",
        "backbone.backbone.patch_embed.proj.bias",
    ]
    tokens = [
        "backbone.backbone.cls_token",
        "backbone.backbone.reg_token",
        "backbone.backbone.pos_embed",
        "backbone.mask_token",
    ]
    for name in undecayed:
        assert _group_of(groups, name)["wd_mult"] == 0.0, name
    # DINOv2 decays everything but biases, norms and LayerScale gammas: tokens and the weight-norm gain included
    for name in [
        "backbone.backbone.blocks.0.attn.qkv.weight",
        "backbone.backbone.patch_embed.proj.weight",
        "dino_head.mlp.0.weight",
        "dino_head.last_layer.weight",
        "ibot_head.last_layer.weight",
        "dino_head.last_layer.weight_g",
        *tokens,
    ]:
        assert _group_of(groups, name)["wd_mult"] == 1.0, name
    timm_style = param_groups(student.named_parameters(), DEPTH, decay_tokens=False)
    for name in tokens:
        assert _group_of(timm_style, name)["wd_mult"] == 0.0, name
    assert _group_of(timm_style, "dino_head.last_layer.weight_g")["wd_mult"] == 1.0
    lr = {n: _group_of(groups, n)["lr_mult"] for n in names}
    assert lr["backbone.backbone.patch_embed.proj.weight"] == pytest.approx(0.9 ** (DEPTH + 1) * 0.2)
    assert lr["backbone.backbone.cls_token"] == pytest.approx(0.9 ** (DEPTH + 1))
    assert lr["backbone.mask_token"] == pytest.approx(0.9 ** (DEPTH + 1))
    for i in range(DEPTH):
        assert lr[f"backbone.backbone.blocks.{i}.mlp.fc1.weight"] == pytest.approx(0.9 ** (DEPTH - i))
    assert lr["backbone.backbone.norm.weight"] == 1.0 and lr["dino_head.mlp.0.weight"] == 1.0
    assert lr["ibot_head.last_layer.weight"] == 1.0
    last = {n for g in groups if g["is_last_layer"] for n in g["names"]}
    assert last == {
        "dino_head.last_layer.weight",
        "ibot_head.last_layer.weight",
        "dino_head.last_layer.weight_g",
        "ibot_head.last_layer.weight_g",
    }
    assert lr["dino_head.last_layer.weight_g"] == 1.0 and student.dino_head.last_layer.weight_g.requires_grad

    opt = torch.optim.AdamW(groups, lr=0.0)
    apply_schedule(
        opt, ScheduleValues(lr=1e-3, weight_decay=0.04, momentum=0.99, teacher_temp=0.04, last_layer_frozen=True)
    )
    for g in opt.param_groups:
        assert g["lr"] == (0.0 if g["is_last_layer"] else pytest.approx(1e-3 * g["lr_mult"]))
        assert g["weight_decay"] == pytest.approx(0.04 * g["wd_mult"])


@pytest.mark.parametrize("mode", ["zero_lr", "drop_grads"])
def test_frozen_last_layer_does_not_move(mode):
    """zero_lr (DINOv2): the frozen layer keeps its gradients (clipping sees them) and AdamW's moments and step
    count accumulate at lr 0; drop_grads (DINO v1): no gradient, no moments while frozen."""
    student, teacher = _pair()
    opt = torch.optim.AdamW(param_groups(student.named_parameters(), DEPTH), lr=0.0, weight_decay=0.0)
    last, gain = student.dino_head.last_layer.weight, student.dino_head.last_layer.weight_g
    start, start_gain = last.detach().clone(), gain.detach().clone()
    g, loc, masks = _batch()
    for step in range(4):
        frozen = step < 2
        values = ScheduleValues(lr=1e-2, weight_decay=0.04, momentum=0.99, teacher_temp=0.04, last_layer_frozen=frozen)
        apply_schedule(opt, values)
        out = student(g, loc, masks)
        out["global_cls_logits"].logsumexp(-1).mean().backward()
        drop_frozen_grads(opt, values, mode)
        assert (last.grad is not None) == (mode == "zero_lr" or not frozen)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if frozen:
            assert torch.equal(last, start) and torch.equal(gain, start_gain)
            assert (last in opt.state) == (mode == "zero_lr")
        else:
            assert not torch.equal(last, start) and not torch.equal(gain, start_gain)
    # everything else was trained all along
    assert opt.state[student.dino_head.mlp[0].weight]["step"].item() == 4
    assert opt.state[last]["step"].item() == (4 if mode == "zero_lr" else 2)


def test_gradient_clipping_is_per_module():
    student, _ = _pair(separate=True)
    g, loc, masks = _batch()
    out = student(g, loc, masks)
    (out["global_cls_logits"].sum() * 1e3 + out["masked_patch_logits"].sum()).backward()
    modules = {"backbone": student.backbone, "dino_head": student.dino_head, "ibot_head": student.ibot_head}
    norms = clip_gradients(modules, 3.0)
    for name, module in modules.items():
        after = torch.stack([p.grad.norm() for p in module.parameters() if p.grad is not None]).norm()
        assert after <= 3.0 + 1e-4, name
        assert norms[name] > 3.0  # returned norms are the ones before clipping
