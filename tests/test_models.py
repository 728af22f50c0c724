"""Backbone, mask token, init checkpoints, heads and FLOP counts (tiny ViTs on CPU)."""

from __future__ import annotations

import json

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed

from pathdino.models import (
    BackboneConfig,
    DINOHead,
    HeadConfig,
    MaskedViT,
    build_backbone,
    dinov2_train_flops_per_image,
    load_init_checkpoint,
    timm_create_kwargs,
    vit_forward_flops,
)
from pathdino.models.heads import normalize_rows

TINY = dict(arch="custom", embed_dim=64, depth=2, num_heads=4, img_size=56, drop_path_rate=0.0)


def tiny_cfg(**overrides) -> BackboneConfig:
    return BackboneConfig(**{**TINY, **overrides})


def tiny_model(seed: int = 0, **overrides) -> MaskedViT:
    torch.manual_seed(seed)
    model = MaskedViT(build_backbone(tiny_cfg(**overrides))).eval()
    with torch.no_grad():  # LayerScale 1e-5 would hide most differences between weights in output checks
        for block in model.backbone.blocks:
            block.ls1.gamma.fill_(1.0)
            block.ls2.gamma.fill_(1.0)
    return model


# ---------------------------------------------------------------------------------------------------------- config


def test_config_validation_and_names():
    assert BackboneConfig().timm_arch == "vit_small_patch14_reg4_dinov2"
    assert BackboneConfig(arch="vit_large", num_register_tokens=0).timm_arch == "vit_large_patch14_dinov2"
    giant = BackboneConfig(arch="vit_giant")
    assert giant.ffn == "swiglu" and giant.mlp_hidden_features == 4096
    assert giant.timm_arch == "vit_giant_patch14_reg4_dinov2"
    # an FFN the family does not have borrows a timm name with that FFN; sizes stay explicit in the kwargs
    arch, kwargs = timm_create_kwargs(BackboneConfig(arch="vit_large", ffn="swiglu"))
    assert arch == "vit_giant_patch14_reg4_dinov2" and kwargs["embed_dim"] == 1024 and kwargs["depth"] == 24
    with pytest.raises(ValueError, match="arch='custom' needs"):
        BackboneConfig(arch="custom", embed_dim=64)
    with pytest.raises(ValueError, match="fixed by arch"):
        BackboneConfig(arch="vit_small", depth=2)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        BackboneConfig(img_size=225)
    with pytest.raises(ValueError, match="arch="):
        BackboneConfig(arch="vit_huge")
    with pytest.raises(ValueError, match="ffn"):
        BackboneConfig(ffn="geglu")
    with pytest.raises(ValueError, match="drop_path_rate"):
        BackboneConfig(drop_path_rate=1.0)


def test_vit_small_matches_dinov2_shapes_with_uniform_drop_path():
    model = build_backbone(BackboneConfig(arch="vit_small", drop_path_rate=0.3))
    assert model.pos_embed.shape == (1, 256, 384)  # 224 / 14 = 16, registers + CLS carry no position
    assert model.reg_token.shape == (1, 4, 384) and model.num_classes == 0
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(21.63e6, rel=0.001)  # timm: 22.06M at 518 px
    assert {b.drop_path1.drop_prob for b in model.blocks} == {0.3}
    assert {b.drop_path2.drop_prob for b in model.blocks} == {0.3}
    assert all(b.attn.fused_attn for b in model.blocks)
    assert model.blocks[0].ls1.gamma.flatten()[0].item() == pytest.approx(1e-5)


