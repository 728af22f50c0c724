"""DINOv2 pretraining on tile stores: ``[accelerate launch ...] python -m pathdino.train --config ...``.

See docs/training.md. ``train`` (``pathdino.train.loop``) and ``load_config`` (``pathdino.train.config``) are
imported on first use, so importing this package stays cheap.
"""

from __future__ import annotations

from typing import Any

__all__ = ["load_config", "train", "validate_config"]


def __getattr__(name: str) -> Any:
    if name == "train":
        from pathdino.train.loop import train

        return train
    if name in ("load_config", "validate_config"):
        from pathdino.train import config

        return getattr(config, name)
    raise AttributeError(f"module 'pathdino.train' has no attribute {name!r}")
