"""The Prefect flow on a toy two-stage DVC repo: a one-row-per-stage summary table, MLflow logging of
only the stages that ran, no MLflow run when everything is up to date, and the shipped prefect.yaml.

    python -m pytest -q tests/test_flow.py
"""

import inspect
import json
import sys
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
import yaml
from mlflow.tracking import MlflowClient

from flows.pipeline import BadInput, headline, pipeline
from tests.conftest import REPO
from tests.helpers import prefect_harness

STAGE = """import json, pathlib, sys
name = sys.argv[1]
if pathlib.Path(f"{name}.params").read_text() == "bad":
    sys.exit(print(f"error: params/{name}.yaml: unknown key lerning_rate", file=sys.stderr) or 2)
pathlib.Path(f"{name}.txt").write_text(name)
pathlib.Path("metrics").mkdir(exist_ok=True)
pathlib.Path(f"metrics/{name}.json").write_text(json.dumps({"acc": 0.5, "kind": "toy", "per": {"x": 1}}))
"""


@pytest.fixture(scope="module")
def harness():
    with prefect_harness():
        yield


@pytest.fixture
def toy(tmp_path, monkeypatch):
    """Stages a -> b, each `python stage.py NAME` reading NAME.params; MLflow in tmp_path."""
    import subprocess

    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / "stage.py").write_text(STAGE)
    for name in "ab":
        (tmp_path / f"{name}.params").write_text("1")
    stage = lambda name, deps: {"cmd": f"{sys.executable} stage.py {name}", "deps": ["stage.py", f"{name}.params", *deps],
                                "outs": [f"{name}.txt"], "metrics": [{f"metrics/{name}.json": {"cache": False}}]}
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"a": stage("a", []), "b": stage("b", ["a.txt"])}}))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    return tmp_path


def _table() -> dict[str, dict]:
    from prefect.artifacts import Artifact

    data = Artifact.get("slimforge-stage-metrics").data
    return {row["stage"]: row for row in (json.loads(data) if isinstance(data, str) else data)}


def _parents(root) -> list:
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("slimforge")
    return [] if exp is None else client.search_runs([exp.experiment_id], "tags.`slimforge.stage` = 'pipeline'",
                                                     order_by=["attributes.start_time DESC"])


def test_flow_logs_only_what_ran(toy, harness):
    pipeline(root=str(toy))  # both stages are new
    table = _table()
    assert [table[s]["status"] for s in "ab"] == ["ran", "ran"] and len(table) == 2
    assert table["a"]["metrics"] == "acc=0.5 per.x=1" and table["a"]["seconds"] >= 0
    (parent,) = _parents(toy)
    assert parent.data.tags["slimforge.stages_ran"] == "a,b"
    assert set(parent.data.metrics) == {"a.acc", "a.per.x", "b.acc", "b.per.x"}

    pipeline(root=str(toy))  # nothing stale: no MLflow run, the table says so
    assert len(_parents(toy)) == 1
    assert [_table()[s]["status"] for s in "ab"] == ["up to date", "up to date"]

    (toy / "b.params").write_text("2")  # only b is stale
    pipeline(root=str(toy))
    table = _table()
    assert [table[s]["status"] for s in "ab"] == ["up to date", "ran"]
    newest = _parents(toy)[0]
    assert newest.data.tags["slimforge.stages_ran"] == "b" and set(newest.data.metrics) == {"b.acc", "b.per.x"}


def test_selected_stage_reports_the_upstream_it_ran_and_a_failure(toy, harness):
    pipeline(["a"], root=str(toy))
    assert list(_table()) == ["a"]
    (toy / "a.params").write_text("2")
    (toy / "b.params").write_text("bad")
    with pytest.raises(BadInput, match="stage b: params/b.yaml: unknown key lerning_rate"):
        pipeline(["b"], root=str(toy))  # DVC reruns a first, then b refuses its params
    table = _table()
    assert table["a"]["status"] == "ran" and table["b"]["status"] == "failed"
    assert _parents(toy)[0].info.status == "FAILED"


def test_headline_is_short_numeric_and_one_level_deep():
    metrics = {"accuracy": {"add": 0.91, "sub": {"deep": 1}}, "ppl": 1.0293, "ok": True, "model": "pruned",
               "rounds": [1, 2], "rows": 20000}
    assert headline(metrics) == "ppl=1.029 rows=20000 accuracy.add=0.91"
    long = headline({f"metric_{i}": i / 7 for i in range(40)}, limit=60)
    assert len(long) <= 60 and long.endswith(" …") and long.startswith("metric_0=0 metric_1=0.1429")


def test_prefect_yaml_deploys_the_pipeline_on_a_schedule():
    from prefect.cli.deploy._models import PrefectYamlModel  # what `prefect deploy` validates with
    from prefect.cli.deploy._schedules import _schedule_config_to_deployment_schedule
    from prefect.flows import load_flow_from_entrypoint

    raw = yaml.safe_load((REPO / "prefect.yaml").read_text())
    (deployment,) = PrefectYamlModel.model_validate(raw).deployments
    path, name = deployment.entrypoint.split(":")
    flow = load_flow_from_entrypoint(str(REPO / deployment.entrypoint))
    assert flow.name == pipeline.name and name == "pipeline" and Path(inspect.getfile(flow.fn)) == REPO / path
    (schedule,) = raw["deployments"][0]["schedules"]
    cron = _schedule_config_to_deployment_schedule(schedule)["schedule"]  # croniter checks the cron
    assert cron.cron == schedule["cron"] and ZoneInfo(cron.timezone).key == schedule["timezone"]
    inspect.signature(pipeline.fn).bind(**deployment.parameters)
    pipeline.validate_parameters(deployment.parameters)
    pool = deployment.work_pool.name
    assert pool and f"prefect work-pool create {pool} --type process" in (REPO / "README.md").read_text()
