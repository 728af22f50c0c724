"""Slide-level models over tile embeddings: the LongNet slide encoder (config, positions, attention, model)."""

from pathdino.slide.attention import DilatedAttention, PackedLayout, dilated_attention, pack_layout
from pathdino.slide.export import (
    SlideEncoderFormatError,
    SlideEncoderInfo,
    TileEncoderMismatchError,
    check_tile_encoder,
    load_slide_encoder,
    read_slide_encoder_config,
    save_slide_encoder,
    tile_encoder_identity,
)
from pathdino.slide.config import SlideEncoderConfig, slide_encoder_preset
from pathdino.slide.model import SlideBlock, SlideEncoder, SlideEncoderOutput, packed_row_major_order
from pathdino.slide.positions import PositionError, grid_positions, row_major_order, sincos_2d

__all__ = [
    "DilatedAttention",
    "PackedLayout",
    "PositionError",
    "SlideBlock",
    "SlideEncoder",
    "SlideEncoderConfig",
    "SlideEncoderOutput",
    "SlideEncoderFormatError",
    "SlideEncoderInfo",
    "TileEncoderMismatchError",
    "check_tile_encoder",
    "load_slide_encoder",
    "read_slide_encoder_config",
    "save_slide_encoder",
    "tile_encoder_identity",
    "dilated_attention",
    "grid_positions",
    "pack_layout",
    "packed_row_major_order",
    "row_major_order",
    "sincos_2d",
    "slide_encoder_preset",
]
