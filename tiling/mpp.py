"""A slide's level-0 microns per pixel, from its metadata or an override, or a clear error. Never a guess.

Chain (the first source that gives a number decides; a bad number is an error, not a reason to look further):
  1. `openslide.mpp-x` / `openslide.mpp-y`
  2. vendor keys: `aperio.MPP`, `openslide.mirax.MPP`, `hamamatsu.XResolution` (with its resolution unit),
     `tiffslide.mpp-x` / `tiffslide.mpp-y`
  3. the TIFF `XResolution` / `YResolution` + `ResolutionUnit` tags of the level-0 page, read with tifffile
     (unit "none" does not give a physical size)
An override (`--slide-mpp`, or an `mpp` column in the manifest CSV) wins over all of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tiling.errors import MppError
from tiling.readers import SlideReader

MIN_PLAUSIBLE_MPP = 0.05
MAX_PLAUSIBLE_MPP = 20.0
ANISOTROPY_TOLERANCE = 0.01
"""x and y mpp may differ by this relative amount; beyond it pixels are not square and tiles would be distorted."""

_HOW_TO_FIX = (
    "pass --slide-mpp <µm/px> or give this slide an `mpp` column value in the manifest CSV "
    "(columns: path[,slide_id][,mpp])"
)

# Microns per resolution unit (TIFF ResolutionUnit codes and the names OpenSlide/tiffslide print for them).
_UNIT_UM = {
    "2": 25400.0,
    "inch": 25400.0,
    "3": 10000.0,
    "centimeter": 10000.0,
    "cm": 10000.0,
    "4": 1000.0,
    "millimeter": 1000.0,
    "5": 1.0,
    "micrometer": 1.0,
}


@dataclass(frozen=True)
class MppResult:
    """Level-0 µm per pixel and where it came from (a property key, "tiff.XResolution" or "override")."""

    mpp: float
    source: str


@dataclass(frozen=True)
class _Found:
    mpp_x: float
    mpp_y: float | None
    source: str


def _number(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        number = float(str(value).strip())
    except ValueError:
        return None
    return number if number == number and abs(number) != float("inf") else None  # drop nan/inf


def _from_properties(props, skipped: list[str]) -> _Found | None:
    for key_x, key_y in (("openslide.mpp-x", "openslide.mpp-y"), ("aperio.MPP", None), ("openslide.mirax.MPP", None)):
        if key_x in props:
            mpp_x = _number(props[key_x])
            if mpp_x is None:
                skipped.append(f"{key_x}={props[key_x]!r} is not a number")
                continue
            return _Found(mpp_x, _number(props.get(key_y)) if key_y else None, key_x)
    if "hamamatsu.XResolution" in props:
        found = _from_resolution(
            props.get("hamamatsu.XResolution"),
            props.get("hamamatsu.YResolution"),
            props.get("hamamatsu.ResolutionUnit", props.get("tiff.ResolutionUnit")),
            "hamamatsu.XResolution",
            skipped,
        )
        if found is not None:
            return found
    if "tiffslide.mpp-x" in props:
        mpp_x = _number(props["tiffslide.mpp-x"])
        if mpp_x is not None:
            return _Found(mpp_x, _number(props.get("tiffslide.mpp-y")), "tiffslide.mpp-x")
        skipped.append(f"tiffslide.mpp-x={props['tiffslide.mpp-x']!r} is not a number")
    return None


def _from_resolution(x_res, y_res, unit, source: str, skipped: list[str]) -> _Found | None:
    """Pixels per unit -> µm per pixel; None (noted in `skipped`) when the unit is missing or not physical."""
    x_res_num = _number(x_res)
    if x_res_num is None or x_res_num <= 0:
        skipped.append(f"{source}={x_res!r} is not a positive number")
        return None
    unit_key = str(unit).strip().lower().removeprefix("resunit.") if unit is not None else ""
    um_per_unit = _UNIT_UM.get(unit_key)
    if um_per_unit is None:
        skipped.append(f"{source}={x_res} has no physical resolution unit ({unit!r})")
        return None
    y_res_num = _number(y_res)
    mpp_y = um_per_unit / y_res_num if y_res_num and y_res_num > 0 else None
    return _Found(um_per_unit / x_res_num, mpp_y, source)


def _from_tiff_tags(path: Path, skipped: list[str]) -> _Found | None:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.series[0].levels[0].keyframe if tif.series else tif.pages.first
            tags = page.tags
            if "XResolution" not in tags:
                return None
            x_res = _rational(tags["XResolution"].value)
            y_res = _rational(tags["YResolution"].value) if "YResolution" in tags else None
            unit = tags["ResolutionUnit"].value if "ResolutionUnit" in tags else None
    except Exception:  # not a TIFF, or one tifffile cannot parse: this source simply does not apply
        return None
    unit_str = str(int(unit)) if unit is not None else None
    return _from_resolution(x_res, y_res, unit_str, "tiff.XResolution", skipped)


def _rational(value) -> float | None:
    if isinstance(value, tuple) and len(value) == 2:
        return value[0] / value[1] if value[1] else None
    return _number(value)


def check_plausible_mpp(mpp: float, slide: str | Path, where: str) -> None:
    """Raise MppError unless `mpp` is a believable level-0 resolution (0.05-20 µm/px)."""
    if not MIN_PLAUSIBLE_MPP <= mpp <= MAX_PLAUSIBLE_MPP:
        hint = " (a 72/96-dpi default resolution tag, not a microscope resolution)" if mpp > 100 else ""
        raise MppError(
            f"{slide}: implausible resolution {mpp:.6g} µm/px from {where}{hint}; plausible slides are "
            f"{MIN_PLAUSIBLE_MPP}-{MAX_PLAUSIBLE_MPP} µm/px. If you know the real value, {_HOW_TO_FIX}."
        )


def resolve_mpp(reader: SlideReader, override_mpp: float | None = None) -> MppResult:
    """Level-0 µm/px of `reader`'s slide: the override if given, else the first metadata source in the chain.

    Raises MppError (naming the slide, the value and where it was found) when nothing is found, when the value is
    outside 0.05-20 µm/px, or when x and y differ by more than 1%.
    """
    slide = reader.path
    if override_mpp is not None:
        check_plausible_mpp(float(override_mpp), slide, "the override (--slide-mpp or the manifest's mpp column)")
        return MppResult(float(override_mpp), "override")

    skipped: list[str] = []
    found = _from_properties(reader.properties, skipped) or _from_tiff_tags(slide, skipped)
    if found is None:
        notes = f" ({'; '.join(skipped)})" if skipped else ""
        raise MppError(
            f"{slide}: no microns-per-pixel in the slide's metadata{notes}; tiling at a physical "
            f"resolution needs it: {_HOW_TO_FIX}."
        )
    check_plausible_mpp(found.mpp_x, slide, found.source)
    if found.mpp_y is not None:
        check_plausible_mpp(found.mpp_y, slide, found.source.replace("-x", "-y").replace("XRes", "YRes"))
        if abs(found.mpp_x - found.mpp_y) > ANISOTROPY_TOLERANCE * min(found.mpp_x, found.mpp_y):
            raise MppError(
                f"{slide}: anisotropic pixels, x {found.mpp_x:.6g} µm/px vs y {found.mpp_y:.6g} µm/px "
                f"(from {found.source}, more than {ANISOTROPY_TOLERANCE:.0%} apart); square tiles would "
                f"be distorted. If the metadata is wrong, {_HOW_TO_FIX}."
            )
    return MppResult(found.mpp_x, found.source)
