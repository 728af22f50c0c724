"""Frozen-feature evaluation of tile encoders: kNN, linear probe, few-shot, label-free diagnostics.

Entry point: :func:`pathdino.eval.run.run_eval`; the random-weights baseline is
:func:`pathdino.eval.run.random_baseline_encoder` with :func:`pathdino.eval.run.eval_transform`.
"""

from pathdino.eval.datasets import TileDataset, TileDatasetSpec, TileRecord, load_tile_dataset
from pathdino.eval.features import ExtractedFeatures, extract_features
from pathdino.eval.run import EvalOptions, eval_transform, random_baseline_encoder, run_eval

__all__ = [
    "EvalOptions",
    "ExtractedFeatures",
    "TileDataset",
    "TileDatasetSpec",
    "TileRecord",
    "eval_transform",
    "extract_features",
    "load_tile_dataset",
    "random_baseline_encoder",
    "run_eval",
]
