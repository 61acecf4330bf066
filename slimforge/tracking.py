"""MLflow tracking: each stage is one run, tagged with the git commit and the stage name.

Tracking goes to `sqlite:///mlflow.db` in the working directory (the repo root under DVC) unless
MLFLOW_TRACKING_URI is set. When the Prefect flow launches a stage it exports
SLIMFORGE_PARENT_RUN_ID, and the stage's run is nested under the pipeline's run.

    mlflow ui --backend-store-uri sqlite:///mlflow.db     # browse runs
"""

from __future__ import annotations

import logging
import os
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
EXPERIMENT = "slimforge"
PARENT_ENV = "SLIMFORGE_PARENT_RUN_ID"


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}: MLflow params and metrics are flat."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _mlflow():
    import mlflow  # slow to import (~3 s): only when a run starts

    # alembic prints every schema migration at INFO when a fresh sqlite store is created
    for name in ("alembic", "mlflow"):
        logging.getLogger(name).setLevel(logging.WARNING)
    mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_TRACKING_URI))
    mlflow.set_experiment(os.environ.get("SLIMFORGE_EXPERIMENT", EXPERIMENT))
    return mlflow


class StageRun:
    """Thin handle on the active MLflow run: step metrics, final metrics, artifacts."""

    def __init__(self, mlflow, run):
        self._mlflow, self.run = mlflow, run
        self.run_id = run.info.run_id

    def log_step(self, step: int, metrics: dict[str, float]) -> None:
        self._mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def log_metrics(self, metrics: dict) -> None:
        flat = {k: float(v) for k, v in flatten(metrics).items() if isinstance(v, (int, float))}
        self._mlflow.log_metrics(flat)

    def log_artifact(self, path: str | Path, folder: str | None = None) -> None:
        if Path(path).exists():
            self._mlflow.log_artifact(str(path), artifact_path=folder)

    def set_tags(self, tags: dict[str, str]) -> None:
        self._mlflow.set_tags(tags)


def _tags(name: str) -> dict[str, str]:
    commit = git_commit()
    return {"slimforge.stage": name, "git_commit": commit, "mlflow.source.git.commit": commit}


@contextmanager
def stage_run(stage: str, params: dict) -> Iterator[StageRun]:
    """Open the MLflow run of one stage (nested under the pipeline's run when launched by the flow)."""
    mlflow = _mlflow()
    tags = _tags(stage)
    parent = os.environ.get(PARENT_ENV)
    if parent:
        tags["mlflow.parentRunId"] = parent
    nested = mlflow.active_run() is not None  # a stage called in-process under a pipeline run
    with mlflow.start_run(run_name=stage, tags=tags, nested=nested) as run:
        flat = {k: str(v)[:500] for k, v in flatten(params).items()}
        for i in range(0, len(flat), 100):  # MLflow caps one batch at 100 params
            mlflow.log_params(dict(list(flat.items())[i:i + 100]))
        yield StageRun(mlflow, run)


@contextmanager
def pipeline_run(name: str = "pipeline") -> Iterator[StageRun]:
    """The parent run of a flow; stages started while it is open nest under it."""
    mlflow = _mlflow()
    with mlflow.start_run(run_name=name, tags=_tags(name)) as run:
        yield StageRun(mlflow, run)
