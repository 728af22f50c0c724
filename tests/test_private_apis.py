"""Pins every private API of a dependency that pathdino still uses, so an upgrade that changes one fails here, loudly,
rather than silently in training. Public names are used wherever they exist (timm.models.checkpoint_seq,
timm.models.PretrainedCfg); pyproject.toml bounds timm below its next minor release.

- timm ``VisionTransformer._pos_embed`` (pathdino/models/backbone.py, MaskedViT.forward): adds the position
  embedding and the class/register tokens to patch tokens that iBOT masking has edited.
- torch ``DataLoader._iterator`` and ``_shutdown_workers()`` (pathdino/data/loader.py, TrainLoader.close): stop a
  persistent loader's worker processes now rather than at garbage collection.
"""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from pathdino.models import BackboneConfig, MaskedViT, build_backbone


def _tiny() -> MaskedViT:
    cfg = BackboneConfig(arch="custom", embed_dim=64, depth=2, num_heads=4, img_size=56, num_register_tokens=2)
    return MaskedViT(build_backbone(cfg)).eval()


def test_timm_pos_embed_is_what_masked_vit_relies_on():
    model = _tiny()
    bb = model.backbone
    assert list(inspect.signature(bb._pos_embed).parameters) == ["x"]
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        patches = bb.patch_embed(x)
        tokens = bb._pos_embed(patches)
        # class + registers first, then the patches, each patch with its position embedding added
        assert tokens.shape == (2, 1 + 2 + 16, 64)
        ours = model(x)
        theirs = bb.forward_features(x)
    torch.testing.assert_close(ours["cls"], theirs[:, 0], rtol=0, atol=0)
    torch.testing.assert_close(ours["patch"], theirs[:, 3:], rtol=0, atol=0)


def test_timm_public_names_exist():
    from timm.models import PretrainedCfg, checkpoint_seq

    assert callable(checkpoint_seq) and "mean" in {f.name for f in dataclasses.fields(PretrainedCfg)}
    model = _tiny().train()
    model.backbone.set_grad_checkpointing(True)
    x = torch.randn(2, 3, 56, 56)
    torch.manual_seed(0)
    with_ckpt = model(x)["cls"]
    model.backbone.set_grad_checkpointing(False)
    torch.manual_seed(0)
    torch.testing.assert_close(with_ckpt, model(x)["cls"])


class _Numbers(Dataset):
    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> int:
        return i


@pytest.mark.timeout(120)
def test_dataloader_shutdown_workers_stops_persistent_workers():
    loader = DataLoader(
        _Numbers(), batch_size=2, num_workers=1, persistent_workers=True, multiprocessing_context="fork"
    )
    assert sum(len(b) for b in loader) == 8
    iterator = loader._iterator
    assert iterator is not None and callable(iterator._shutdown_workers)
    workers = list(iterator._workers)
    assert workers and all(w.is_alive() for w in workers)
    iterator._shutdown_workers()
    for w in workers:
        w.join(timeout=30)
    assert not any(w.is_alive() for w in workers)


def test_cpu_flash_attention_ops_the_slide_encoder_uses():
    """pathdino.slide.attention runs segments through torch's fused CPU flash kernel for its log-sum-exp (falls back
    to plain matmuls without it); tests/test_slide_encoder.py checks values and gradients through it."""
    import torch

    q = torch.randn(1, 1, 4, 8)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, q, q, 0.0, False)[:2]
    assert out.shape == q.shape and lse.shape == (1, 1, 4)
    assert hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward")
