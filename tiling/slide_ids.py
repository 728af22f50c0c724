"""Slide ids that collide: `a/slide.svs` and `b/slide.svs`, or `X.svs` beside `X.ome.tif`.

A slide's id is its file name without the extension (a folder's name for a DICOM series), so different files can
share one. Rather than stopping the run, every file of a colliding group gets the id plus a deterministic suffix,
`<id>-<8 hex digits>`: a hash of its path relative to the deepest folder the group's files share (`a/slide.svs`,
`b/slide.svs`; `X.svs`, `X.ome.tif`). The suffix does not depend on where the data are mounted or on the order of
the inputs, so every machine of a `--shard` run computes the same ids; it changes only when the set of colliding
files changes. The original id is kept as the slide's `source_slide_id`, and the run says which file got which id.
Ids given in a manifest's slide_id column are the user's choice: two rows giving the same id are an error.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import os
from pathlib import Path
from typing import Any, Sequence

from tiling.store import safe_slide_id


def _suffix(relative: str) -> str:
    return hashlib.sha1(relative.encode("utf-8")).hexdigest()[:8]


def _relative_paths(paths: Sequence[Path]) -> list[str]:
    resolved = [os.path.abspath(p) for p in paths]
    common = os.path.commonpath([os.path.dirname(p) for p in resolved])
    return [os.path.relpath(p, common) for p in resolved]


def make_ids_unique(slides: Sequence[Any]) -> tuple[list[Any], list[str]]:
    """Slides (SlideInput) sorted by id with colliding ids suffixed (module docstring), and one note per collision.

    The same file listed twice (same path) is one slide. Raises ValueError when ids given in a manifest collide.
    """
    by_id: dict[str, dict[Path, Any]] = collections.defaultdict(dict)
    for s in slides:
        by_id[s.slide_id].setdefault(Path(os.path.abspath(s.path)), s)
    out, notes = [], []
    for slide_id, group in by_id.items():
        if len(group) == 1:
            out.extend(group.values())
            continue
        given = [s for s in group.values() if s.id_given]
        if len(given) > 1:
            raise ValueError(
                f"slide id {slide_id!r} is given to several files in a manifest: "
                f"{', '.join(str(s.path) for s in given)}; give each its own slide_id"
            )
        members = sorted(group.values(), key=lambda s: str(s.path))
        renamed = []
        for s, rel in zip(members, _relative_paths([s.path for s in members])):
            if s.id_given:  # the manifest's id stays; the others move aside
                out.append(s)
                continue
            new_id = safe_slide_id(f"{slide_id}-{_suffix(rel)}")
            out.append(dataclasses.replace(s, slide_id=new_id, source_id=s.source_id or slide_id))
            renamed.append(f"{s.path} -> {new_id}")
        notes.append(
            f"slide id {slide_id!r} is shared by {len(members)} files; to keep them apart they are tiled "
            f"as: {'; '.join(renamed)} (a manifest CSV with a slide_id column sets ids of your choice)"
        )
    ids = collections.Counter(s.slide_id for s in out)
    clash = sorted(i for i, n in ids.items() if n > 1)
    if clash:  # a suffixed id equal to another slide's id: vanishingly rare, but never two slides in one group
        raise ValueError(
            f"slide id(s) {', '.join(clash)} still collide after adding suffixes; give unique ids with "
            "a manifest CSV (path,slide_id)"
        )
    return sorted(out, key=lambda s: s.slide_id), notes
