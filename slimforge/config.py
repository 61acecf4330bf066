"""Typed params: one pydantic schema per stage, loaded from `params/<stage>.yaml`.

A bad params file fails before any work, with one message that names every wrong key and what is
allowed there, e.g.

    params/base.yaml: unknown key 'lerning_rate' (allowed: batch_size, lr, ...); steps: must be > 0
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from slimforge import SlimforgeError


class Schema(BaseModel):
    """Base for every params schema: unknown keys are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


S = TypeVar("S", bound=Schema)


def _allowed_keys(schema: type[BaseModel], loc: tuple) -> list[str]:
    """The field names allowed at `loc` (a path of keys into nested schemas)."""
    model = schema
    for key in loc[:-1]:
        field = model.model_fields.get(key) if isinstance(key, str) else None
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return sorted(model.model_fields)


def describe_errors(err: ValidationError, schema: type[BaseModel]) -> str:
    """Flatten a pydantic error into '; '-joined parts, one per wrong key."""
    parts = []
    for e in err.errors():
        where = ".".join(str(x) for x in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            allowed = ", ".join(_allowed_keys(schema, e["loc"]))
            parts.append(f"unknown key '{where}' (allowed: {allowed})")
        elif e["type"] == "missing":
            parts.append(f"missing key '{where}'")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            parts.append(f"{where}: {msg} (got {e.get('input')!r})")
    return "; ".join(parts)


def parse_params(data: dict[str, Any] | None, schema: type[S], source: str) -> S:
    """Validate a dict against `schema`; raise SlimforgeError naming `source` and each wrong key."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SlimforgeError(f"{source}: expected a mapping of keys to values, got {type(data).__name__}")
    try:
        return schema.model_validate(data)
    except ValidationError as err:
        raise SlimforgeError(f"{source}: {describe_errors(err, schema)}") from None


def load_params(path: str | Path, schema: type[S]) -> S:
    """Read and validate one params YAML file."""
    path = Path(path)
    if not path.is_file():
        raise SlimforgeError(f"params file {path} not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise SlimforgeError(f"{path}: not valid YAML: {str(err).splitlines()[0]}") from None
    return parse_params(data, schema, str(path))
