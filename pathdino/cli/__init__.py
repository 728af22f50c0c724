"""The ``pathdino`` command (typer): ``main.py`` holds the app and its thin command functions; ``tile.py``,
``train.py``, ``use.py`` and ``demo.py`` implement them. Importing this package never imports torch."""

from pathdino.cli.main import app, main

__all__ = ["app", "main"]
