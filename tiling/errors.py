"""The project's error root, and per-slide failures.

`PathdinoError` is the base of every error pathdino raises on purpose, because of something the user can fix: a
config, flag, file, store, slide, checkpoint or launch. Its message names the thing at fault and says what to do.
The `pathdino` command prints these as one line (`error: ...`, exit 2); anything else is a bug and keeps its
traceback. Each project error keeps a built-in second base where callers may catch one (`ConfigError` is also a
`ValueError`, `MissingFileError` a `FileNotFoundError`), so `except ValueError` code keeps working.

A `SlideError` means "this slide cannot be tiled (as asked)": the runner records its message for the user and goes
on with the other slides. Messages therefore name the slide and say what to do. Mistakes in the run's own settings
(a negative `tile_px`, ...) are `ConfigError`s instead, because they would fail every slide alike.

This module is the bottom of the import graph: it imports nothing, and every package may import it.
"""

from __future__ import annotations


class PathdinoError(Exception):
    """Something the user can fix (config, flag, input file, store, checkpoint, launch); the message says what."""

    def __str__(self) -> str:
        # The message as given, also for subclasses with a KeyError base (whose own str() adds quotes).
        return Exception.__str__(self)


class MissingFileError(PathdinoError, FileNotFoundError):
    """A file or folder the user named (a flag, a config key, a CSV row) does not exist."""


class SlideError(PathdinoError):
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
