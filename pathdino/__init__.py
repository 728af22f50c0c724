"""pathdino: slide folders → Zarr tile stores → DINOv2 pretraining → timm tile encoders → slide embeddings.

Importing `pathdino` is cheap (no torch); heavy entry points are imported on first use.
"""

from tiling import __version__

__all__ = ["__version__", "load_encoder", "load_slide_encoder"]


def __getattr__(name: str):
    if name == "load_encoder":
        from pathdino.export.load import load_encoder

        return load_encoder
    if name == "load_slide_encoder":
        from pathdino.slide.export import load_slide_encoder

        return load_slide_encoder
    raise AttributeError(f"module 'pathdino' has no attribute {name!r}")
