"""Embed every tile of a tile store with an exported encoder, into a Zarr embeddings store (+ CLAM/TRIDENT h5).

Entry point: :func:`pathdino.embed.runner.embed_store` (one process, or one shard of many: ``python -m
pathdino.embed`` under a launcher); read the result with :class:`pathdino.embed.store.EmbeddingStore` (a mapping
``slide_id -> (features, coords)``), and who committed what with :func:`read_commits`.
"""

from pathdino.embed.runner import (
           EmbedOptions,
           EmbedReport,
           check_compatibility,
           embed_store,
           encode_tokens,
)
from pathdino.embed.store import EmbeddingStore, EmbedError, read_commits, write_h5

__all__ = ["EmbedError", "EmbedOptions", "EmbedReport", "EmbeddingStore", "check_compatibility", "embed_store",
           "encode_tokens", "read_commits", "write_h5"]
