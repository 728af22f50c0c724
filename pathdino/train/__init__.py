"""DINOv2 pretraining on tile stores: ``[accelerate launch ...] python -m pathdino.train --config ...``.

See docs/training.md. ``train`` (``pathdino.train.loop``), ``load_config`` (``pathdino.train.config``) and
``validate_config`` (``pathdino.train.validate``) are imported on first use, so importing this package stays cheap.
"""

from __future__ import annotations

from typing import Any

__all__ = ["load_config", "train", "validate_config"]


def __getattr__(name: str) -> Any:
    if name == "train":
        from pathdino.train.loop import train

        return train
    if name == "load_config":
        from pathdino.train.config import load_config

        return load_config
    if name == "validate_config":
        from pathdino.train.validate import validate_config

        return validate_config
    raise AttributeError(f"module 'pathdino.train' has no attribute {name!r}")
