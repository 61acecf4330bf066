"""End to end in a temporary clone: `dvc repro` of every stage on a tiny profile, a second
`dvc repro` that runs nothing, and the Prefect flow under prefect_test_harness."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.conftest import REPO

TINY_DATA = {"train_per_family": {"add": 150, "sub": 150, "mul": 150}, "val_per_family": 10,
             "test_per_family": 15, "judge_train": 60, "judge_test": 20,
             "lora": {"train": 10, "val": 5, "test": 10}, "rl": {"train": 10, "test": 10},
             "noisy": {"families": ["add3"], "size": 40, "wrong_fraction": 0.3}, "references": 10}


TINY_PRUNE = {"calibration": {"files": ["train.jsonl"], "samples": 32, "max_len": 32, "batch_size": 16},
              "search": {"rounds": 1, "levels": 1, "generations": 2, "population": 4, "offspring": 4,
                         "stages": [1.0]}, "eval_batch_size": 64}
TINY_QUANTIZE = {"calibration": {"files": ["train.jsonl"], "samples": 8, "max_len": 32, "batch_size": 1},
                 "rank": 2, "lq_iters": 2, "lrec": {"steps": 4, "batch_size": 8, "checkpoint_every": 0},
                 "eval_batch_size": 64}
TINY_FILTER = {"references": 3, "downstream": {"steps": 5, "batch_size": 8}, "batch_size": 64}
TINY_LORA = {"train": {"steps": 5, "batch_size": 8, "warmup_steps": 1, "checkpoint_every": 0},
             "align": {"steps": 3, "batch_size": 8}, "eval_batch_size": 64}


def _git(*args, cwd):
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True)


def _source_files() -> list[str]:
    """What git would commit: tracked plus untracked-but-not-ignored files. A checkout without
    git metadata falls back to every file outside the generated folders."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
                            cwd=REPO, capture_output=True, text=True)
    if listed.returncode == 0:
        return [f for f in listed.stdout.split("\0") if f]
    def wanted(rel: Path) -> bool:
        top = rel.parts[0]
        if len(rel.parts) > 1 and top.startswith(".") and top not in (".dvc", ".ci"):
            return False  # .git, caches, local scratch folders
        return (top not in ("data", "mlruns", "mlartifacts") and "__pycache__" not in rel.parts
                and rel.parts[:2] not in ((".dvc", "tmp"), (".dvc", "cache")) and rel.name != "mlflow.db")

    return [str(p.relative_to(REPO)) for p in REPO.rglob("*") if p.is_file() and wanted(p.relative_to(REPO))]

@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    """The working tree's tracked and untracked-but-not-ignored files, committed in a new repo,
    with the tiny profile written into its params files."""
    dst = tmp_path_factory.mktemp("clone")
    for rel in _source_files():
        if (REPO / rel).is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, dst / rel)
    data = yaml.safe_load((dst / "params/data.yaml").read_text()) | TINY_DATA
    (dst / "params/data.yaml").write_text(yaml.safe_dump(data))
    base = yaml.safe_load((dst / "params/base.yaml").read_text()) | {"preset": "test"}
    (dst / "params/base.yaml").write_text(yaml.safe_dump(base))
    prune = yaml.safe_load((dst / "params/prune.yaml").read_text()) | TINY_PRUNE
    (dst / "params/prune.yaml").write_text(yaml.safe_dump(prune))
    quantize = yaml.safe_load((dst / "params/quantize.yaml").read_text()) | TINY_QUANTIZE
    (dst / "params/quantize.yaml").write_text(yaml.safe_dump(quantize))
    filt = yaml.safe_load((dst / "params/filter.yaml").read_text()) | TINY_FILTER
    (dst / "params/filter.yaml").write_text(yaml.safe_dump(filt))
    lora = yaml.safe_load((dst / "params/lora.yaml").read_text()) | TINY_LORA
    (dst / "params/lora.yaml").write_text(yaml.safe_dump(lora))
    _git("init", "-q", cwd=dst)
    _git("add", "-A", cwd=dst)
    _git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "tiny profile", cwd=dst)
    return dst


def _repro(clone):
    return subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=clone, capture_output=True, text=True)


def test_dvc_repro_then_nothing_to_do(clone):
    first = _repro(clone)
    assert first.returncode == 0, first.stdout + first.stderr
    assert all(f"Running stage '{s}'" in first.stdout for s in ("data", "base", "prune", "quantize", "filter", "lora"))
    metrics = json.loads((clone / "metrics/base.json").read_text())
    assert set(metrics["accuracy"]) >= {"add", "sub", "mul"} and metrics["train"]["steps"] == 30
    assert (clone / "data/base/model.safetensors").exists() and (clone / "dvc.lock").exists()
    assert (clone / "data/labels/noisy_labels.jsonl").exists()
    assert (clone / "data/pruned/plan.json").exists() and (clone / "metrics/prune.json").exists()
    quantized = json.loads((clone / "metrics/quantize.json").read_text())
    assert quantized["final"] == "lq_lora_lrec" and (clone / "data/quantized/quantization.json").exists()
    filtered = json.loads((clone / "metrics/filter.json").read_text())
    assert "meta_ranking" in filtered["detection"] and (clone / "data/filtered/filtered.jsonl").exists()
    lora = json.loads((clone / "metrics/lora.json").read_text())
    assert {"recovered", "full_lora"} <= set(lora["results"]) and (clone / "data/lora/adapter/adapter_config.json").exists()
    second = _repro(clone)
    assert second.returncode == 0 and "Running stage" not in second.stdout, second.stdout


def test_prefect_flow_runs_stages_under_one_mlflow_parent(clone, monkeypatch):
    from prefect.testing.utilities import prefect_test_harness

    from flows.pipeline import pipeline

    data = yaml.safe_load((clone / "params/data.yaml").read_text())
    (clone / "params/data.yaml").write_text(yaml.safe_dump({**data, "seed": 1}))  # make both stale
    with prefect_test_harness():
        results = pipeline(root=str(clone))
        from prefect.artifacts import Artifact

        artifact = Artifact.get("slimforge-stage-metrics")
    assert set(results) == {"data", "base", "prune", "quantize", "filter", "lora"}
    assert results["base"]["train"]["steps"] == 30
    assert artifact is not None and "accuracy_base" in str(artifact.data)
    import os

    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("slimforge")
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"])
    parent = next(r for r in runs if r.data.tags.get("slimforge.stage") == "pipeline")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.data.tags["slimforge.stage"] for r in children) == ["base", "data", "filter", "lora", "prune", "quantize"]
