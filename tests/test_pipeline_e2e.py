"""End to end in a temporary clone: `dvc repro` of every stage on a tiny profile, a second
`dvc repro` that runs nothing, and the Prefect flow under prefect_test_harness."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.helpers import copy_source_tree, git_commit_all, prefect_harness

TINY_DATA = {"train_per_family": {"add": 150, "sub": 150, "mul": 150}, "val_per_family": 10,
             "test_per_family": 15, "judge_train": 60, "judge_test": 20,
             "lora": {"train": 10, "val": 5, "test": 10}, "rl": {"train": 10, "val": 5, "test": 10},
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


TINY_RL = {"warmup": {"rows": 6, "steps": 3, "batch_size": 8, "checkpoint_every": 0},
           "train": {"steps": 3, "batch_size": 2, "warmup_steps": 1, "checkpoint_every": 0},
           "num_generations": 2, "max_completion_length": 3, "eval_batch_size": 64}


TINY = {"data": TINY_DATA, "base": {"preset": "test"}, "prune": TINY_PRUNE, "quantize": TINY_QUANTIZE,
        "filter": TINY_FILTER, "lora": TINY_LORA, "rl": TINY_RL, "package": {"name": "slimforge-e2e", "eval_batch_size": 64},
        "report": {"new_tokens": 8, "repeats": 1}}
STAGES = ("data", "base", "prune", "quantize", "filter", "lora", "rl", "package", "report")


def write_params(clone: Path, updates: dict[str, dict]) -> None:
    """Merge `updates` (top-level keys per params file) into the clone's params files."""
    for name, changes in updates.items():
        path = clone / "params" / f"{name}.yaml"
        path.write_text(yaml.safe_dump(yaml.safe_load(path.read_text()) | changes))


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    """The working tree's tracked and untracked-but-not-ignored files, committed in a new repo,
    with the tiny profile written into its params files."""
    dst = copy_source_tree(tmp_path_factory.mktemp("clone"))
    write_params(dst, TINY)
    git_commit_all(dst, "tiny profile")
    return dst


def _repro(clone):
    return subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=clone, capture_output=True, text=True)


def test_dvc_repro_then_nothing_to_do(clone):
    first = _repro(clone)
    assert first.returncode == 0, first.stdout + first.stderr
    assert all(f"Running stage '{s}'" in first.stdout for s in STAGES)
    metrics, report = (json.loads((clone / f"{d}/base.json").read_text()) for d in ("metrics", "reports"))
    assert set(metrics["accuracy"]) >= {"add", "sub", "mul"} and report["train"]["steps"] == 30
    assert "train" not in metrics and "eval_seconds" not in metrics  # timings stay out of `dvc metrics show`
    assert report["accuracy"] == metrics["accuracy"]
    assert (clone / "data/base/model.safetensors").exists() and (clone / "dvc.lock").exists()
    assert (clone / "data/labels/noisy_labels.jsonl").exists()
    assert (clone / "data/pruned/plan.json").exists() and (clone / "metrics/prune.json").exists()
    quantized = json.loads((clone / "reports/quantize.json").read_text())
    assert quantized["final"] == "lq_lora_lrec" and (clone / "data/quantized/quantization.json").exists()
    filtered = json.loads((clone / "metrics/filter.json").read_text())
    assert {"meta_ranking", "direct", "perplexity"} <= set(filtered["detection"])  # judged by the lora adapter
    assert (clone / "data/filtered/filtered.jsonl").exists()
    lora = json.loads((clone / "metrics/lora.json").read_text())
    assert {"recovered", "full_lora"} <= set(lora["results"]) and (clone / "data/lora/adapter/adapter_config.json").exists()
    rl = json.loads((clone / "metrics/rl.json").read_text())
    assert set(rl["results"]) == {"start", "warmup", "rl"} and (clone / "data/rl/adapter/adapter_config.json").exists()
    package = json.loads((clone / "reports/package.json").read_text())
    assert package["deployables"] == ["adapters/lora", "adapters/rl", "compact", "full"]
    assert package["registry"]["version"] == "1" and package["registry"]["promoted"]
    assert (clone / "data/package/full/README.md").exists()
    report_md = (clone / "reports/report.md").read_text()
    assert "| shipped: package/full |" in report_md and (clone / "plots/report/size_accuracy.png").exists()
    second = _repro(clone)
    assert second.returncode == 0 and "Running stage" not in second.stdout, second.stdout
    write_params(clone, {"data": {**TINY_DATA, "lora": {**TINY_DATA["lora"], "train": 12}}})  # new LoRA rows only
    third = _repro(clone)
    assert third.returncode == 0, third.stdout + third.stderr
    ran = {s for s in STAGES if f"Running stage '{s}'" in third.stdout}
    assert ran == {"data", "lora", "filter", "rl", "package", "report"}, third.stdout  # per-file deps: only lora
    # and rl (replay) read lora_train; filter judges with the lora adapter; package and report take their outputs