@pytest.mark.parametrize("ffn,registers", [("mlp", 4), ("swiglu", 0)])
def test_timm_recreate_is_identical(ffn, registers):
    cfg = tiny_cfg(ffn=ffn, num_register_tokens=registers, embed_dim=96, num_heads=4)
    torch.manual_seed(0)
    ours = build_backbone(cfg).eval()
    arch, kwargs = timm_create_kwargs(cfg)
    json.dumps(kwargs)  # the export step stores them
    plain = timm.create_model(arch, **kwargs).eval()
    ours_sd, plain_sd = ours.state_dict(), plain.state_dict()
    assert {k: v.shape for k, v in ours_sd.items()} == {k: v.shape for k, v in plain_sd.items()}
    if ffn == "swiglu":
        hidden = (int(96 * 4 * 2 / 3) + 7) // 8 * 8
        assert plain_sd["blocks.0.mlp.fc1.weight"].shape == (2 * hidden, 96)
        assert plain_sd["blocks.0.mlp.fc2.weight"].shape == (96, hidden)
    plain.load_state_dict(ours_sd, strict=True)
    for px in (56, 28):  # dynamic image size survives the round trip
        x = torch.randn(2, 3, px, px)
        torch.testing.assert_close(plain(x), ours(x), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------- MaskedViT


def test_masked_vit_outputs_global_and_local_crops():
    model = tiny_model()
    g, loc = torch.randn(4, 3, 56, 56), torch.randn(6, 3, 28, 28)
    out = model.forward_crops(g, loc, torch.zeros(4, 16, dtype=torch.bool))
    assert out["global"]["cls"].shape == (4, 64)
    assert out["global"]["registers"].shape == (4, 4, 64)
    assert out["global"]["patch"].shape == (4, 16, 64)
    assert out["local"]["patch"].shape == (6, 4, 64)
    assert model.forward_crops(g, loc[:0])["local"] is None
    # without masks it is exactly the timm model
    torch.testing.assert_close(out["global"]["cls"], model.backbone(g), rtol=0, atol=0)
    feats = model.backbone.forward_features(loc)
    torch.testing.assert_close(out["local"]["patch"], feats[:, 5:], rtol=0, atol=0)
    with pytest.raises(ValueError, match="masks must be bool"):
        model(g, torch.zeros(4, 9, dtype=torch.bool))


def test_mask_token_replaces_patches_before_pos_embed():
    model = tiny_model()
    with torch.no_grad():
        model.mask_token.normal_()
    x = torch.randn(2, 3, 56, 56)
    masks = torch.zeros(2, 16, dtype=torch.bool)
    masks[:, [0, 5, 6, 15]] = True  # patch 5 = row 1, col 1 -> pixels [14:28, 14:28]
    base = model(x, masks)
    # pixels of a masked patch no longer reach any output
    x_masked_changed = x.clone()
    x_masked_changed[:, :, 14:28, 14:28] += 5.0
    changed = model(x_masked_changed, masks)
    for key in ("cls", "patch", "registers"):
        torch.testing.assert_close(changed[key], base[key], rtol=0, atol=0)
    # pixels of an unmasked patch (row 0, col 1) do
    x_unmasked_changed = x.clone()
    x_unmasked_changed[:, :, 0:14, 14:28] += 5.0
    assert not torch.allclose(model(x_unmasked_changed, masks)["cls"], base["cls"])
    assert not torch.allclose(model(x)["patch"][:, 5], base["patch"][:, 5])
    # every patch masked: tokens differ only through the position embedding added after the mask token
    out_all = model(x, torch.ones(2, 16, dtype=torch.bool))
    assert (out_all["patch"][0] - out_all["patch"][0, :1]).abs().amax(dim=-1)[1:].min() > 1e-3
    torch.testing.assert_close(out_all["patch"][0], out_all["patch"][1])  # image content is gone entirely


def test_gradients_reach_backbone_mask_token_and_heads():
    model = tiny_model().train()
    model.backbone.set_grad_checkpointing(True)
    head = DINOHead(64, n_prototypes=32, hidden_dim=48, bottleneck_dim=16)
    masks = torch.zeros(2, 16, dtype=torch.bool)
    masks[0, :6] = True
    out = model(torch.randn(2, 3, 56, 56), masks)
    loss = head(out["cls"]).logsumexp(-1).sum() + head(out["patch"][masks]).logsumexp(-1).sum()
    loss.backward()
    no_grad = [
        n
        for n, p in [*model.named_parameters(), *head.named_parameters()]
        if p.grad is None or not p.grad.abs().sum() > 0
    ]
    assert no_grad == []


def test_bf16_autocast_forward_with_masks_and_head():
    model = tiny_model().train()
    head = DINOHead(64, n_prototypes=32, hidden_dim=48, bottleneck_dim=16)
    masks = torch.zeros(2, 16, dtype=torch.bool)
    masks[:, 3:9] = True
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(2, 3, 56, 56), masks)
        logits = head(out["patch"][masks])
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()
    assert logits.shape == (12, 32)
    logits.float().logsumexp(-1).sum().backward()
    assert model.mask_token.grad is not None and torch.isfinite(model.mask_token.grad).all()


