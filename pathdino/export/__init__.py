"""Export a trained teacher backbone as a hub-ready timm encoder folder, and load such folders.

``export_checkpoint(checkpoint, out_dir)`` writes ``model.safetensors`` + ``config.json`` + ``README.md``;
``load_encoder(folder) -> (model, transform)`` reads them back with plain timm (also ``pathdino.load_encoder``).
"""

from pathdino.export.export import ExportOptions, ExportResult, export_backbone, export_checkpoint, verify_export
from pathdino.export.load import (
    EncoderFormatError,
    EncoderInfo,
    TileTransform,
    encoder_transform,
    load_encoder,
    read_encoder_config,
)
from pathdino.export.sample import export_untrained_encoder
from pathdino.export.source import ExportError, TrainingGeometry, resolve_checkpoint_dir

__all__ = [
    "EncoderFormatError",
    "EncoderInfo",
    "ExportError",
    "ExportOptions",
    "ExportResult",
    "TileTransform",
    "TrainingGeometry",
    "encoder_transform",
    "export_backbone",
    "export_checkpoint",
    "export_untrained_encoder",
    "load_encoder",
    "read_encoder_config",
    "resolve_checkpoint_dir",
    "verify_export",
]
