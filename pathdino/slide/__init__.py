"""Slide-level models over tile embeddings: the LongNet slide encoder (config, positions, attention, model)."""

from pathdino.slide.attention import DilatedAttention, PackedLayout, dilated_attention, pack_layout
from pathdino.slide.config import SlideEncoderConfig, slide_encoder_preset
from pathdino.slide.model import SlideBlock, SlideEncoder, SlideEncoderOutput, packed_row_major_order
from pathdino.slide.positions import PositionError, grid_positions, row_major_order, sincos_2d

__all__ = ["DilatedAttention", "PackedLayout", "PositionError", "SlideBlock", "SlideEncoder", "SlideEncoderConfig",
           "SlideEncoderOutput", "dilated_attention", "grid_positions", "pack_layout", "packed_row_major_order",
           "row_major_order", "sincos_2d", "slide_encoder_preset"]
