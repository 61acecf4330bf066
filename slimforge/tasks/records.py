"""Reading task JSONL (the embedded suite's or a user's) with schema checks."""

from __future__ import annotations

from pathlib import Path

from slimforge import SlimforgeError
from slimforge.io import read_jsonl

FIELD_TYPES = {"prompt": str, "response": str, "answer": str, "family": str, "id": str,
               "correct": bool, "format": str}


def load_records(path: str | Path, need_answer: bool = False, allow_empty: bool = False) -> list[dict]:
    """Records from a JSONL file in the suite schema. `need_answer` for evaluation files, where
    exact match needs the verified answer. Missing `family` becomes "user". An empty file is an
    error unless `allow_empty` (e.g. a pretraining mix with judge_train: 0)."""
    required = ("prompt", "response", "answer") if need_answer else ("prompt", "response")
    records = read_jsonl(path, required=required, types=FIELD_TYPES)
    if not records and not allow_empty:
        raise SlimforgeError(f"{path}: no records (expected JSONL lines with {', '.join(required)})")
    for rec in records:
        rec.setdefault("family", "user")
    return records


def load_labels(path: str | Path) -> list[dict]:
    """Sidecar labels of an instruction set: JSONL lines {"id": str, "correct": bool}."""
    return read_jsonl(path, required=("id", "correct"), types={"id": str, "correct": bool})
