"""What `pathdino tile` tells the user: empty slides, non-brightfield slides, skipped files, help, the summary."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
from pydicom.uid import generate_uid

from tests.synthetic import write_pyramid
from tests.synthetic_dicom import write_dicom
from tiling.brightfield import check_metadata, check_pixels
from tiling.config import TilingConfig
from tiling.errors import NotBrightfieldError
from tiling.inputs import collect_slides
from tiling.pixel_qc import PixelQCConfig
from tiling.runner import SlideOutcome, run_tiling
from tiling.store import TileStore, summarise

SAMPLE = Path(__file__).parents[1] / "pathdino" / "sample_data" / "CMU-1-Small-Region.svs"
SHARED_TILES = Path(__file__).resolve().parents[2] / "shared" / "data" / "tiles"


def _pathdino(*args: str, columns: int = 80) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": str(columns), "NO_COLOR": "1", "TERM": "dumb"}
    return subprocess.run(
        [sys.executable, "-m", "pathdino.cli", *args], capture_output=True, text=True, env=env, timeout=240
    )


def _sample_pixels() -> np.ndarray:
    import openslide

    with openslide.OpenSlide(str(SAMPLE)) as s:
        return np.asarray(s.read_region((0, 0), 0, (1200, 1000)).convert("RGB"))


def _fluorescence_rgb(h: int = 1000, w: int = 1200) -> np.ndarray:
    """Dark background with bright blue nuclei and green cytoplasm: what a fluorescence composite looks like."""
    rng = np.random.default_rng(0)
    img = rng.integers(0, 12, (h, w, 3)).astype(np.uint8)
    for y, x in rng.integers(0, [h, w], (h * w // 4000, 2)):
        img[max(0, y - 6) : y + 6, max(0, x - 6) : x + 6, 2] = 230
        img[max(0, y - 12) : y + 12, max(0, x - 12) : x + 12, 1] = 90
    return img


def test_white_slide_is_empty_with_a_reason_and_fail_on_empty(tmp_path):
    (tmp_path / "slides").mkdir()
    blank = write_pyramid(
        tmp_path / "slides" / "blank.tif", np.full((900, 900, 3), 245, np.uint8), downsamples=(1,), mpp=0.5
    )
    write_pyramid(tmp_path / "slides" / "tissue.tif", _sample_pixels(), downsamples=(1,), mpp=0.5)
    url = tmp_path / "tiles.zarr"
    result = _pathdino("tile", str(blank.parent), "--out", str(url), "-j", "1", "--tile-px", "64")
    assert result.returncode == 0, result.stderr
    assert re.search(r"blank\s+empty\s+0\s+no tissue found", result.stderr), result.stderr
    assert "1 slide(s) gave no tiles" in result.stderr and "1 done, 1 empty" in result.stderr
    store = TileStore(url)
    assert summarise(store)["n_empty"] == 1 and store.n_tiles("tissue") > 0
    assert store.slide("blank").attrs["empty_reason"].startswith("no tissue found")
    info = _pathdino("info", str(url))
    assert "1 empty" in info.stdout and "no tissue found" in info.stdout
    # a rerun skips it but still says it is empty; --fail-on-empty makes it an error
    again = _pathdino("tile", str(blank), "--out", str(url), "-j", "1", "--tile-px", "64", "--fail-on-empty")
    assert again.returncode == 1 and "1 slide(s) gave no tiles" in again.stderr


def test_all_candidates_rejected_names_the_rule(tmp_path):
    path = write_pyramid(tmp_path / "t.tif", _sample_pixels(), downsamples=(1,), mpp=0.5)
    cfg = TilingConfig(workers=1, tile_px=64, pixel_qc=PixelQCConfig(blur_min_laplacian_var=1e9))
    [outcome] = run_tiling(collect_slides([str(path)]), str(tmp_path / "s.zarr"), cfg)
    assert outcome.status == "empty" and outcome.n_candidates > 0
    assert (
        outcome.reason == f"all {outcome.n_candidates} candidate tile(s) rejected: blur {outcome.rejected['blur']}"
        or outcome.reason.startswith(f"all {outcome.n_candidates} candidate tile(s) rejected: ")
    )
    assert "blur" in outcome.reason


def test_fluorescence_slides_fail_plainly_and_brightfield_passes(tmp_path):
    (tmp_path / "slides").mkdir()
    dark = write_pyramid(tmp_path / "slides" / "if-composite.tif", _fluorescence_rgb(), downsamples=(1,), mpp=0.5)
    qptiff = tmp_path / "slides" / "vectra.qptiff"
    with tifffile.TiffWriter(qptiff) as tif:
        for name in ("DAPI", "Opal 520", "Opal 690"):
            desc = (
                '<?xml version="1.0" encoding="utf-16"?><PerkinElmer-QPI-ImageDescription><ImageType>'
                f"FullResolution</ImageType><Name>{name}</Name></PerkinElmer-QPI-ImageDescription>"
            )
            tif.write(np.zeros((512, 512), np.uint8), tile=(256, 256), description=desc, metadata=None)
    ome = tmp_path / "slides" / "cycif.ome.tif"
    tifffile.imwrite(ome, np.zeros((5, 256, 256), np.uint8), ome=True, metadata={"axes": "CYX"})
    he = write_pyramid(tmp_path / "slides" / "he.tif", _sample_pixels(), downsamples=(1,), mpp=0.5)
    outcomes = {
        o.slide_id: o
        for o in run_tiling(
            collect_slides([str(tmp_path / "slides")]), str(tmp_path / "s.zarr"), TilingConfig(workers=1, tile_px=64)
        )
    }
    assert outcomes["he"].status == "done"
    for sid in ("if-composite", "vectra", "cycif"):
        assert outcomes[sid].status == "failed", outcomes[sid]
        assert outcomes[sid].reason.startswith("NotBrightfieldError:") and "not a brightfield" in outcomes[sid].reason
    assert "dark background" in outcomes["if-composite"].reason
    assert "DAPI, Opal 520, Opal 690" in outcomes["vectra"].reason
    assert "5 channels" in outcomes["cycif"].reason
    check_metadata(he)
    assert dark.exists()


def test_ihc_and_he_tiles_are_brightfield():
    """Tissue-filled tiles (no glass at all) of H&E and IHC, and an IHC-like DAB/haematoxylin image, pass."""
    rng = np.random.default_rng(1)
    dab = np.full((200, 200, 3), 235, np.uint8)
    dab[rng.random((200, 200)) < 0.3] = (140, 90, 50)  # brown DAB
    dab[rng.random((200, 200)) < 0.2] = (70, 80, 150)  # blue haematoxylin
    check_pixels(Path("ihc"), dab)
    check_pixels(Path("he"), _sample_pixels())
    tiles = sorted(SHARED_TILES.rglob("*.png")) + sorted(SHARED_TILES.rglob("*.tif"))
    if not tiles:
        pytest.skip("shared tiles not available")
    from PIL import Image

    for path in tiles:
        check_pixels(path, np.asarray(Image.open(path).convert("RGB")))
    with pytest.raises(NotBrightfieldError, match="dark background"):
        check_pixels(Path("if"), _fluorescence_rgb(200, 200))


def test_found_and_skipped_summary_and_dry_run(tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    write_pyramid(folder / "he.tif", _sample_pixels(), downsamples=(1,), mpp=0.5)
    write_dicom(folder / "a.dcm", generate_uid())
    series = generate_uid()
    write_dicom(folder / "label.dcm", series, image_type="LABEL")
    write_dicom(folder / "level0.dcm", series, width_px=512)
    (folder / "notes.txt").write_text("x")
    url = tmp_path / "tiles.zarr"
    result = _pathdino("tile", str(folder), "--out", str(url), "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "Found 3 slide(s): 2 dicom, 1 tiff" in result.stderr
    assert "Skipped 2 file(s): 1 a DICOM label image, 1 unknown extension" in result.stderr
    assert "label.dcm: a DICOM label image" in result.stderr
    for sid in ("he", "a"):
        assert re.search(rf"\b{sid}\b", result.stdout)
    assert not url.exists()  # a dry run writes nothing


def _options_without_default(command: str) -> tuple[int, list[str]]:
    text = _pathdino(command, "--help", columns=250).stdout
    blocks = re.split(r"\n(?=\s*│\s*(?:\*\s*)?--)", text)
    names = [
        (m.group(1), "[required]" in b or "[default:" in b)
        for b in blocks
        if (m := re.match(r"\s*│\s*(?:\*\s*)?(--[\w-]+)", b))
    ]
    return len(names), [n for n, ok in names if not ok and n != "--help"]


def test_help_shows_every_default_with_units():
    n_options, missing = _options_without_default("tile")
    assert n_options >= 15 and missing == [], missing
    text = _pathdino("tile", "--help", columns=250).stdout
    for expected in ("0.5 µm/px", "224 px", "0 px", "one per CPU core", "0.05, i.e. 5%", "jpeg", "90 on 1-100"):
        assert expected in text, expected
    assert " ." not in text  # the empty slot the issue saw


def test_summary_fits_80_columns_and_info_failures_has_the_full_message(tmp_path, monkeypatch):
    from rich.console import Console

    from pathdino.cli import tile as cli_tile

    buf = io.StringIO()
    monkeypatch.setattr(cli_tile, "console", Console(file=buf, width=80, color_system=None))
    long_path = "/data/" + "very-long-folder-name/" * 6 + "slide-with-a-long-name.svs"
    reason = (
        f"SlideOpenError: {long_path}: no backend could open it; openslide: Unsupported or missing image "
        "file; tiffslide: TiffFileError: not a TIFF file b'\\x00\\x00' [Errno 5] and more\ntraceback line"
    )
    outcomes = [
        SlideOutcome("a-slide-with-a-rather-long-identifier-indeed", long_path, "failed", reason=reason),
        SlideOutcome("ok", "x.svs", "done", n_tiles=1234, n_candidates=2000, rejected={"white": 700}),
        SlideOutcome("blank", "b.svs", "empty", reason="no tissue found: no grid cell reached ..."),
    ]
    cli_tile.print_summary(outcomes, 3.0)
    lines = buf.getvalue().splitlines()
    assert max(len(line) for line in lines) <= 80, "\n".join(lines)
    rows = [line for line in lines if " failed " in line]
    assert len(rows) == 1 and "SlideOpenError: no backend could open it" in rows[0], rows
    assert "1 slide(s) gave no tiles" in buf.getvalue()

    url = tmp_path / "tiles.zarr"
    broken = tmp_path / "broken.svs"
    broken.write_bytes(b"not a slide at all" * 10)
    run_tiling(collect_slides([str(broken)]), str(url), TilingConfig(workers=1))
    full = _pathdino("info", str(url), "--failures", columns=200)
    brief = _pathdino("info", str(url))
    message = TileStore(url).failures["broken"]["reason"]
    assert message in full.stdout.replace("\n", "") or message.split(";")[0] in full.stdout
    assert "Traceback" in full.stdout and "Traceback" not in brief.stdout
    assert json.loads(_pathdino("info", str(url), "--json").stdout)["n_failures"] == 1


def test_each_slide_file_is_fingerprinted_once_per_run(tmp_path, monkeypatch):
    import tiling.runner
    import tiling.worker

    calls: list[str] = []
    real = tiling.worker.fingerprint

    def counting(path):
        calls.append(Path(path).name)
        return real(path)

    monkeypatch.setattr(tiling.worker, "fingerprint", counting)
    monkeypatch.setattr(tiling.runner, "fingerprint", counting)
    path = write_pyramid(tmp_path / "t.tif", _sample_pixels(), downsamples=(1,), mpp=0.5)
    url = str(tmp_path / "s.zarr")
    for cfg, expected in (
        (TilingConfig(workers=1, tile_px=64), "done"),  # fresh: the planner fingerprints
        (TilingConfig(workers=1, tile_px=64), "skipped"),  # resume check only
        (TilingConfig(workers=1, tile_px=96), "done"),
    ):  # resume check, handed to the planner
        calls.clear()
        [outcome] = run_tiling(collect_slides([str(path)]), url, cfg)
        assert outcome.status == expected and calls == ["t.tif"], (expected, calls)


def test_mixed_folder_with_dicom_slides_tiles_every_slide(tmp_path):
    """Two single-file DICOM WSIs beside a TIFF: three slides tiled; the blank DICOM is reported empty."""
    from tests.synthetic_dicom import write_dicom_wsi

    folder = tmp_path / "mixed"
    folder.mkdir()
    tissue = _sample_pixels()
    write_pyramid(folder / "he.tif", tissue, downsamples=(1,), mpp=0.5)
    write_dicom_wsi(folder / "dicom-tissue.dcm", tissue)
    write_dicom_wsi(folder / "dicom-blank.dcm", np.full((300, 300, 3), 243, np.uint8))
    url = tmp_path / "tiles.zarr"
    result = _pathdino("tile", str(folder), "--out", str(url), "-j", "1", "--tile-px", "64", "--fail-on-empty")
    assert "Found 3 slide(s): 2 dicom, 1 tiff" in result.stderr
    assert result.returncode == 1 and "1 slide(s) gave no tiles" in result.stderr, result.stderr
    store = TileStore(url)
    assert store.slide_ids == ["dicom-blank", "dicom-tissue", "he"] and store.failures == {}
    assert store.n_tiles("dicom-tissue") == store.n_tiles("he") > 0 and store.n_tiles("dicom-blank") == 0
    np.testing.assert_array_equal(store.slide("dicom-tissue").coords, store.slide("he").coords)


def test_the_cli_starts_without_importing_the_tiler():
    """Help defaults come from TilingConfig only when help is shown: `pathdino embed ...` does not pay for skimage."""
    code = "import sys, pathdino.cli; print(sorted(m for m in sys.modules if m.startswith(('tiling.', 'skimage'))))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"  # the bare `tiling` package (its version) is cheap and allowed


class _NamedChannelsReader:
    """A real reader of the bundled slide whose properties also name channels, as a multiplex scanner writes them."""

    def __init__(self, inner, channel_names: dict[str, str]):
        self._inner, self._names = inner, channel_names

    def __getattr__(self, name):
        return getattr(self._inner, name)

    @property
    def properties(self):
        return {**self._inner.properties, **self._names}


@pytest.mark.parametrize(
    "names",
    [
        {"vendor.channel.name": "DAPI"},
        {"scan.Channel.1.Fluor": "Alexa Fluor 488"},
        {"mplex.channel.2.Biomarker": "Opal 570"},
    ],
)
def test_reader_properties_naming_fluorophores_are_refused(monkeypatch, names):
    """Pixels and TIFF headers look brightfield (the bundled H&E); only the reader's properties say fluorescence."""
    import tiling.worker as worker
    from tiling.inputs import SlideInput

    real_open = worker.open_slide
    shown = dict(names)

    def fake_open(path, backend="auto", **kwargs):
        return _NamedChannelsReader(real_open(path, backend, **kwargs), shown)

    monkeypatch.setattr(worker, "open_slide", fake_open)
    cfg = TilingConfig(target_mpp=1.0, tile_px=224)
    with pytest.raises(NotBrightfieldError, match="fluorescence: channels named " + next(iter(names.values()))):
        worker.plan_slide(SlideInput(SAMPLE, "cmu"), cfg)
    shown.update({key: "Brightfield RGB" for key in names})  # the same reader with brightfield channel names
    assert worker.plan_slide(SlideInput(SAMPLE, "cmu"), cfg).slide.slide_id == "cmu"


