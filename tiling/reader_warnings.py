"""Warnings of the imaging libraries (tifffile, tiffslide, pydicom, ...) kept with the slide they concern.

tifffile logs through `logging` (printed raw on stderr when the application configures no logging) and pydicom and
others use `warnings`. During tiling those lines would interleave with the progress bars and name no slide; instead
they are collected while a slide is planned or read and stored in its provenance or failure record
(`reader_warnings`), where `pathdino info --failures` shows them.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path
from typing import Iterator

LIBRARY_LOGGERS = ("tifffile", "tiffslide", "pydicom", "openslide", "imagecodecs", "PIL")
MAX_KEPT = 10  # distinct messages kept per slide; the rest are counted
_MAX_CHARS = 300


class _Collect(logging.Handler):
    def __init__(self, messages: list[str]):
        super().__init__(logging.WARNING)
        self.messages = messages

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):
            self.messages.append(f"{record.name}: {record.getMessage()}"[:_MAX_CHARS])


def _source(filename: str) -> str:
    """The package a warning came from ("pydicom" for .../site-packages/pydicom/valuerep.py): the same name its
    logger has, so a message both warned and logged (pydicom does both) is kept once."""
    parts = Path(filename).parts
    for marker in ("site-packages", "dist-packages"):
        if marker in parts and parts.index(marker) + 1 < len(parts):
            return Path(parts[parts.index(marker) + 1]).stem
    return Path(filename).stem


@contextlib.contextmanager
def collect_library_warnings() -> Iterator[list[str]]:
    """Collect warnings logged or warned by the imaging libraries inside the block into the yielded list (one
    line each) instead of printing them. Not thread-safe (warnings.catch_warnings): use it in one thread."""
    messages: list[str] = []
    handler = _Collect(messages)
    saved = []
    for name in LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        saved.append((logger, logger.propagate))
        logger.addHandler(handler)
        logger.propagate = False
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("default")
            # zarr's notice about variable-length bytes is ours to silence (tiling.store), not the slide's
            warnings.filterwarnings("ignore", message=".*does not have a Zarr V3 specification.*")
            try:
                yield messages
            finally:
                messages.extend(f"{_source(w.filename)}: {w.message}"[:_MAX_CHARS] for w in caught)
    finally:
        for logger, propagate in saved:
            logger.removeHandler(handler)
            logger.propagate = propagate


def summarise_warnings(messages: list[str]) -> list[str]:
    """Distinct messages in first-seen order, at most MAX_KEPT, plus a line counting the rest."""
    distinct = list(dict.fromkeys(messages))
    if len(distinct) <= MAX_KEPT:
        return distinct
    return distinct[:MAX_KEPT] + [f"... and {len(distinct) - MAX_KEPT} more distinct warning(s)"]
