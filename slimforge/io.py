"""Artifact I/O shared by every stage: atomic writes, JSONL with line-numbered errors, provenance.

Stages write only into a temporary sibling and rename it into place, so a killed stage never
leaves a half-written output that DVC or the next stage could take as good.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

from slimforge import SlimforgeError


def _tmp_sibling(final: Path) -> Path:
    return final.parent / f".{final.name}.tmp-{os.getpid()}"


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder; on success it replaces `final`, on error it is deleted."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(final)
    _remove(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    old = final.parent / f".{final.name}.old-{os.getpid()}"
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    _remove(old)


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(path)
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: str | Path, obj: Any) -> None:
    """Stable JSON (sorted keys) so unchanged content hashes the same for DVC."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise SlimforgeError(f"{path} not found") from None
    except json.JSONDecodeError as err:
        raise SlimforgeError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None


def write_jsonl(path: str | Path, records: Iterable[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))


def read_jsonl(path: str | Path, required: tuple[str, ...] = (), types: dict[str, type] | None = None
               ) -> list[dict]:
    """Read a JSONL file; a bad line raises SlimforgeError naming the file, the line number and
    what is wrong (not UTF-8, not JSON, not an object, a missing field, a field of the wrong type).

    `required` fields must be present; `types` maps field names to the type they must have when
    present (e.g. {"prompt": str}); null is not a value of any type.
    """
    path = Path(path)
    if not path.is_file():
        raise SlimforgeError(f"{path} not found")
    records = []
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise SlimforgeError(f"{path}:{lineno}: not UTF-8 text (byte 0x{raw[err.start]:02x} at column "
                                     f"{err.start + 1}); save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as err:
                raise SlimforgeError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
            if not isinstance(rec, dict):
                raise SlimforgeError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
            missing = [k for k in required if k not in rec]
            if missing:
                raise SlimforgeError(f"{path}:{lineno}: missing field(s) {', '.join(missing)}")
            for key, typ in (types or {}).items():
                # bool is an int subclass in Python: a JSON true is no number of tokens or answer
                if key in rec and (not isinstance(rec[key], typ) or (typ is not bool and isinstance(rec[key], bool))):
                    got = "null" if rec[key] is None else type(rec[key]).__name__
                    raise SlimforgeError(f"{path}:{lineno}: field '{key}' must be {typ.__name__}, got {got}")
            records.append(rec)
    return records


def _feed(h, file: Path) -> None:
    with file.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)


def file_hash(path: str | Path) -> str:
    """sha256 of one file's bytes (what `sha256sum` prints: checkable without slimforge)."""
    h = hashlib.sha256()
    _feed(h, Path(path))
    return h.hexdigest()


def _feed_tree(h, path: Path) -> None:
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(file.relative_to(path)).encode())
        _feed(h, file)


def content_hash(*items: Any) -> str:
    """sha256 of what `items` hold: a Path by its contents (a file's bytes, a folder's file names
    and bytes; never its location, so a retrained model at the same path hashes differently), any
    other value as sorted JSON. The one content address behind every resume fingerprint."""
    h = hashlib.sha256()
    for item in items:
        if isinstance(item, Path):
            h.update(b"\0file\0" if item.is_file() else b"\0folder\0" if item.is_dir() else b"\0missing\0")
            if item.is_file():
                _feed(h, item)
            elif item.is_dir():
                _feed_tree(h, item)
        else:
            h.update(b"\0value\0" + json.dumps(item, sort_keys=True, default=str).encode())
    return h.hexdigest()


def folder_bytes(path: str | Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def write_provenance(folder: str | Path, stage: str, params: dict, parent: str | Path | None) -> None:
    """`slimforge.json` beside a model: which stage made it, with what params, from which parent
    (the parent folder's content_hash; None for an output made from rows rather than a model)."""
    write_json(Path(folder) / "slimforge.json", {"stage": stage, "params": params,
                                                "parent": None if parent is None else content_hash(Path(parent))})