# ---------------------------------------------------------------------------------------------------------- init


def _dinov2_style(src: MaskedViT, chunked: bool = True) -> dict[str, torch.Tensor]:
    """Rewrite a timm state dict the way facebookresearch/dinov2 names it (CLS pos slot, register_tokens, ...)."""
    sd = {k: v.clone() for k, v in src.backbone.state_dict().items()}
    cls_pos = torch.randn(1, 1, sd["pos_embed"].shape[-1])
    out = {"mask_token": torch.zeros(1, 64)}
    if "reg_token" in sd:
        out["register_tokens"] = sd.pop("reg_token")
        out["cls_token"] = sd.pop("cls_token") - cls_pos
        out["pos_embed"] = torch.cat([cls_pos, sd.pop("pos_embed")], dim=1)
    for key, value in sd.items():
        if chunked and key.startswith("blocks."):
            index = int(key.split(".")[1])
            key = f"blocks.{index // 2}.{index}." + key.split(".", 2)[2]  # dinov2 FSDP chunks of 2 blocks
        out[key.replace("mlp.fc1", "mlp.w12").replace("mlp.fc2", "mlp.w3")] = value
    return out


@pytest.mark.parametrize("ffn", ["mlp", "swiglu"])
def test_init_from_dinov2_checkpoint_same_grid_is_exact(tmp_path, ffn):
    src = tiny_model(seed=1, ffn=ffn)
    sd = _dinov2_style(src)
    wrapped = {
        "model": {
            **{f"teacher.backbone.{k}": v for k, v in sd.items()},
            "teacher.dino_head.mlp.0.weight": torch.zeros(3, 3),
        },
        "iteration": 5,
    }
    path = tmp_path / "dinov2_train.pth"
    torch.save(wrapped, path)
    dst = tiny_model(seed=2, ffn=ffn)
    report = load_init_checkpoint(dst, path, strict=True)
    assert report.missing_keys == () and report.unexpected_keys == () and report.pos_embed_resized is None
    assert "mask_token" in report.ignored_keys and "teacher.dino_head.mlp.0.weight" in report.ignored_keys
    x = torch.randn(2, 3, 56, 56)
    torch.testing.assert_close(dst(x)["cls"], src(x)["cls"], rtol=1e-4, atol=1e-4)  # cls - pos + pos rounding


def test_init_resizes_pos_embed_from_other_grid(tmp_path):
    src = tiny_model(seed=1, img_size=70)  # 5 x 5 grid
    path = tmp_path / "dinov2.safetensors"
    save_file(_dinov2_style(src, chunked=False), str(path))
    dst = tiny_model(seed=2)  # 4 x 4 grid
    report = load_init_checkpoint(dst.backbone, path)
    assert report.pos_embed_resized == ((5, 5), (4, 4)) and report.missing_keys == ()
    expected = resample_abs_pos_embed(
        src.backbone.pos_embed.detach(), new_size=[4, 4], old_size=[5, 5], num_prefix_tokens=0
    )
    torch.testing.assert_close(dst.backbone.pos_embed.detach(), expected)
    torch.testing.assert_close(dst.backbone.cls_token, src.backbone.cls_token, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dst.backbone.blocks[1].attn.qkv.weight, src.backbone.blocks[1].attn.qkv.weight)
    # the resampled model behaves like the source model run at its own (dynamic) size on the same image
    x = torch.randn(1, 3, 56, 56)
    torch.testing.assert_close(dst(x)["cls"], src(x)["cls"], rtol=1e-4, atol=1e-4)


