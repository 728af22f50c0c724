"""DINOv2 objectives: DINO CLS loss, iBOT masked-patch loss, KoLeo / KDE uniformity; imports torch."""

from pathdino.losses.dino import DINOLoss, PrototypeTargets, all_reduce_, sinkhorn_knopp
from pathdino.losses.distill import cosine_distance
from pathdino.losses.gram import gram_loss, resample_patch_grid
from pathdino.losses.ibot import IBOTPatchLoss, gather_masked_tokens, masked_token_weights
from pathdino.losses.koleo import (
    DEFAULT_WEIGHTS,
    KDELoss,
    KoLeoLoss,
    build_uniformity_loss,
    kde_loss,
    koleo_loss,
)

__all__ = [
    "cosine_distance",
    "DEFAULT_WEIGHTS",
    "DINOLoss",
    "IBOTPatchLoss",
    "KDELoss",
    "KoLeoLoss",
    "PrototypeTargets",
    "all_reduce_",
    "build_uniformity_loss",
    "gather_masked_tokens",
    "gram_loss",
    "kde_loss",
    "koleo_loss",
    "masked_token_weights",
    "resample_patch_grid",
    "sinkhorn_knopp",
]
