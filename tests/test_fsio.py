"""tiling.fsio: the atomic-write, publish, hash, timestamp and pid helpers every package uses."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from datetime import datetime

import numpy as np
import pytest

from tiling.fsio import (
    atomic_path,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    check_format,
    file_sha256,
    now_iso,
    pid_alive,
    publish_dir,
    to_jsonable,
)


def test_atomic_writes_replace_and_leave_no_temporaries(tmp_path):
    target = tmp_path / "sub" / "a.json"
    atomic_write_json(target, {"x": 1})
    atomic_write_json(target, {"x": 2})
    assert json.loads(target.read_text()) == {"x": 2} and target.read_text().endswith("\n")
    atomic_write_text(tmp_path / "t.txt", "héllo")
    atomic_write_bytes(tmp_path / "b.bin", b"\x00\x01")
    assert (tmp_path / "t.txt").read_text(encoding="utf-8") == "héllo"
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["a.json", "b.bin", "t.txt"]


def test_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "keep.json"
    atomic_write_json(target, {"ok": True})
    with pytest.raises(TypeError):
        atomic_write_json(target, {"bad": object()})
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert json.loads(target.read_text()) == {"ok": True}
    assert [p.name for p in tmp_path.iterdir()] == ["keep.json"]


def test_strict_json_rejects_nan_unless_made_jsonable(tmp_path):
    payload = {"auc": float("nan"), "n": np.int64(3), "v": np.array([1.5, np.inf]), "ok": np.bool_(True), "p": tmp_path}
    with pytest.raises(ValueError):
        atomic_write_json(tmp_path / "r.json", payload, allow_nan=False, default=str)
    atomic_write_json(tmp_path / "r.json", to_jsonable(payload), allow_nan=False)
    assert json.loads((tmp_path / "r.json").read_text()) == {
        "auc": None,
        "n": 3,
        "v": [1.5, None],
        "ok": True,
        "p": str(tmp_path),
    }


def test_publish_dir_replaces_a_folder_whole(tmp_path):
    final = tmp_path / "out"
    for version in ("1", "2"):
        staged = tmp_path / f".staged{version}"
        (staged / "nested").mkdir(parents=True)
        (staged / "v.txt").write_text(version)
        (staged / "nested" / "n.txt").write_text(version)
        publish_dir(staged, final)
        assert not staged.exists()
    assert (final / "v.txt").read_text() == "2" and (final / "nested" / "n.txt").read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the old folder was removed


def test_file_sha256_and_now_iso(tmp_path):
    data = os.urandom(100_000)
    (tmp_path / "f").write_bytes(data)
    assert file_sha256(tmp_path / "f", chunk_bytes=4096) == hashlib.sha256(data).hexdigest()
    stamp = datetime.fromisoformat(now_iso())
    assert stamp.tzinfo is not None and stamp.microsecond == 0


def test_pid_alive():
    assert pid_alive(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert not pid_alive(child.pid)


def test_check_format_names_the_store_and_what_to_do():
    kw = dict(
        where="/x/store",
        kind="pathdino widget store",
        format_name="widgets",
        format_version=2,
        error=KeyError,
        not_this_format="Pick another folder.",
        other_version="Rebuild it.",
    )
    check_format({"format": "widgets", "format_version": 2}, **kw)
    with pytest.raises(KeyError, match="not a pathdino widget store.*Pick another folder"):
        check_format({"format": "other"}, **kw)
    with pytest.raises(KeyError, match="format version 1.*reads version 2. Rebuild it"):
        check_format({"format": "widgets", "format_version": 1}, **kw)


def test_fsio_imports_neither_torch_nor_pathdino():
    code = (
        "import sys, tiling.fsio; bad = [m for m in ('torch', 'pathdino') if m in sys.modules]; "
        "assert not bad, bad; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"


def test_read_json_returns_the_value_or_raises_naming_the_file(tmp_path):
    from tiling.fsio import read_json

    class WidgetError(ValueError):
        pass

    good = tmp_path / "good.json"
    good.write_text('{"a": 1}')
    assert read_json(good, error=WidgetError) == {"a": 1}
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    assert read_json(listed, error=WidgetError, expect=list) == [1, 2]
    with pytest.raises(WidgetError, match=r"list.json: expected a JSON object, found list; rebuild it"):
        read_json(listed, error=WidgetError, hint="rebuild it")
    broken = tmp_path / "broken.json"
    broken.write_text('{"a": ')
    with pytest.raises(WidgetError, match=r"broken.json is not valid JSON"):
        read_json(broken, error=WidgetError)
    with pytest.raises(WidgetError, match=r"absent.json: cannot read it"):
        read_json(tmp_path / "absent.json", error=WidgetError)
