"""The CLI's one idiom: a command's flags fill its options dataclass in one call, and its help shows the defaults
of that dataclass (as `pathdino tile` does with ``TilingConfig``).

A ``Flags`` names the dataclass (imported only when used, so `pathdino` starts without torch) and which flag fills
which field; a flag left unset (``None``) keeps the dataclass default, so every default lives once, in the
dataclass. Adding a flag is one entry here and one ``typer.Option`` in main.py.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Flags:
    """How one command's flags fill its options dataclass."""

    options: Callable[[], type]  # the dataclass (a function that imports it)
    fields: Mapping[str, str]  # flag parameter name -> dataclass field
    negated: frozenset[str] = frozenset()  # --no-X flags: given, they set their (True by default) field to False
    shown: Mapping[str, str] = field(default_factory=dict)  # help text of defaults a value alone cannot say

    def build(self, params: Mapping[str, Any], *, command: str) -> Any:
        """The options dataclass from the command's parsed flags (``ctx.params``), in one call: unset flags keep
        the dataclass defaults; values are checked by the dataclass (a ConfigError naming the command)."""
        from tiling.configio import load_config

        values = {}
        for flag, name in self.fields.items():
            value = params.get(flag)
            if flag in self.negated:
                value = False if value else None
            if value is None or (isinstance(value, (list, tuple)) and not value):
                continue
            values[name] = tuple(value) if isinstance(value, list) else value
        return load_config(self.options(), None, values=values, where=f"pathdino {command}")

    def defaults(self) -> dict[str, str]:
        """Each flag's default as its help shows it: the dataclass default (``shown`` where that says little)."""
        by_name = {f.name: f for f in dataclasses.fields(self.options())}
        out = {}
        for flag, name in self.fields.items():
            if flag in self.shown:
                out[flag] = self.shown[flag]
                continue
            f = by_name[name]
            value = f.default_factory() if f.default is dataclasses.MISSING else f.default
            out[flag] = _as_text(value)
        return out


def _as_text(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value)
    return "none" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def _embed_options() -> type:
    from pathdino.embed import EmbedOptions

    return EmbedOptions


def _export_options() -> type:
    from pathdino.export import ExportOptions

    return ExportOptions


def _eval_options() -> type:
    from pathdino.eval import EvalOptions

    return EvalOptions


def _slide_embed_options() -> type:
    from pathdino.slide.slide_embed import SlideEmbedOptions

    return SlideEmbedOptions


def _slide_mil_config() -> type:
    from pathdino.mil.slide_encoder import SlideMILConfig

    return SlideMILConfig


def _mil_config() -> type:
    from pathdino.mil import MILConfig

    return MILConfig


EMBED = Flags(
    _embed_options,
    {
        "formats": "formats",
        "mean_patch": "mean_patch",
        "patch_tokens": "patch_tokens",
        "shard": "shard",
        "part_tiles": "part_tiles",
        "encoder_table": "encoder_table",
        "batch_size": "batch_size",
        "workers": "num_workers",
        "device": "device",
        "precision": "precision",
        "slides": "slides",
        "force": "force",
        "overwrite": "overwrite",
        "no_progress": "progress",
    },
    negated=frozenset({"no_progress"}),
    shown={
        "mean_patch": "off: CLS only",
        "patch_tokens": "off: no patch tokens",
        "shard": "RANK/WORLD_SIZE under a launcher, else all slides",
        "encoder_table": "built-in table (+ $PATHDINO_ENCODER_TABLE)",
        "workers": "4, at most one per CPU core",
        "device": "cuda when available, else cpu",
        "slides": "every complete slide",
        "no_progress": "off: a bar on terminals",
    },
)

EXPORT = Flags(
    _export_options,
    {
        "tile_px": "tile_px",
        "target_mpp": "target_mpp",
        "name": "model_name",
        "license_": "license",
        "overwrite": "overwrite",
        "pick": "pick",
    },
    shown={
        "tile_px": "read from the training stores",
        "target_mpp": "read from the training stores",
        "name": "the output folder's name",
    },
)

EVAL = Flags(
    _eval_options,
    {
        "batch_size": "batch_size",
        "workers": "num_workers",
        "device": "device",
        "no_progress": "progress",
        "max_unreadable": "max_unreadable_fraction",
    },
    negated=frozenset({"no_progress"}),
    shown={"device": "cuda when available, else cpu", "no_progress": "off: bars on terminals"},
)

MIL = Flags(
    _mil_config,
    {
        "max_epochs": "max_epochs",
        "hidden_dim": "hidden_dim",
        "lr": "lr",
        "device": "device",
        "skip_missing": "skip_missing_slides",
        "seed": "seed",
    },
)

SLIDE_EMBED = Flags(
    _slide_embed_options,
    {
        "tiles": "tiles",
        "shard": "shard",
        "slides": "slides",
        "device": "device",
        "precision": "precision",
        "force": "force",
        "overwrite": "overwrite",
        "no_progress": "progress",
    },
    negated=frozenset({"no_progress"}),
    shown={
        "tiles": "off: slide vectors only",
        "shard": "RANK/WORLD_SIZE under a launcher, else all slides",
        "slides": "every complete slide",
        "device": "cuda when available, else cpu",
        "no_progress": "off: a bar on terminals",
    },
)

# `pathdino mil --slide-encoder DIR`: the shared flags (--max-epochs, --lr, ...) fill SlideMILConfig instead
SLIDE_MIL = Flags(
    _slide_mil_config,
    {
        "max_epochs": "max_epochs",
        "lr": "lr",
        "device": "device",
        "skip_missing": "skip_missing_slides",
        "seed": "seed",
        "linear_probe": "linear_probe",
        "layer_decay": "layer_decay",
        "accumulate_slides": "accumulate_slides",
        "max_tiles": "max_tiles",
        "slide_vector": "vector",
    },
    shown={"max_tiles": "none: every tile"},
)
SLIDE_ONLY_FLAGS = ("linear_probe", "layer_decay", "accumulate_slides", "max_tiles", "slide_vector")


def mil_defaults() -> dict[str, str]:
    """`pathdino mil` help: ABMIL's defaults, and SlideMILConfig's for the flags only --slide-encoder uses."""
    slide = SLIDE_MIL.defaults()
    return {**MIL.defaults(), **{flag: slide[flag] for flag in SLIDE_ONLY_FLAGS}}
