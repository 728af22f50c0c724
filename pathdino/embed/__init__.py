"""Embed every tile of a tile store with an exported encoder, into a Zarr embeddings store (+ CLAM/TRIDENT h5).

Entry point: :func:`pathdino.embed.runner.embed_store`; read the result with
:class:`pathdino.embed.store.EmbeddingStore` (a mapping ``slide_id -> (features, coords)``).
"""

from pathdino.embed.runner import (
           EmbedOptions,
           EmbedReport,
           check_compatibility,
           embed_store,
           encode_tokens,
)
from pathdino.embed.store import EmbeddingStore, EmbedError, write_h5

__all__ = ["EmbedError", "EmbedOptions", "EmbedReport", "EmbeddingStore", "check_compatibility", "embed_store",
           "encode_tokens", "write_h5"]
