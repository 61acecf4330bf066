"""Atomic outputs and provenance."""

import json

import pytest

from slimforge.io import atomic_dir, content_hash, write_json, write_provenance


def test_atomic_dir_replaces_only_on_success(tmp_path):
    out = tmp_path / "model"
    with atomic_dir(out) as tmp:
        (tmp / "weights").write_text("v1")
    assert (out / "weights").read_text() == "v1"
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp / "weights").write_text("half-written v2")
            raise RuntimeError("killed")
    assert (out / "weights").read_text() == "v1"  # the good output is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary left behind


def test_json_is_stable_and_hash_tracks_content(tmp_path):
    write_json(tmp_path / "a" / "m.json", {"b": 1, "a": 2})
    assert (tmp_path / "a" / "m.json").read_text() == '{\n  "a": 2,\n  "b": 1\n}\n'
    h1 = content_hash(tmp_path / "a")
    (tmp_path / "parent").mkdir()
    write_provenance(tmp_path / "a", "base", {"seed": 0}, parent=tmp_path / "parent")
    assert json.loads((tmp_path / "a" / "slimforge.json").read_text())["parent"] == content_hash(tmp_path / "parent")
    assert content_hash(tmp_path / "a") != h1
