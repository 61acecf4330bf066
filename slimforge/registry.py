"""The MLflow model registry: the package stage registers the full model here, with aliases instead
of stages (`challenger`: the newest version; `champion`: the one to serve).

    slimforge registry show NAME
    slimforge registry promote NAME VERSION    # champion := VERSION, whatever the metric says
    slimforge registry rollback NAME           # champion := the champion before the current one

A new version becomes champion only when its metric beats the current champion's 95% interval
(a tie within the interval keeps the champion: re-running the same recipe must not flip it). The
metric and its interval are version tags, so the rule needs nothing but the registry.
"""

from __future__ import annotations

from pathlib import Path

from slimforge import SlimforgeError

CHAMPION, CHALLENGER = "champion", "challenger"
HISTORY = "slimforge.champion_history"  # registered-model tag: the champions so far, oldest first
METRIC, METRIC_HI = "slimforge.metric", "slimforge.metric_ci95_hi"
TASK = "text-generation"


def _client():
    from mlflow import MlflowClient

    from slimforge.tracking import tracking_uri

    return MlflowClient(tracking_uri())


def _exists(client, name: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
        return True
    except MlflowException:
        return False


def check_compatible(name: str) -> None:
    """Before any work: a registered `name` must hold slimforge's kind of model (a transformers
    text-generation model), not something else that happens to share the name."""
    client = _client()
    if not _exists(client, name):
        return
    versions = client.search_model_versions(f"name='{name}'", max_results=1, order_by=["version_number DESC"])
    if versions and versions[0].tags.get("slimforge.task") != TASK:
        raise SlimforgeError(f"registered model {name!r} exists and holds models that are not slimforge's "
                             f"{TASK} models (version {versions[0].version} has no slimforge.task={TASK} tag): "
                             "choose another `name` in params/package.yaml")


def champion(name: str):
    """The champion's ModelVersion, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return _client().get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def beats(metric: float, current) -> bool:
    """True when `metric` is above the current champion's interval (no champion: True)."""
    return current is None or metric > float(current.tags.get(METRIC_HI, current.tags.get(METRIC, "-inf")))


def register(folder: str | Path, name: str, *, metric: float, metric_hi: float, tags: dict[str, str],
             artifacts: dict[str, str | Path], pip_requirements: list[str]) -> dict:
    """Log `folder` (a Hugging Face model folder) as an MLflow transformers model in the active run,
    register it as a new version of `name`, tag it, log `artifacts` ({path in the run: local
    folder}) beside it, set `challenger`, and move `champion` when it beats the current one.
    Returns {"name", "version", "aliases", "champion_before", "promoted"}."""
    import mlflow
    import transformers

    client = _client()
    for where, local in artifacts.items():
        mlflow.log_artifacts(str(local), artifact_path=where)
    # an in-memory pipeline, not the folder path: MLflow's checkpoint-path route reads a pipeline
    # class attribute that transformers 5 no longer has (AttributeError in flavor_config)
    pipe = transformers.pipeline(TASK, model=str(folder), tokenizer=str(folder))
    info = mlflow.transformers.log_model(transformers_model=pipe, name="model", pip_requirements=pip_requirements,
                                         registered_model_name=name)
    version = str(info.registered_model_version)
    all_tags = {**tags, "slimforge.task": TASK, METRIC: repr(metric), METRIC_HI: repr(metric_hi),
                **{f"slimforge.artifact.{k}": f"runs:/{info.run_id}/{k}" for k in artifacts}}
    for key, value in all_tags.items():
        client.set_model_version_tag(name, version, key, value)
    client.set_registered_model_alias(name, CHALLENGER, version)
    before = champion(name)
    promoted = beats(metric, before)
    if promoted:
        promote(name, version)
    return {"name": name, "version": version, "aliases": [CHALLENGER] + ([CHAMPION] if promoted else []),
            "champion_before": None if before is None else str(before.version), "promoted": promoted}


def _history(client, name: str) -> list[str]:
    tag = client.get_registered_model(name).tags.get(HISTORY, "")
    return [v for v in tag.split(",") if v]


def promote(name: str, version: str) -> None:
    """Make `version` the champion and remember it, so that `rollback` can undo it."""
    client = _client()
    client.get_model_version(name, version)  # a version that does not exist fails here, clearly
    history = _history(client, name) + [str(version)]
    client.set_registered_model_alias(name, CHAMPION, str(version))
    client.set_registered_model_tag(name, HISTORY, ",".join(history))


def rollback(name: str) -> str:
    """Move `champion` back to the previous champion; returns its version."""
    client = _client()
    history = _history(client, name)
    if len(history) < 2:
        raise SlimforgeError(f"{name}: no earlier champion to roll back to (champions so far: {history or 'none'})")
    client.set_registered_model_alias(name, CHAMPION, history[-2])
    client.set_registered_model_tag(name, HISTORY, ",".join(history[:-1]))
    return history[-2]


def describe(name: str) -> list[dict]:
    """Every version of `name`: version, aliases, metric, run, commit."""
    client = _client()
    if not _exists(client, name):
        raise SlimforgeError(f"no registered model named {name!r}")
    aliases = client.get_registered_model(name).aliases  # {alias: version}
    out = []
    for v in sorted(client.search_model_versions(f"name='{name}'"), key=lambda v: int(v.version)):
        out.append({"version": str(v.version), "aliases": sorted(a for a, ver in aliases.items() if str(ver) == str(v.version)),
                    "metric": v.tags.get(METRIC), "commit": v.tags.get("slimforge.git_commit"), "run": v.run_id})
    return out
