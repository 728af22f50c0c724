"""The notebooks run top to bottom on CPU with tiny inputs (nbclient, python3 kernel) and draw their figures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pathdino.embed import h5_dir

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
NAMES = ("01_load_tile_encoder", "02_patch_features", "03_slide_embeddings", "04_slide_encoder")
SAMPLE_SLIDE = REPO / "pathdino" / "sample_data" / "CMU-1-Small-Region.svs"


@pytest.fixture(scope="module")
def notebook_dir(tmp_path_factory) -> Path:
    """What PATHDINO_NOTEBOOK_DIR names: tiles.zarr (56-px tiles of the sample slide) and encoder/ (tiny ViT)."""
    from pathdino.export import export_untrained_encoder
    from tiling.config import TilingConfig
    from tiling.inputs import collect_slides
    from tiling.runner import run_tiling

    root = tmp_path_factory.mktemp("notebooks")
    run_tiling(collect_slides([str(SAMPLE_SLIDE)]), str(root / "tiles.zarr"), TilingConfig(workers=1, tile_px=56))
    export_untrained_encoder(root / "encoder", tile_px=56)
    return root


def _execute(name: str, work: Path, cwd: Path, monkeypatch) -> dict:
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("PATHDINO_NOTEBOOK_DIR", str(work))
    monkeypatch.delenv("PATHDINO_ENCODER", raising=False)
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")  # figures as outputs
    book = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    # Every cell has finished (and written its files) when execute() returns: the kernel is then killed rather than
    # asked to shut down, which waits a second or more for nothing.
    NotebookClient(
        book,
        timeout=120,
        kernel_name="python3",
        resources={"metadata": {"path": str(cwd)}},
        shutdown_kernel="immediate",
    ).execute()
    return book


def _images(book) -> int:
    return sum(
        "image/png" in out.get("data", {})
        for cell in book.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
    )


@pytest.mark.parametrize("name", NAMES[1:])
def test_notebook_runs_on_given_inputs(name, notebook_dir, tmp_path, monkeypatch):
    book = _execute(name, notebook_dir, tmp_path, monkeypatch)
    assert _images(book) >= 1  # the figure was drawn
    if name == "03_slide_embeddings":
        assert (h5_dir(notebook_dir / "embeddings.zarr") / "CMU-1-Small-Region.h5").is_file()
        assert (notebook_dir / "abmil" / "attention.npz").is_file()
    if name == "04_slide_encoder":
        assert (notebook_dir / "slide_encoder" / "config.json").is_file()
        assert (notebook_dir / "slide_embeddings" / "slides" / "CMU-1-Small-Region.safetensors").is_file()


def test_notebook_builds_its_own_inputs_from_the_sample_slide(tmp_path, monkeypatch):
    """Without prepared inputs notebook 01 tiles the bundled slide and exports an untrained encoder itself."""
    work = tmp_path / "empty"
    book = _execute("01_load_tile_encoder", work, tmp_path, monkeypatch)
    assert _images(book) >= 1
    assert (work / "tiles.zarr" / "zarr.json").is_file() and (work / "encoder" / "model.safetensors").is_file()
    assert json.loads((work / "encoder" / "config.json").read_text())["pathdino"]["tile_px"] == 224


@pytest.mark.parametrize("name", NAMES)
def test_notebooks_are_committed_clean(name):
    """Outputs stripped (small diffs) and no machine paths baked in."""
    text = (NOTEBOOKS / f"{name}.ipynb").read_text()
    book = json.loads(text)
    assert all(
        not c.get("outputs") and c.get("execution_count") is None for c in book["cells"] if c["cell_type"] == "code"
    )
    for path in ("/work/", "/tmp/", "/home/", "C:\\\\"):
        assert path not in text