def test_init_reports_missing_and_rejects_wrong_shapes(tmp_path):
    src = tiny_model(seed=1, num_register_tokens=0)  # plain dinov2 layout: CLS slot in pos_embed, no registers
    path = tmp_path / "noreg.pth"
    torch.save({**src.backbone.state_dict(), "mask_token": torch.zeros(1, 64)}, path)
    exact = tiny_model(seed=3, num_register_tokens=0)
    assert load_init_checkpoint(exact, path, strict=True).missing_keys == ()
    x = torch.randn(2, 3, 56, 56)
    torch.testing.assert_close(exact(x)["cls"], src(x)["cls"], rtol=0, atol=0)

    # a MaskedViT state dict (timm layout with registers under "backbone.") loads exactly too
    reg_src = tiny_model(seed=4)
    torch.save(reg_src.state_dict(), tmp_path / "masked_vit.pth")
    reg_dst = tiny_model(seed=5)
    assert "mask_token" in load_init_checkpoint(reg_dst, tmp_path / "masked_vit.pth", strict=True).ignored_keys
    torch.testing.assert_close(reg_dst(x)["patch"], reg_src(x)["patch"], rtol=0, atol=0)

    with_registers = tiny_model(seed=3)
    report = load_init_checkpoint(with_registers, path)
    assert report.missing_keys == ("reg_token",) and "reg_token" in report.summary()
    # the CLS position slot was folded into the CLS token
    torch.testing.assert_close(
        with_registers.backbone.cls_token, src.backbone.cls_token + src.backbone.pos_embed[:, :1]
    )
    with pytest.raises(ValueError, match="reg_token"):
        load_init_checkpoint(tiny_model(seed=3), path, strict=True)
    with pytest.raises(ValueError, match="does not fit this backbone"):
        load_init_checkpoint(tiny_model(embed_dim=96), path)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_init_checkpoint(exact, tmp_path / "missing.pth")


# ---------------------------------------------------------------------------------------------------------- heads


def test_head_is_l2_normalised_with_unit_gain():
    torch.manual_seed(0)
    head = DINOHead(64, n_prototypes=50, hidden_dim=48, bottleneck_dim=16, trainable_gain=False)
    x = torch.randn(7, 64)
    z = head.bottleneck(x)
    torch.testing.assert_close(z.norm(dim=-1), torch.ones(7))
    logits = head(x)
    assert logits.shape == (7, 50) and logits.abs().max() <= 1.0 + 1e-6
    # the gain is fixed at 1: rescaling prototype rows leaves the logits unchanged
    with torch.no_grad():
        head.last_layer.weight.mul_(torch.rand(50, 1) * 10 + 0.1)
    torch.testing.assert_close(head(x), logits, rtol=1e-5, atol=1e-5)
    # ... and so does rescaling the MLP output (L2 norm before the prototypes)
    with torch.no_grad():
        head.mlp[-1].weight.mul_(4.0)
        head.mlp[-1].bias.mul_(4.0)
    torch.testing.assert_close(head(x), logits, rtol=1e-5, atol=1e-5)
    assert head.last_layer_parameters() == [head.last_layer.weight]
    assert [n for n, _ in head.named_parameters() if n.startswith("last_layer")] == ["last_layer.weight"]
    assert len([m for m in head.mlp if isinstance(m, torch.nn.Linear)]) == 3
    assert HeadConfig.for_arch("vit_giant") == HeadConfig(n_prototypes=131_072, bottleneck_dim=384)
    assert HeadConfig.for_arch("vit_small").n_prototypes == 65_536
    one_layer = DINOHead.from_config(64, HeadConfig(n_prototypes=10, bottleneck_dim=8, n_layers=1))
    assert one_layer(x).shape == (7, 10)


