"""MLflow: one run per stage with params, step metrics, tags and artifacts, nested under a parent."""

import os

import mlflow
from mlflow.tracking import MlflowClient

from slimforge.tracking import PARENT_ENV, pipeline_run, stage_run


def test_stage_run_logs_into_sqlite(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    artifact = tmp_path / "metrics.json"
    artifact.write_text('{"accuracy": 0.5}')
    with pipeline_run() as parent:
        monkeypatch.setenv(PARENT_ENV, parent.run_id)
        with stage_run("base", {"arch": {"layers": 6}, "seed": 0}) as run:
            run.log_step(10, {"loss": 2.0})
            run.log_step(20, {"loss": 1.0})
            run.log_metrics({"accuracy": {"add": 0.9}, "name": "not a number"})
            run.log_artifact(artifact)
    client = MlflowClient(uri)
    got = client.get_run(run.run_id)
    assert got.data.params == {"arch.layers": "6", "seed": "0"}
    assert got.data.metrics["accuracy.add"] == 0.9 and "name" not in got.data.metrics
    assert [m.value for m in client.get_metric_history(run.run_id, "loss")] == [2.0, 1.0]
    assert got.data.tags["slimforge.stage"] == "base"
    assert got.data.tags["mlflow.parentRunId"] == parent.run_id
    assert len(got.data.tags["git_commit"]) in (40, len("unknown"))
    assert [a.path for a in client.list_artifacts(run.run_id)] == ["metrics.json"]
    assert os.path.exists(tmp_path / "mlflow.db")
    assert mlflow.get_tracking_uri() == uri
