"""Slide readers (backend choice, pixels, edges, errors) and the mpp chain."""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from synthetic import corrupt_source_tile, texture_image, write_pyramid  # noqa: E402

from tiling.errors import MppError, RegionReadError, SlideOpenError  # noqa: E402
from tiling.mpp import MppResult, resolve_mpp  # noqa: E402
from tiling.readers import SlideReader, open_slide, rgba_to_rgb_white  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CMU_SVS = REPO / "pathdino" / "sample_data" / "CMU-1-Small-Region.svs"
EDGE = REPO / "tests" / "data" / "slides"


@pytest.fixture(scope="module")
def raw_pyramid(tmp_path_factory) -> Path:
    """Uncompressed, levels as top-level IFDs, Aperio description with MPP: both backends see the same pixels."""
    path = tmp_path_factory.mktemp("slides") / "raw.tif"
    return write_pyramid(path, texture_image(640, 480), downsamples=(1, 2, 4), mpp=0.25, tile=128, compression=None)


# --- backend choice -------------------------------------------------------------------------------------------


def test_svs_opens_with_openslide_and_reads_rgb():
    reader = open_slide(CMU_SVS)
    try:
        assert isinstance(reader, SlideReader)
        assert reader.backend == "openslide" and "openslide" in reader.backend_version
        assert reader.level_dimensions == ((2220, 2967),)
        region = reader.read_region(0, 1000, 1200, 64, 48)
        assert region.shape == (48, 64, 3) and region.dtype == np.uint8
        assert region.std() > 5  # tissue, not a blank fill
    finally:
        reader.close()


def test_subifd_pyramid_goes_to_tiffslide(tmp_path):
    path = write_pyramid(
        tmp_path / "ome_like.tif",
        texture_image(512, 512),
        description_style="none",
        resolution_tags=True,
        layout="subifds",
    )
    reader = open_slide(path)
    assert reader.backend == "tiffslide"
    assert len(reader.level_dimensions) == 3
    assert reader.level_downsamples == (1.0, 2.0, 4.0)
    # OpenSlide alone sees a single level of the same file.
    forced = open_slide(path, "openslide")
    assert len(forced.level_dimensions) == 1
    reader.close()
    forced.close()


def test_top_level_ifd_pyramid_tie_goes_to_openslide(raw_pyramid):
    reader = open_slide(raw_pyramid)
    assert reader.backend == "openslide" and len(reader.level_dimensions) == 3
    reader.close()


def test_shared_ome_and_pyramid_tiff(shared_slides):
    ome = open_slide(shared_slides / "CMU-1-Small-Region.pyramid.ome.tif")
    assert ome.backend == "tiffslide" and len(ome.level_dimensions) == 4
    flat = open_slide(shared_slides / "CMU-1-Small-Region.pyramid-jpeg.tif")
    assert flat.backend == "openslide" and len(flat.level_dimensions) == 4
    ome.close()
    flat.close()


@pytest.mark.parametrize("name", ["unopenable.tiff", "broken.svs", "unreadable.svs"])
def test_unusable_files_raise_slide_open_error_with_both_reasons(name, tmp_path):
    path = shutil.copy(EDGE / name, tmp_path / name)
    with pytest.raises(SlideOpenError) as info:
        open_slide(path)
    message = str(info.value)
    assert name in message and "openslide:" in message and "tiffslide:" in message


def test_missing_file_and_bad_backend_name(tmp_path):
    with pytest.raises(SlideOpenError, match="does not exist"):
        open_slide(tmp_path / "nope.svs")
    with pytest.raises(ValueError, match="unknown slide backend"):
        open_slide(CMU_SVS, "bioformats")  # type: ignore[arg-type]


def test_explicit_backend_failure_names_backend(tmp_path):
    path = shutil.copy(EDGE / "unopenable.tiff", tmp_path / "unopenable.tiff")
    with pytest.raises(SlideOpenError, match="openslide cannot open"):
        open_slide(path, "openslide")


# --- pixels --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("level", [0, 1, 2])
def test_backends_return_identical_pixels(raw_pyramid, level):
    a, b = open_slide(raw_pyramid, "openslide"), open_slide(raw_pyramid, "tiffslide")
    assert a.level_dimensions == b.level_dimensions
    region_a = a.read_region(level, 13, 7, 90, 70)
    region_b = b.read_region(level, 13, 7, 90, 70)
    np.testing.assert_array_equal(region_a, region_b)
    a.close()
    b.close()


@pytest.mark.parametrize("backend", ["openslide", "tiffslide"])
def test_regions_past_the_edge_are_white(raw_pyramid, backend):
    reader = open_slide(raw_pyramid, backend)
    width, height = reader.level_dimensions[1]
    region = reader.read_region(1, width - 10, -5, 30, 20)
    assert region.shape == (20, 30, 3)
    assert (region[:, 10:] == 255).all() and (region[:5] == 255).all()
    inside = reader.read_region(1, width - 10, 0, 10, 15)
    np.testing.assert_array_equal(region[5:, :10], inside)
    assert (reader.read_region(1, width + 100, 0, 8, 8) == 255).all()
    reader.close()


def test_rgba_composites_on_white():
    rgba = np.array([[[10, 20, 30, 255], [200, 100, 0, 0], [100, 100, 100, 128]]], np.uint8)
    rgb = rgba_to_rgb_white(rgba)
    assert rgb.dtype == np.uint8 and rgb.shape == (1, 3, 3)
    assert rgb[0, 0].tolist() == [10, 20, 30]
    assert rgb[0, 1].tolist() == [255, 255, 255]
    assert rgb[0, 2].tolist() == [177, 177, 177]  # 100*128/255 + 127