def test_a_multi_file_dicom_series_tiles_like_its_tiff_twin(tmp_path):
    """Two levels of one DICOM series in two files (level 1: 2x box-downsampled, at 1 µm/px) and the same pyramid
    as an uncompressed TIFF: tiled at 1 µm/px, both read level 1, and give the same tiles, pixel for pixel."""
    from pydicom.uid import generate_uid

    from tests.synthetic import box_downsample
    from tests.synthetic_dicom import write_dicom_wsi

    tissue = _sample_pixels()[:1024, :1024]
    folder = tmp_path / "in"
    series = dict(
        series_uid=generate_uid(), study_uid=generate_uid(), frame_of_reference_uid=generate_uid(), container="case-7"
    )
    write_dicom_wsi(folder / "case-7" / "level-0.dcm", tissue, mpp=0.5, tile_px=128, **series)
    write_dicom_wsi(folder / "case-7" / "level-1.dcm", box_downsample(tissue, 2), mpp=1.0, tile_px=128, **series)
    write_pyramid(folder / "twin.tif", tissue, downsamples=(1, 2), mpp=0.5, tile=128, compression=None)
    url = tmp_path / "tiles.zarr"
    result = _pathdino("tile", str(folder), "--out", str(url), "-j", "1", "--tile-px", "64", "--target-mpp", "1.0")
    assert result.returncode == 0, result.stderr
    assert "Found 2 slide(s): 1 dicom, 1 tiff" in result.stderr, result.stderr
    store = TileStore(url)
    assert store.slide_ids == ["case-7", "twin"] and store.failures == {}
    dicom, tiff = store.slide("case-7"), store.slide("twin")
    assert dicom.n_tiles == tiff.n_tiles > 4
    np.testing.assert_array_equal(dicom.coords, tiff.coords)
    for sid in ("case-7", "twin"):  # level 1 was read: from the series' second file for the DICOM
        assert store.slide_attrs(sid)["read_level"] == 1 and store.slide_attrs(sid)["read_downsample"] == 2.0
    assert dicom.read_encoded(0, dicom.n_tiles) == tiff.read_encoded(0, tiff.n_tiles)
