"""Training across processes (slimforge.distributed): on the CPU with gloo, 2 processes train like
one at the same global batch (DDP and FSDP2, full and LoRA, with micro-batches), a killed run resumes
on another number of processes, and a stage under SLIMFORGE_NPROC=2 writes from rank 0 only."""

import csv
import json
import os
import subprocess
import sys

import mlflow
import pytest
import yaml

from slimforge import SlimforgeError, distributed
from slimforge.batching import collate
from slimforge.training import label_tokens
from stages.base.stage import run as run_base
from stages.base.params import BaseParams, ModelParams
from slimforge.config import load_params, parse_params
from tests.conftest import REPO
from tests.distributed_train import examples, tiny_model, train

SCHEDULE = {"steps": 6, "lr": 0.01, "warmup_steps": 1, "batch_size": 8, "checkpoint_every": 3}


def torchrun(nproc: int, config: dict, out, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                           str(REPO / "tests" / "distributed_train.py"), json.dumps(config), str(out)],
                          capture_output=True, text=True, cwd=REPO, env={**os.environ, **(env or {})}, timeout=300)


def assert_same_run(a: dict, b: dict, tol: float = 1e-5) -> None:
    assert len(a["losses"]) == len(b["losses"]) == SCHEDULE["steps"]
    assert max(abs(x - y) for x, y in zip(a["losses"], b["losses"])) < tol
    worst = max(max(abs(x - y) for x, y in zip(a["weights"][k], b["weights"][k])) for k in a["weights"])
    assert worst < tol, f"weights differ by {worst}"


def test_rank_shares_concatenate_to_the_global_batch():
    batch = list(range(100, 112))
    for world in (1, 2, 3, 4, 5, 12):
        shares = [distributed.rank_slice(batch, world, r) for r in range(world)]
        assert sum(shares, []) == batch and max(map(len, shares)) - min(map(len, shares)) <= 1
    with pytest.raises(SlimforgeError, match="a batch of 12 sequences cannot feed 13 processes"):
        distributed.rank_slice(batch, 13, 0)
    assert distributed.even_parts([1, 2, 3], 4) == [[1], [2], [3], []]


def test_label_tokens_count_what_the_loss_averages_over():
    rows = examples(16) + [([5, 6, 7], 0)]  # an empty prompt: the first label has no predecessor
    labels = collate(rows, pad_id=0)["labels"]
    assert int((labels[:, 1:] != -100).sum()) == sum(label_tokens(ids, n) for ids, n in rows)


def test_auto_shards_only_what_exceeds_the_budget():
    model = tiny_model(lora=False)
    need = distributed.training_state_bytes(model)
    n = sum(p.numel() for p in model.parameters())
    assert need == n * 4 + n * 4 * 3  # fp32 weights, their gradients, AdamW's two moments
    assert distributed.choose_strategy(model, "auto", need / 2 ** 30 * 1.01) == "ddp"
    assert distributed.choose_strategy(model, "auto", need / 2 ** 30 * 0.99) == "fsdp"
    assert distributed.choose_strategy(model, "ddp", 1e-9) == "ddp"
    with pytest.raises(SlimforgeError, match="allowed: auto, ddp, fsdp"):
        distributed.choose_strategy(model, "zero3", 0)


def test_nproc_variable_is_checked(monkeypatch):
    monkeypatch.setenv(distributed.NPROC_ENV, "two")
    with pytest.raises(SlimforgeError, match="SLIMFORGE_NPROC='two': must be a whole number"):
        distributed.requested_nproc()
    monkeypatch.setenv(distributed.NPROC_ENV, "3")
    assert distributed.requested_nproc() == 3
    assert distributed.relaunch_command("stages.lora", ["--x", "1"], 3)[1:] == [
        "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=3", "-m", "stages.lora", "--x", "1"]


@pytest.mark.parametrize("shard, lora, micro, batch", [("ddp", False, 0, 8), ("fsdp", True, 2, 9), ("fsdp", False, 1, 9)])
def test_two_processes_train_like_one(shard, lora, micro, batch, tmp_path):
    """DDP with whole shares; FSDP2 with LoRA, micro-batches of 2 and uneven shares (5 + 4 rows in
    3 passes each); FSDP2 with micro-batches of 1 (5 passes each: the 4-row rank adds a weight-0 one)."""
    schedule = {**SCHEDULE, "batch_size": batch}
    one = train({"schedule": schedule, "lora": lora, "checkpoint_dir": str(tmp_path / "one")})
    config = {"schedule": {**schedule, "shard": shard, "micro_batch_size": micro}, "lora": lora,
              "checkpoint_dir": str(tmp_path / "two")}
    done = torchrun(2, config, tmp_path / "two.json")
    assert done.returncode == 0, done.stderr[-3000:]
    two = json.loads((tmp_path / "two.json").read_text())
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert_same_run(one, two)
    assert one["losses"][-1] != one["losses"][0]  # it trained


def test_killed_runs_resume_on_another_number_of_processes(tmp_path):
    whole = train({"schedule": SCHEDULE, "checkpoint_dir": str(tmp_path / "whole")})
    # 2 processes (FSDP2) die at step 5; one process resumes from their step-3 checkpoint
    two = {"schedule": {**SCHEDULE, "shard": "fsdp"}, "checkpoint_dir": str(tmp_path / "a"), "crash_at": 4}
    crashed = torchrun(2, two, tmp_path / "unused.json")
    assert crashed.returncode != 0 and "crash requested by the test" in crashed.stderr
    assert (tmp_path / "a" / "state.pt").is_file()
    resumed = train({"schedule": SCHEDULE, "checkpoint_dir": str(tmp_path / "a")})
    assert resumed["resumed_from"] == 3
    assert_same_run(whole, resumed)
    # one process dies at step 5; 2 processes (DDP) resume
    with pytest.raises(RuntimeError, match="crash requested"):
        train({"schedule": SCHEDULE, "checkpoint_dir": str(tmp_path / "b"), "crash_at": 4})
    done = torchrun(2, {"schedule": {**SCHEDULE, "shard": "ddp"}, "checkpoint_dir": str(tmp_path / "b")},
                    tmp_path / "b.json")
    assert done.returncode == 0, done.stderr[-3000:]
    resumed = json.loads((tmp_path / "b.json").read_text())
    assert resumed["resumed_from"] == 3 and resumed["world_size"] == 2
    assert_same_run(whole, resumed)