@pytest.mark.parametrize("backend", ["openslide", "tiffslide"])
def test_read_error_is_region_error_and_reader_keeps_working(tmp_path, backend):
    path = write_pyramid(
        tmp_path / "bad.tif",
        texture_image(512, 512),
        downsamples=(1,),
        mpp=0.5,
        description_style="none",
        resolution_tags=True,
    )
    corrupt_source_tile(path, 0, 3)  # bottom-right 256-px tile
    reader = open_slide(path, backend)
    with pytest.raises(RegionReadError, match="bad.tif"):
        reader.read_region(0, 300, 300, 50, 50)
    # OpenSlide handles break after an error; the reader must reopen so other regions still read.
    assert reader.read_region(0, 0, 0, 50, 50).shape == (50, 50, 3)
    reader.close()


def test_tiffslide_properties_are_strings(raw_pyramid):
    reader = open_slide(raw_pyramid, "tiffslide")
    assert all(isinstance(v, str) for v in reader.properties.values())
    assert float(reader.properties["tiffslide.mpp-x"]) == 0.25
    reader.close()


# --- mpp chain -----------------------------------------------------------------------------------------------


@dataclass
class FakeReader:
    """Just what resolve_mpp looks at."""

    properties: dict[str, str]
    path: Path = Path("/nonexistent/fake.svs")
    backend: str = "openslide"
    backend_version: str = "fake"
    level_dimensions: tuple = ((1000, 1000),)
    level_downsamples: tuple = (1.0,)
    extra: dict = field(default_factory=dict)


@pytest.mark.parametrize(
    "props, expected",
    [
        (
            {"openslide.mpp-x": "0.25", "openslide.mpp-y": "0.25", "aperio.MPP": "0.5"},
            MppResult(0.25, "openslide.mpp-x"),
        ),
        ({"aperio.MPP": "0.4990", "tiffslide.mpp-x": "0.3"}, MppResult(0.499, "aperio.MPP")),
        ({"openslide.mirax.MPP": "0.243"}, MppResult(0.243, "openslide.mirax.MPP")),
        (
            {"hamamatsu.XResolution": "40000", "hamamatsu.ResolutionUnit": "centimeter"},
            MppResult(0.25, "hamamatsu.XResolution"),
        ),
        ({"hamamatsu.XResolution": "101600", "tiff.ResolutionUnit": "inch"}, MppResult(0.25, "hamamatsu.XResolution")),
        ({"tiffslide.mpp-x": "0.5", "tiffslide.mpp-y": "0.5"}, MppResult(0.5, "tiffslide.mpp-x")),
        ({"aperio.MPP": "n/a", "tiffslide.mpp-x": "0.5"}, MppResult(0.5, "tiffslide.mpp-x")),
    ],
)
def test_mpp_chain_order(props, expected):
    assert resolve_mpp(FakeReader(props), None) == expected


def test_mpp_from_tiff_resolution_tags(tmp_path):
    path = write_pyramid(
        tmp_path / "res.tif",
        texture_image(256, 256),
        downsamples=(1,),
        mpp=0.5,
        description_style="none",
        resolution_tags=True,
    )
    assert resolve_mpp(FakeReader({}, path=path), None) == MppResult(0.5, "tiff.XResolution")


def test_override_wins_even_over_bad_metadata():
    reader = open_slide(EDGE / "boxes.tiff")
    assert resolve_mpp(reader, 0.25) == MppResult(0.25, "override")
    reader.close()


def test_implausible_mpp_names_value_source_and_flag():
    reader = open_slide(EDGE / "boxes.tiff")
    with pytest.raises(MppError) as info:
        resolve_mpp(reader, None)
    message = str(info.value)
    assert "boxes.tiff" in message and "352.7" in message and "openslide.mpp-x" in message
    assert "--slide-mpp" in message and "manifest" in message
    reader.close()


def test_missing_mpp_is_an_error_not_a_default(tmp_path):
    path = write_pyramid(
        tmp_path / "nompp.tif", texture_image(256, 256), downsamples=(1,), mpp=None, description_style="none"
    )
    reader = open_slide(path)
    with pytest.raises(MppError, match="--slide-mpp") as info:
        resolve_mpp(reader, None)
    assert "nompp.tif" in str(info.value)
    reader.close()


def test_resolution_without_physical_unit_is_not_used():
    with pytest.raises(MppError, match="no physical resolution unit"):
        resolve_mpp(FakeReader({"hamamatsu.XResolution": "40000"}), None)


def test_anisotropic_pixels_are_an_error():
    with pytest.raises(MppError, match="anisotropic"):
        resolve_mpp(FakeReader({"openslide.mpp-x": "0.25", "openslide.mpp-y": "0.26"}), None)
    # within 1%: fine
    assert resolve_mpp(FakeReader({"openslide.mpp-x": "0.25", "openslide.mpp-y": "0.2510"}), None).mpp == 0.25


@pytest.mark.parametrize("override", [0.0, -1.0, 30.0])
def test_implausible_override_is_an_error(override):
    with pytest.raises(MppError, match="override"):
        resolve_mpp(FakeReader({"openslide.mpp-x": "0.25"}), override)
