"""runtime/files.py: atomic writes."""

from __future__ import annotations

import json
import os
import stat

import pytest

from runtime.files import atomic_write_bytes, atomic_write_json


def test_atomic_write_replaces_whole_file_with_normal_permissions(tmp_path):
    path = tmp_path / "a.json"
    atomic_write_json(path, {"x": 1})
    atomic_write_json(path, {"y": [1, 2]})
    assert json.loads(path.read_text()) == {"y": [1, 2]}
    atomic_write_bytes(path, b"z")
    mask = os.umask(0o022)
    os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask  # what open() gives, not mkstemp's owner-only 0600
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]  # no temporary file left


def test_failed_write_keeps_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "a.json"
    atomic_write_json(path, {"old": True})
    with pytest.raises(TypeError):
        atomic_write_bytes(path, object())  # type: ignore[arg-type]
    assert json.loads(path.read_text()) == {"old": True}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]