def test_prefect_flow_runs_stages_under_one_mlflow_parent(clone, monkeypatch):
    from flows.pipeline import pipeline

    # a lora evaluation param: lora reruns, its adapter comes out byte-identical, so DVC reruns only
    # what reads its metrics (package, report), not filter or rl (they read the adapter)
    write_params(clone, {"lora": {**TINY_LORA, "eval_batch_size": 32}})
    with prefect_harness():
        results = pipeline(root=str(clone))
        from prefect.artifacts import Artifact

        artifact = Artifact.get("slimforge-stage-metrics")
        report_artifact = Artifact.get("slimforge-report")
    assert set(results) == set(STAGES)
    assert "accuracy_base" in results["base"] and "train" not in results["base"]  # the flow reads the headline files
    assert json.loads((clone / "reports/base.json").read_text())["train"]["steps"] == 30
    assert artifact is not None and "accuracy_base" in str(artifact.data)
    assert report_artifact is not None and "| shipped: package/full |" in str(report_artifact.data)
    import os

    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("slimforge")
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"])
    parent = next(r for r in runs if r.data.tags.get("slimforge.stage") == "pipeline")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    ran = parent.data.tags["slimforge.stages_ran"].split(",")
    assert set(ran) == {"lora", "package", "report"}
    assert sorted(r.data.tags["slimforge.stage"] for r in children) == sorted(ran)


def test_sweep_flow_reuses_upstream_stages_registers_its_best_and_resumes(clone):
    """Two points that differ only in a report param: each reruns package and report alone (DVC
    restores the rest), the best point within the budget is registered through the package stage,
    and after a point's experiment is lost (a killed run) a rerun runs only that point."""
    import subprocess as sp

    from flows.sweep import finished_points, sweep

    def commit(message):  # the earlier tests left params and outputs changed: the sweep's baseline is this
        sp.run(["git", "add", "-A"], cwd=clone, check=True)
        sp.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", message, "--allow-empty"],
               cwd=clone, check=True)

    assert _repro(clone).returncode == 0
    commit("baseline for the sweep")
    (clone / "params/sweep.yaml").write_text(yaml.safe_dump({
        "name": "tiny", "grid": {"params/report.yaml:repeats": [1, 2]}, "models": ["pruned", "quantized", "full"],
        "budget": {"max_mb": 1000}, "out": "sweeps"}))
    with prefect_harness():
        first = sweep(root=str(clone))
        assert [p["status"] for p in first["points"]] == ["ran", "ran"]
        # package reruns too: a point turns register_model off (the sweep registers only its best point)
        assert all(p["stages_ran"] == ["package", "report"] for p in first["points"]), first["points"]
        assert (clone / "sweeps/tiny/frontier.png").exists() and "**yes**" in (clone / "sweeps/tiny/frontier.md").read_text()
        assert first["best"]["model"] in ("pruned", "quantized", "full")
        assert first["registered"]["registered"]["aliases"][0] == "challenger"
        lost = first["points"][1]["name"]
        sp.run(["git", "update-ref", "-d", finished_points(clone)[lost]], cwd=clone, check=True)
        second = sweep(root=str(clone))
    statuses = {p["name"]: p["status"] for p in second["points"]}
    assert statuses == {first["points"][0]["name"]: "finished before", lost: "ran"}
    shown = sp.run([sys.executable, "-m", "dvc", "exp", "show", "--csv"], cwd=clone, capture_output=True, text=True)
    assert all(p["name"] in shown.stdout for p in first["points"])
