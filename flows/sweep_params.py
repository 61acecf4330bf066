"""Schema of params/sweep.yaml and the grid's checks: every key names a real params key, every value
passes that params file's own schema (checked by `python -m stages.check_params` in a subprocess:
flows drive the stages, they do not import them), before any point runs. Light imports only (no
Prefect, no torch), so `python -m flows.sweep --dry-run` answers in a few seconds."""

from __future__ import annotations

import hashlib
import itertools
import json
import subprocess
import sys
from copy import deepcopy
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from slimforge import SlimforgeError
from slimforge.config import Schema, read_yaml

# A sweep point never registers a model itself; the sweep registers its best point afterwards.
NO_REGISTER = {"params/package.yaml:register_model": False}


class Budget(Schema):
    max_mb: float | None = Field(None, gt=0, description="candidates at most this many MB on disk")
    min_tokens_per_s: float | None = Field(None, gt=0, description="candidates decoding at least this fast "
                                           "(batch 1, on the machine the report stage ran on)")


class SweepParams(Schema):
    name: str = Field("sweep", pattern=r"^[A-Za-z0-9_-]+$", description="prefix of the points' experiment names")
    grid: dict[str, list[Any]] = Field(description="'params/<file>.yaml:<dotted.key>' -> the values to try; "
                                       "the points are every combination")
    models: list[Literal["base", "pruned", "quantized", "lora", "full"]] = Field(
        ["pruned", "quantized", "full"], min_length=1, description="which of each point's models "
        "(reports/report.json rows) are candidates for the frontier")
    jobs: int = Field(1, ge=1, description="points run at once (each is a full dvc repro)")
    retries: int = Field(1, ge=0, description="reruns of a point that crashed")
    budget: Budget = Field(Budget(), description="the best candidate within it is registered")
    register_best: bool = Field(True, description="register the best point within the budget as challenger")
    out: str = Field("sweeps", description="folder for <name>/frontier.{md,png}, <name>/points.json")


def yaml_value(value: Any) -> str:
    """A value as `dvc exp run -S key=value` parses it (YAML flow style, one line)."""
    return json.dumps(value)


def _check_key(key: str, root: Path) -> tuple[str, list[str], dict]:
    """(params file, key path, that file's data) of a grid key; one-line errors naming what is allowed."""
    file, sep, dotted = key.partition(":")
    known = sorted(f"params/{p.name}" for p in (root / "params").glob("*.yaml") if p.name != "sweep.yaml")
    if not sep or file not in known:
        raise SlimforgeError(f"sweep grid: '{key}' is not 'params/<file>.yaml:<key>' with a known file "
                             f"(allowed files: {', '.join(known)})")
    data = read_yaml(root / file) or {}
    path, node = dotted.split("."), data
    for i, part in enumerate(path):
        if not isinstance(node, dict) or part not in node:
            allowed = sorted(node) if isinstance(node, dict) else []
            where = ".".join(path[:i]) or "top level"
            raise SlimforgeError(f"sweep grid: {file} has no key '{'.'.join(path[:i + 1])}' (allowed at {where}: "
                                 f"{', '.join(allowed) or 'none, it is a value'})")
        node = node[part]
    return file, path, data


def _set(data: dict, path: list[str], value: Any) -> None:
    for part in path[:-1]:
        data = data[part]
    data[path[-1]] = value


def point_name(prefix: str, overrides: dict[str, Any]) -> str:
    """A stable experiment name per point: the same overrides always get the same name."""
    digest = hashlib.sha1(json.dumps(overrides, sort_keys=True).encode()).hexdigest()[:8]
    return f"{prefix}-{digest}"


def expand_grid(params: SweepParams, root: str | Path = ".") -> list[dict]:
    """[{"name", "overrides"}] for every combination of the grid, each checked against its params
    files' schemas (the first bad value fails the whole sweep, naming the key and what is allowed)."""
    root = Path(root)
    if not params.grid:
        raise SlimforgeError("sweep grid: empty (give 'params/<file>.yaml:<key>': [values, ...])")
    checked = {key: _check_key(key, root) for key in params.grid}
    for key, values in params.grid.items():
        if not values:
            raise SlimforgeError(f"sweep grid: '{key}' has no values")
    points, items = [], []
    for combo in itertools.product(*params.grid.values()):
        overrides = dict(zip(params.grid, combo))
        edited = {}
        for key, value in overrides.items():
            file, path, data = checked[key]
            _set(edited.setdefault(file, deepcopy(data)), path, value)
        items.append({"label": f"sweep grid point {overrides}", "files": edited})
        points.append({"name": point_name(params.name, overrides), "overrides": overrides})
    check = subprocess.run([sys.executable, "-m", "stages.check_params"], cwd=root, input=json.dumps(items),
                           capture_output=True, text=True)
    if check.returncode != 0:
        raise SlimforgeError(check.stdout.strip() or f"stages.check_params failed: {check.stderr.strip()[-500:]}")
    return points
