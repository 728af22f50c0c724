"""DINO / iBOT projection heads: MLP -> bottleneck -> L2 norm -> weight-normalised prototypes.

The prototype layer is a plain ``[n_prototypes, bottleneck]`` parameter whose rows are L2-normalised in the
forward pass (``F.linear(x, F.normalize(W))``). That is exactly ``weight_norm`` with the gain fixed to 1, as DINOv2
uses it, but without parametrisation machinery: one ordinary parameter shards cleanly under FSDP2 (dim-0 sharding
of a plain tensor; no ``parametrizations.weight.original0/1`` pair, no frozen gain to keep in sync), traces
trivially under ``torch.compile``, and its state-dict key is just ``last_layer.weight``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from tiling.configio import ConfigError


@dataclass(frozen=True)
class HeadConfig:
    """Sizes of a DINO/iBOT head (DINOv2 defaults: 65,536 prototypes, bottleneck 256; L/g: 131,072 and 384).

    Attributes:
        n_prototypes: output logits (prototypes).
        hidden_dim: MLP hidden width (2,048).
        bottleneck_dim: MLP output width, L2-normalised before the prototype layer.
        n_layers: MLP linear layers (3), GELU between them.
    """

    n_prototypes: int = 65_536
    hidden_dim: int = 2_048
    bottleneck_dim: int = 256
    n_layers: int = 3

    def __post_init__(self) -> None:
        for name in ("n_prototypes", "hidden_dim", "bottleneck_dim", "n_layers"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"HeadConfig.{name}={getattr(self, name)} must be positive")

    @classmethod
    def for_arch(cls, arch: str, **overrides: int) -> "HeadConfig":
        """DINOv2's head sizes for a backbone arch name (larger heads for vit_large / vit_giant)."""
        base = cls(n_prototypes=131_072, bottleneck_dim=384) if arch in ("vit_large", "vit_giant") else cls()
        return replace(base, **overrides)


class NormalizedLinear(nn.Module):
    """Bias-free linear layer whose weight rows are unit-norm in the forward pass (weight norm, gain 1)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.trunc_normal_(self.weight, std=0.02)

    def normalized_weight(self) -> torch.Tensor:
        return F.normalize(self.weight, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.normalized_weight())


class DINOHead(nn.Module):
    """MLP (GELU) -> bottleneck -> L2 norm -> ``NormalizedLinear`` to prototypes; outputs logits [..., K].

    ``last_layer`` is the prototype layer; the trainer freezes it (``last_layer_parameters()``) for the first
    iterations as DINOv2 does.
    """

    def __init__(
        self,
        in_dim: int,
        n_prototypes: int = 65_536,
        hidden_dim: int = 2_048,
        bottleneck_dim: int = 256,
        n_layers: int = 3,
    ) -> None:
        super().__init__()
        HeadConfig(n_prototypes, hidden_dim, bottleneck_dim, n_layers)  # validates
        if n_layers == 1:
            layers: list[nn.Module] = [nn.Linear(in_dim, bottleneck_dim)]
        else:
            layers = [nn.Linear(in_dim, hidden_dim), nn.GELU()]
            for _ in range(n_layers - 2):
                layers += [nn.Linear(hidden_dim, hidden_dim), nn.GELU()]
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        self.last_layer = NormalizedLinear(bottleneck_dim, n_prototypes)
        self.in_dim, self.n_prototypes, self.bottleneck_dim = in_dim, n_prototypes, bottleneck_dim
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    @classmethod
    def from_config(cls, in_dim: int, cfg: HeadConfig) -> "DINOHead":
        return cls(in_dim, cfg.n_prototypes, cfg.hidden_dim, cfg.bottleneck_dim, cfg.n_layers)

    def last_layer_parameters(self) -> list[nn.Parameter]:
        """Parameters of the prototype layer (frozen by the trainer for the first iterations)."""
        return list(self.last_layer.parameters())

    def bottleneck(self, x: torch.Tensor) -> torch.Tensor:
        """The L2-normalised bottleneck features [..., bottleneck_dim]."""
        x = self.mlp(x)
        # fp32's default eps underflows in half precision; DINOv2 uses 1e-6 there.
        eps = 1e-6 if x.dtype in (torch.float16, torch.bfloat16) else 1e-12
        return F.normalize(x, dim=-1, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [..., n_prototypes]; each is a cosine similarity in [-1, 1] (temperature applied by the loss)."""
        return self.last_layer(self.bottleneck(x))
