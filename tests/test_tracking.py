"""MLflow: one run per stage with params, step metrics, tags, inputs and artifacts, nested under a
parent; one store per checkout (queued DVC experiments included), relocatable artifacts, and runs
that end KILLED/FAILED when their stage dies."""

import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from slimforge.io import content_hash, file_hash
from slimforge.tracking import (
    PARENT_ENV,
    mark_dead_runs_killed,
    pipeline_run,
    stage_run,
    store_root,
    tracking_uri,
    workspace_root,
)

REPO = Path(__file__).resolve().parents[1]


def _git(repo, *args):
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, check=True,
                   capture_output=True)


@pytest.fixture
def toy_repo(tmp_path, monkeypatch):
    """A git + DVC checkout with a dvc.lock and an input, as the working directory, logging into
    its own default store (no MLFLOW_TRACKING_URI, no DVC variables)."""
    repo = tmp_path / "repo"
    (repo / ".dvc").mkdir(parents=True)
    (repo / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
    (repo / "in.txt").write_text("hello\n")
    (repo / "model").mkdir()
    (repo / "model" / "w.bin").write_bytes(b"\0\1")
    _git(repo, "init", "-q")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "init")
    for var in ("MLFLOW_TRACKING_URI", "DVC_ROOT", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV", "DVC_STAGE", PARENT_ENV):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(repo)
    return repo


def _client(root: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{root / 'mlflow.db'}")


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
    assert got.info.status == "FINISHED"
    assert got.data.params == {"arch.layers": "6", "seed": "0"}
    assert got.data.metrics["accuracy.add"] == 0.9 and "name" not in got.data.metrics
    assert [m.value for m in client.get_metric_history(run.run_id, "loss")] == [2.0, 1.0]
    assert got.data.tags["slimforge.stage"] == "base"
    assert got.data.tags["mlflow.parentRunId"] == parent.run_id
    assert len(got.data.tags["mlflow.source.git.commit"]) == 40  # MLflow's tag, filled from the repo
    assert [a.path for a in client.list_artifacts(run.run_id)] == ["metrics.json"]
    assert Path(got.info.artifact_uri).is_relative_to(tmp_path / "mlartifacts")  # beside the store
    assert mlflow.get_tracking_uri() == uri


def test_store_is_at_the_repo_root_whatever_the_working_directory(toy_repo, monkeypatch):
    (toy_repo / "stages" / "x").mkdir(parents=True)
    monkeypatch.chdir(toy_repo / "stages" / "x")
    assert tracking_uri() == f"sqlite:///{toy_repo / 'mlflow.db'}"
    # a queued or --temp experiment runs in a copy (a checkout of its own) under .dvc/tmp/exps
    copy = toy_repo / ".dvc" / "tmp" / "exps" / "tmpab12cd"
    (copy / ".dvc").mkdir(parents=True)
    monkeypatch.chdir(copy)
    assert workspace_root() == copy  # where dvc.lock and the code are read
    assert store_root() == toy_repo  # where the run is logged
    monkeypatch.setenv("DVC_ROOT", str(toy_repo))  # what DVC exports to the stage (also for queued runs)
    monkeypatch.chdir(toy_repo.parent)
    assert store_root() == toy_repo
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///elsewhere.db")
    assert tracking_uri() == "sqlite:///elsewhere.db"


def test_a_queued_experiment_logs_into_the_original_store(toy_repo, monkeypatch):
    copy = toy_repo / ".dvc" / "tmp" / "exps" / "tmpab12cd"
    shutil.copytree(toy_repo, copy, ignore=shutil.ignore_patterns(".dvc"))
    (copy / ".dvc").mkdir()
    monkeypatch.chdir(copy)
    monkeypatch.setenv("DVC_EXP_NAME", "bared-impi")
    monkeypatch.setenv("DVC_ROOT", str(toy_repo))
    with stage_run("toy", {}) as run:
        run.log_artifact(copy / "in.txt")
    got = _client(toy_repo).get_run(run.run_id)
    assert got.data.tags["dvc.exp_name"] == "bared-impi"
    assert Path(got.info.artifact_uri).is_relative_to(toy_repo / "mlartifacts")
    assert not (copy / "mlflow.db").exists() and not (copy / "mlartifacts").exists()


def test_a_moved_or_copied_repo_writes_artifacts_under_its_own_root(toy_repo, tmp_path, monkeypatch):
    with stage_run("toy", {}) as first:
        first.log_artifact(toy_repo / "in.txt")
    moved = tmp_path / "moved"
    shutil.move(toy_repo, moved)
    monkeypatch.chdir(moved)
    with stage_run("toy", {}) as second:
        second.log_artifact(moved / "in.txt")
    client = _client(moved)
    got = client.get_run(second.run_id)
    assert Path(got.info.artifact_uri).is_relative_to(moved / "mlartifacts")
    assert [a.path for a in client.list_artifacts(second.run_id)] == ["in.txt"]
    assert not toy_repo.exists()  # nothing written into the old place
    old = client.get_run(first.run_id)  # the history stays, in the renamed experiment
    assert client.get_experiment(old.info.experiment_id).name.startswith("slimforge (artifacts in ")
    assert client.get_experiment_by_name("slimforge").experiment_id == got.info.experiment_id


def test_tags_and_inputs(toy_repo, monkeypatch):
    monkeypatch.setenv("DVC_EXP_NAME", "ws5")
    monkeypatch.setenv("DVC_STAGE", "toy")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=toy_repo, check=True, capture_output=True,
                          text=True).stdout.strip()
    with stage_run("toy", {}, inputs=[Path("in.txt"), toy_repo / "model", [{"prompt": "in memory"}],
                                      Path("missing")]) as run:
        pass
    got = _client(toy_repo).get_run(run.run_id)
    tags = got.data.tags
    assert tags["mlflow.source.git.commit"] == head
    assert tags["dvc.exp_name"] == "ws5" and tags["dvc.stage"] == "toy"
    assert tags["slimforge.dvc_lock"] == file_hash(toy_repo / "dvc.lock")
    assert tags["slimforge.host"] == socket.gethostname() and tags["slimforge.pid"] == str(os.getpid())
    inputs = {d.dataset.name: d for d in got.inputs.dataset_inputs}
    assert set(inputs) == {"in.txt", "model"}
    full = content_hash(toy_repo / "model")
    assert inputs["model"].dataset.digest == full[:36]
    assert {t.key: t.value for t in inputs["model"].tags}["sha256"] == full


def test_more_than_100_params_in_one_call(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    with stage_run("wide", {"p": {str(i): i for i in range(250)}}) as run:
        pass
    assert len(MlflowClient().get_run(run.run_id).data.params) == 250


def test_a_crash_ends_failed_and_ctrl_c_killed(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = {}
    for name, exc in (("crash", ValueError("bad")), ("ctrl-c", KeyboardInterrupt())):
        with pytest.raises(type(exc)), stage_run(name, {}) as run:
            runs[name] = run.run_id
            raise exc
    client = MlflowClient()
    assert client.get_run(runs["crash"]).info.status == "FAILED"
    assert client.get_run(runs["ctrl-c"]).info.status == "KILLED"
    assert mlflow.active_run() is None


def test_sigterm_ends_the_run_killed(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    script = ("import time\nfrom slimforge.tracking import stage_run\n"
              "with stage_run('slow', {}) as run:\n    print(run.run_id, flush=True)\n    time.sleep(60)\n")
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    run_id = proc.stdout.readline().strip()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    assert MlflowClient(uri).get_run(run_id).info.status == "KILLED"


def test_runs_of_dead_processes_on_this_host_become_killed(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with stage_run("first", {}):  # creates the store and experiment
        pass
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("slimforge").experiment_id
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer exists: the SIGKILLed stage
    host = socket.gethostname()
    made = {}
    for name, tags in (("sigkilled", {"slimforge.host": host, "slimforge.pid": str(dead.pid)}),
                       ("alive", {"slimforge.host": host, "slimforge.pid": str(os.getpid())}),
                       ("other host", {"slimforge.host": host + "-other", "slimforge.pid": str(dead.pid)})):
        made[name] = client.create_run(exp, tags=tags).info.run_id  # RUNNING
    with stage_run("next", {}):
        pass
    status = {name: client.get_run(run_id).info.status for name, run_id in made.items()}
    assert status == {"sigkilled": "KILLED", "alive": "RUNNING", "other host": "RUNNING"}
    assert mark_dead_runs_killed(client) == []


def test_tests_leave_nothing_in_the_repo(monkeypatch, tmp_path):
    """The autouse fixture's store is outside the repo, and so are its artifacts, even when a test
    runs from the repo root."""
    def tracking_files():
        return {p for name in ("mlruns", "mlartifacts", "mlflow.db") for p in REPO.glob(f"{name}/**/*")} | \
            {p for name in ("mlruns", "mlartifacts", "mlflow.db") if (p := REPO / name).exists()}

    before = tracking_files()
    monkeypatch.chdir(REPO)
    artifact = tmp_path / "m.json"
    artifact.write_text("{}")
    with stage_run("toy", {}) as run:
        run.log_artifact(artifact)
    got = MlflowClient().get_run(run.run_id)
    assert not Path(got.info.artifact_uri).is_relative_to(REPO)
    assert tracking_files() == before
