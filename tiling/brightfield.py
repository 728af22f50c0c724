"""Is this a brightfield slide? Fluorescence and multiplex images fail plainly instead of yielding "black" tiles.

Brightfield (H&E, IHC, special stains) is light transmitted through stained tissue: RGB, on a bright background.
Fluorescence is emitted light: dark background, often more than three channels, named after fluorophores in the
file's metadata (Vectra/PhenoImager QPTIFF, OME-TIFF). Both checks are cheap: the metadata one reads TIFF headers
only, the pixel one looks at the tissue thumbnail that planning reads anyway.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from tiling.errors import NotBrightfieldError

FLUOROPHORE = re.compile(
    r"\b(DAPI|Hoechst|FITC|TRITC|Cy[2357](?:\.5)?|Alexa\s?(?:Fluor\s?)?\d{3}|AF\d{3}|Opal\s?\d{3}|GFP|RFP|YFP|"
    r"mCherry|Texas\s?Red|Autofluorescence|Sample\s?AF)\b",
    re.I,
)
_CHANNEL_NAME = re.compile(r"<(?:Name|Biomarker|Fluor|ChannelName)>([^<]+)</", re.I)
_OME_CHANNEL = re.compile(r"<(?:\w+:)?Channel\b([^>]*)>", re.I)
_TIFF_SUFFIXES = (".tif", ".tiff", ".qptiff", ".btf")
# A thumbnail is "dark background" when most of it is near black and almost none of it is near white (glass).
DARK_LEVEL = 50
DARK_MIN_FRACTION = 0.5
GLASS_LEVEL = 200
GLASS_MAX_FRACTION = 0.02


def _not_brightfield(path: Path, why: str) -> NotBrightfieldError:
    return NotBrightfieldError(
        f"{path.name}: not a brightfield RGB slide ({why}); pathdino tiles brightfield "
        "H&E/IHC slides. Leave this slide out (fluorescence needs a channel-aware tiler)"
    )


def _ome_channels(xml: str) -> tuple[int, list[str]]:
    """(number of samples over all OME Channels, fluorophore-like names) from OME-XML."""
    samples, names = 0, []
    for attrs in _OME_CHANNEL.findall(xml):
        spp = re.search(r'SamplesPerPixel="(\d+)"', attrs)
        samples += int(spp.group(1)) if spp else 1
        for key in ("Name", "Fluor"):
            value = re.search(rf'\b{key}="([^"]*)"', attrs)
            if value and FLUOROPHORE.search(value.group(1)):
                names.append(value.group(1))
        if re.search(r'(IlluminationType="Epifluorescence"|ContrastMethod="Fluorescence")', attrs):
            names.append("epifluorescence")
    return samples, names


def _tiff_channels(path: Path) -> tuple[str, list[str]]:
    """(a channel-count reason or "", fluorophore-like channel names) from a TIFF's headers."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        if not len(tif.pages):
            return "", []
        names: list[str] = []
        if tif.is_ome and tif.ome_metadata:
            samples, names = _ome_channels(tif.ome_metadata)
            if samples > 3:
                return f"{samples} channels in its OME metadata; brightfield is RGB", names
        level0 = tif.pages[0]
        if level0.samplesperpixel > 4:
            return f"{level0.samplesperpixel} samples per pixel; brightfield is RGB", names
        grey_planes = 0
        for page in list(tif.pages)[:64]:  # QPTIFF: one grey page per channel at full size, then the pyramid
            desc = getattr(page, "description", "") or ""
            if desc.lstrip().startswith("<"):
                names += [n.strip() for n in _CHANNEL_NAME.findall(desc) if FLUOROPHORE.search(n)]
            if page.shape[:2] == level0.shape[:2] and page.samplesperpixel == 1:
                grey_planes += 1
        if grey_planes > 1:
            return f"{grey_planes} greyscale channel images at full resolution; brightfield is RGB", names
        return "", names


def _named(path: Path, names: list[str]) -> NotBrightfieldError:
    return _not_brightfield(path, f"fluorescence: channels named {', '.join(list(dict.fromkeys(names))[:6])}")


def check_metadata(path: Path) -> None:
    """Raise NotBrightfieldError when a TIFF's headers name fluorophores or more than three channels.

    Runs before a reader opens the slide: readers often cannot open multiplex files at all, and "not brightfield"
    says more than "cannot open".
    """
    if not (path.name.lower().endswith(_TIFF_SUFFIXES) and path.is_file()):
        return
    try:
        channels, names = _tiff_channels(path)
    except Exception:  # noqa: BLE001 - unreadable headers are the readers' business, not this check's
        return
    if names:
        raise _named(path, names)
    if channels:
        raise _not_brightfield(path, channels)


def check_properties(path: Path, properties: Mapping[str, str]) -> None:
    """Raise NotBrightfieldError when the reader's slide properties name fluorophores as channels."""
    names = [
        v
        for k, v in properties.items()
        if k.lower().endswith(("channel.name", ".fluor", ".biomarker")) and FLUOROPHORE.search(v)
    ]
    if names:
        raise _named(path, names)


def check_pixels(path: Path, thumbnail: np.ndarray) -> None:
    """Raise NotBrightfieldError when the thumbnail shows a dark background (fluorescence), not bright glass."""
    if thumbnail.size == 0:
        return
    channels = [thumbnail[..., c] for c in range(thumbnail.shape[-1])]
    # Elementwise over channel planes: numpy's max/min over a length-3 last axis is ~15x slower (0.3 s on a 40k
    # slide's thumbnail).
    brightest = np.maximum.reduce(channels)
    darkest = np.minimum.reduce(channels)
    dark = float(np.mean(brightest < DARK_LEVEL))
    glass = float(np.mean(darkest > GLASS_LEVEL))
    if dark >= DARK_MIN_FRACTION and glass <= GLASS_MAX_FRACTION:
        raise _not_brightfield(
            path,
            f"dark background: {dark:.0%} of the thumbnail is near black and "
            f"{glass:.1%} bright glass, as in fluorescence",
        )
