"""Per-slide failures.

A `SlideError` means "this slide cannot be tiled (as asked)": the runner records its message for the user and goes
on with the other slides. Messages therefore name the slide and say what to do. Mistakes in the run's own settings
(a negative `tile_px`, ...) are `ValueError`s instead, because they would fail every slide alike.
"""

from __future__ import annotations


class SlideError(Exception):
    """A failure confined to one slide; the message is shown to the user as is."""


class SlideOpenError(SlideError):
    """No backend could open the slide (or read a single pixel from it)."""


class MppError(SlideError):
    """The slide's microns-per-pixel is missing, implausible or anisotropic; an override is needed."""


class ResolutionError(SlideError):
    """The slide cannot give the requested physical resolution (it would need upsampling)."""


class RegionReadError(SlideError):
    """Pixels of a region could not be read or decoded (e.g. a corrupt JPEG source tile).

    Raised for one block or one tile: the caller may retry smaller regions and skip only what is really broken.
    """


class NotBrightfieldError(SlideError):
    """The slide is fluorescence or multiplex imaging, not the brightfield RGB (H&E, IHC) the tiler is made for."""


class DecodeFailuresError(SlideError):
    """More of a slide's candidate tiles were lost to source tiles that fail to decode than the run allows
    (`max_decode_failure_fraction`): the file is damaged beyond what dropping a few tiles can hide."""


class FileCheckError(SlideOpenError):
    """The slide file itself is unusable before any reader is tried: empty, not a regular file, or truncated."""
