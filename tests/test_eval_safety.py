"""`pathdino eval` on awkward datasets (issue 19, items 10 and 14): one class is an error naming the dataset and the
class count (not 1.000 everywhere); an unreadable image is skipped with a warning and counted in the report, and
only more than --max-unreadable of a split's images stops the evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from pathdino.cli import app


def _dataset(root: Path, classes: tuple[str, ...], per_class: int = 12) -> Path:
    rng = np.random.default_rng(0)
    for k, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 80, (32, 32, 3)) + 60 * k
            Image.fromarray(pixels.astype(np.uint8)).save(root / name / f"{i}.png")
    return root


def _eval(data: Path, out: Path, *extra: str):
    return CliRunner().invoke(
        app,
        [
            "eval",
            str(data),
            "--arch",
            "vit_tiny_patch16_224",
            "--img-size",
            "32",
            "-o",
            str(out),
            "-m",
            "knn",
            "-m",
            "linear",
            "--no-progress",
            *extra,
        ],
    )


def test_one_class_is_an_error_naming_the_dataset_and_the_count(tmp_path):
    data = _dataset(tmp_path / "one", ("tumour",))
    result = _eval(data, tmp_path / "r.json")
    assert result.exit_code == 2, result.output
    assert f"{data}: 1 class (tumour); kNN, linear and few-shot classification need at least 2 classes" in (
        result.output
    )
    assert not (tmp_path / "r.json").exists()


def test_an_unreadable_image_is_skipped_counted_and_capped(tmp_path):
    data = _dataset(tmp_path / "two", ("a", "b"))
    bad = data / "a" / "3.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)  # a PNG signature and nothing readable
    result = _eval(data, tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    assert "skipped 1 unreadable image(s)" in result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["unreadable"] == {"n": 1, "paths": [str(bad)]}
    assert report["methods"]["knn"]  # scored on the images that could be read
    strict = _eval(data, tmp_path / "s.json", "--max-unreadable", "0")
    assert strict.exit_code == 2, strict.output
    assert "1 images cannot be read, more than --max-unreadable allows (0 images" in strict.output
    assert str(bad) in strict.output


def test_mil_names_the_cli_flag_for_missing_slides(tmp_path):
    import sys

    import pytest

    sys.path.insert(0, str(Path(__file__).parent))
    from test_abmil import _make_bags, _write_labels

    from pathdino.mil import MILConfig, train_abmil

    bags, labels, _ = _make_bags(12, seed=2)
    _write_labels(tmp_path / "labels.csv", labels)
    partial = {k: v for k, v in bags.items() if k != sorted(bags)[0]}
    with pytest.raises(FileNotFoundError, match="drop them with --skip-missing"):
        train_abmil(tmp_path / "labels.csv", partial, tmp_path / "out", config=MILConfig(hidden_dim=8, max_epochs=1))
