"""Fixtures shared by several test files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SAMPLE_SLIDE = REPO / "pathdino" / "sample_data" / "CMU-1-Small-Region.svs"
SHARED_SLIDES = REPO.parent / "shared" / "data" / "slides"


@pytest.fixture
def shared_slides() -> Path:
    """../shared/data/slides (the reader-disagreement pyramids); tests using it skip where it is absent."""
    if not SHARED_SLIDES.is_dir():
        pytest.skip("shared data (../shared/data/slides) not available")
    return SHARED_SLIDES


@pytest.fixture(scope="module")
def one_thread():
    """Augmentation runs one thread per DataLoader worker; tests run it in-process, so match that (tiny ops and a
    busy second core make OpenMP's barriers cost milliseconds)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
