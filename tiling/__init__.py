"""Whole-slide images → pathdino tile stores (Zarr v3). Importing this package never imports torch."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("pathdino")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0+unknown"
