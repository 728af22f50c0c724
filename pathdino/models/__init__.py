"""timm ViT backbone (+ iBOT mask token) and DINO/iBOT heads; imports torch and timm."""

from pathdino.models.backbone import BackboneConfig, MaskedViT, build_backbone, timm_create_kwargs
from pathdino.models.init_checkpoint import InitReport, load_init_checkpoint
from pathdino.models.flops import TrainFlops, dinov2_train_flops_per_image, head_flops_per_token, vit_forward_flops
from pathdino.models.heads import DINOHead, HeadConfig, NormalizedLinear

__all__ = [
    "BackboneConfig",
    "DINOHead",
    "HeadConfig",
    "InitReport",
    "MaskedViT",
    "NormalizedLinear",
    "TrainFlops",
    "build_backbone",
    "dinov2_train_flops_per_image",
    "head_flops_per_token",
    "load_init_checkpoint",
    "timm_create_kwargs",
    "vit_forward_flops",
]
