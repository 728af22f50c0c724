"""A tile as an encoder's input: ``TileTransform``, the one preprocessing of every frozen-encoder use.

``pathdino embed`` and ``pathdino eval`` (through ``pathdino.export.load_encoder``) and the in-training probe
(``pathdino.train.probe``) all turn tiles into model inputs with it, so a probe score during training is computed on
the same input values a user's evaluation of the exported encoder sees.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class TileTransform:
    """Tile → normalised model input: the preprocessing the encoder was trained with, as a picklable callable.

    ``transform(image)`` takes a PIL image, an RGB uint8 array (H, W, 3) or a uint8 tensor (H, W, 3) and returns a
    float32 tensor (3, input_px, input_px). Square tiles are resized to ``input_px`` (bicubic, antialiased) when
    their side differs; other images have their shorter side resized, then are centre-cropped (timm's
    ``crop_pct=1.0``). ``batch(uint8 [B, H, W, 3])`` does the same on a batch, on the batch's device (the embedding
    runner normalises on the GPU).
    """

    input_px: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __call__(self, image: Any):
        import numpy as np
        import torch

        if isinstance(image, torch.Tensor):
            array = image
        else:
            if hasattr(image, "convert"):  # PIL
                image = image.convert("RGB")
            array = torch.from_numpy(np.array(image, dtype=np.uint8, copy=True))
        if array.ndim != 3 or array.shape[-1] != 3:
            raise ValueError(f"TileTransform expects an RGB image (H, W, 3), got shape {tuple(array.shape)}")
        return self.batch(array[None])[0]

    def batch(self, tiles):
        """uint8 [B, H, W, 3] (any device) → float32 [B, 3, input_px, input_px], normalised."""
        import torch
        import torch.nn.functional as F

        if tiles.dtype != torch.uint8 or tiles.ndim != 4 or tiles.shape[-1] != 3:
            raise ValueError(f"TileTransform.batch expects uint8 [B, H, W, 3], got {tiles.dtype} {tuple(tiles.shape)}")
        x = tiles.permute(0, 3, 1, 2).float().div_(255.0)
        h, w = x.shape[-2:]
        if (h, w) != (self.input_px, self.input_px):
            scale = self.input_px / min(h, w)
            size = (max(self.input_px, round(h * scale)), max(self.input_px, round(w * scale)))
            x = F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False).clamp_(0.0, 1.0)
            top, left = (size[0] - self.input_px) // 2, (size[1] - self.input_px) // 2
            x = x[..., top : top + self.input_px, left : left + self.input_px]
        mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        return x.sub_(mean).div_(std).contiguous()