def test_trainable_gain_is_torch_weight_norm_as_dinov2():
    """Default head: prototype layer = weight_norm(Linear(bias=False)) with weight_g (starts at 1) trainable."""
    torch.manual_seed(0)
    head = DINOHead(64, n_prototypes=50, hidden_dim=48, bottleneck_dim=16)
    assert [n for n, _ in head.named_parameters() if n.startswith("last_layer")] == [
        "last_layer.weight",
        "last_layer.weight_g",
    ]
    assert head.last_layer.weight_g.shape == (50, 1) and torch.equal(head.last_layer.weight_g, torch.ones(50, 1))
    with torch.no_grad():
        head.last_layer.weight_g.mul_(torch.rand(50, 1) + 0.5)
    reference = torch.nn.utils.parametrizations.weight_norm(torch.nn.Linear(16, 50, bias=False))
    with torch.no_grad():
        reference.parametrizations.weight.original0.copy_(head.last_layer.weight_g)
        reference.parametrizations.weight.original1.copy_(head.last_layer.weight)
    z = head.bottleneck(torch.randn(7, 64))
    torch.testing.assert_close(head.last_layer(z), reference(z))
    head(torch.randn(3, 64)).sum().backward()
    assert head.last_layer.weight_g.grad is not None and head.last_layer.weight_g.grad.abs().sum() > 0


@pytest.mark.parametrize("with_gain", [True, False])
def test_normalize_rows_values_and_gradients_equal_autograd_through_f_normalize(with_gain):
    """The prototype layer's hand-written backward gives what autograd gives through F.normalize(W) * g, including
    a row whose norm is below eps (clamped: no gradient through the norm, as F.normalize)."""
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(9, 16, generator=g).mul_(torch.rand(9, 1, generator=g) * 5)
    weight[4] = torch.randn(16, generator=g) * 1e-14
    gain = (torch.rand(9, 1, generator=g) + 0.5) if with_gain else None
    grad_w = torch.randn(9, 16, generator=g)

    def run(fn):
        w = weight.clone().requires_grad_()
        g_ = gain.clone().requires_grad_() if with_gain else None
        out = fn(w, g_)
        out.backward(grad_w)
        return out.detach(), w.grad, (g_.grad if with_gain else None)

    ours = run(normalize_rows)
    ref = run(lambda w, g_: F.normalize(w, dim=1) * (g_ if g_ is not None else 1.0))
    for a, b in zip(ours, ref):
        if b is None:
            assert a is None
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------- FLOPs


@pytest.mark.parametrize(
    "arch,fwd_gflops,train_gflops",
    [("vit_small", 12.3, 166), ("vit_base", 46.3, 593), ("vit_large", 162, 2067), ("vit_giant", 599, 7565)],
)
def test_flops_match_published_dinov2_figures(arch, fwd_gflops, train_gflops):
    cfg = BackboneConfig(arch=arch, num_register_tokens=0)
    assert vit_forward_flops(cfg, 224) / 1e9 == pytest.approx(fwd_gflops, rel=0.01)
    assert dinov2_train_flops_per_image(cfg).total / 1e9 == pytest.approx(train_gflops, rel=0.01)
    # registers add tokens, hence FLOPs
    assert vit_forward_flops(BackboneConfig(arch=arch), 224) > vit_forward_flops(cfg, 224)


def test_plain_and_fused_attention_give_the_same_outputs():
    from pathdino.models.backbone import set_fused_attention

    torch.manual_seed(0)
    model = build_backbone(BackboneConfig(arch="custom", embed_dim=64, depth=2, num_heads=2, img_size=28))
    model.eval()
    x = torch.randn(2, 3, 28, 28)
    fused = model(x)
    set_fused_attention(model, False)
    assert not any(block.attn.fused_attn for block in model.blocks)
    torch.testing.assert_close(model(x), fused, atol=1e-5, rtol=1e-5)