def _losses(plots) -> list[float]:
    with open(plots / "loss.csv") as f:
        return [float(row["loss"]) for row in csv.DictReader(f)]


def test_base_stage_under_two_processes_writes_once_and_matches_one(suite_dir, tmp_path):
    params = load_params(REPO / "params" / "base.yaml", BaseParams).model_dump()
    params = {**params, "preset": "test", "eval_batch_size": 32}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(params))
    (tmp_path / "model.yaml").write_text(yaml.safe_dump(ModelParams().model_dump()))
    single = run_base(ModelParams(), parse_params(params, BaseParams, "base.yaml"), suite_dir, tmp_path / "one",
                      tmp_path / "one.json", tmp_path / "one_plots")
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name("slimforge")
    before = len(client.search_runs([experiment.experiment_id]))
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    done = subprocess.run([sys.executable, "-m", "stages.base", "--model-params", str(tmp_path / "model.yaml"),
                           "--params", str(tmp_path / "base.yaml"), "--data", str(suite_dir),
                           "--out", str(tmp_path / "two"), "--metrics", str(tmp_path / "two.json"),
                           "--plots", str(tmp_path / "two_plots"), "--report", str(tmp_path / "two_report.json")], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, distributed.NPROC_ENV: "2", "TMPDIR": str(scratch)}, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("base:") == 1  # the summary line: rank 0 only
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == before + 1 and runs[0].data.tags["slimforge.stage"] == "base"
    assert not any(scratch.glob("slimforge-rank*"))  # rank 1 wrote into a scratch folder, now gone
    assert (tmp_path / "two" / "model.safetensors").is_file() and not (tmp_path / ".checkpoints" / "two").exists()
    one, two = _losses(tmp_path / "one_plots"), _losses(tmp_path / "two_plots")
    assert len(one) == len(two) == single["train"]["steps"]
    assert max(abs(a - b) for a, b in zip(one, two)) < 1e-4
    assert json.loads((tmp_path / "two_report.json").read_text())["train"]["world_size"] == 2
    metrics = json.loads((tmp_path / "two.json").read_text())
    assert abs(metrics["ppl"] - single["ppl"]) < 1e-3 * single["ppl"]


def test_rl_stage_under_two_processes_matches_one(suite_dir, tokenizer, tmp_path):
    """The rl loop split over 2 processes (3 prompts a step: shares of 2 and 1, LATR on the first
    of them, PPO-ptx replay rows split too) samples what one process samples and ends with the same
    adapter; only rank 0 writes."""
    from safetensors.torch import load_file

    from stages.rl.params import RlParams
    from stages.rl.stage import run as run_rl
    from tests.helpers import save_tiny

    base_dir = save_tiny("llama", tokenizer, tmp_path / "base")
    params = RlParams.model_validate({
        "start": "base", "rank": 2, "warmup": {"rows": 0}, "num_generations": 4, "max_completion_length": 3,
        "eval_batch_size": 64, "train": {"steps": 3, "batch_size": 3, "warmup_steps": 1},
        "latr": {"share_start": 0.34, "share_end": 0.34}, "ptx": {"coef": 0.5, "batch_size": 5},
        "reward": "tests.rl_rewards:odd_length", "beta": 0.1}).model_dump()
    (tmp_path / "rl.yaml").write_text(yaml.safe_dump(params))
    one = run_rl(RlParams.model_validate(params), base_dir, tmp_path / "no_lora", suite_dir, tmp_path / "one",
                 tmp_path / "one.json", tmp_path / "one_plots", tmp_path / "one_report.json")
    done = subprocess.run([sys.executable, "-m", "stages.rl", "--params", str(tmp_path / "rl.yaml"),
                           "--base", str(base_dir), "--lora", str(tmp_path / "no_lora"), "--data", str(suite_dir),
                           "--out", str(tmp_path / "two"), "--metrics", str(tmp_path / "two.json"),
                           "--plots", str(tmp_path / "two_plots"), "--report", str(tmp_path / "two_report.json")],
                          capture_output=True, text=True, cwd=REPO, env={**os.environ, distributed.NPROC_ENV: "2"},
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("rl:") == 1
    two = json.loads((tmp_path / "two_report.json").read_text())
    steps_one, steps_two = one["rl"]["history"], two["rl"]["history"]
    assert len(steps_two) == 3 and all(h["samples"] > 0 for h in steps_one)  # every step updated
    for a, b in zip(steps_one, steps_two):
        assert a["reward"] == b["reward"] and a["completion_length"] == b["completion_length"]  # the same draws
        assert a["samples"] == b["samples"] and abs(a["loss"] - b["loss"]) < 1e-5
    assert one["rl"]["latr"] == two["rl"]["latr"] and one["rl"]["latr"]["latr_prompts"] == 3
    a, b = (load_file(tmp_path / d / "adapter" / "adapter_model.safetensors") for d in ("one", "two"))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
    assert any(float(b[k].abs().max()) > 0 for k in b if "lora_B" in k)  # it trained
