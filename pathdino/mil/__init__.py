"""Slide-level multiple-instance learning on tile embeddings (gated-attention ABMIL)."""

from pathdino.mil.abmil import ABMIL, ABMILOutput
from pathdino.mil.train import (
    H5FeatureReader,
    MILConfig,
    MILResult,
    SlideTable,
    load_abmil,
    load_attention,
    read_slide_labels,
    train_abmil,
    write_h5_features,
)

__all__ = [
    "ABMIL",
    "ABMILOutput",
    "H5FeatureReader",
    "MILConfig",
    "MILResult",
    "SlideTable",
    "load_abmil",
    "load_attention",
    "read_slide_labels",
    "train_abmil",
    "write_h5_features",
]
