"""Embed every tile of a tile store with an exported encoder, into a Zarr embeddings store (+ CLAM/TRIDENT h5).

Entry point: :func:`pathdino.embed.runner.embed_store` (one process, or one shard of many: ``python -m
pathdino.embed`` under a launcher); read the result with :class:`pathdino.embed.store.EmbeddingStore` (a mapping
``slide_id -> (features, coords)``), who committed what with :func:`read_commits`, the h5 files in :func:`h5_dir`.
"""

from pathdino.embed.runner import (
    EmbedOptions,
    EmbedReport,
    check_compatibility,
    embed_store,
    encode_tokens,
)
from pathdino.embed.store import EmbeddingStore, EmbedError, h5_dir, read_commits, work_files, write_h5

__all__ = [
    "EmbedError",
    "EmbedOptions",
    "EmbedReport",
    "EmbeddingStore",
    "check_compatibility",
    "embed_store",
    "encode_tokens",
    "h5_dir",
    "read_commits",
    "work_files",
    "write_h5",
]
