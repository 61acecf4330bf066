"""The rl stage end to end on the tiny profile: metrics, adapter, resume after a kill, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from slimforge import SlimforgeError
from slimforge.adapters import add_lora
from stages.rl.params import RlParams
from tests.conftest import REPO
from tests.helpers import save_tiny

SMALL = {"start": "base", "rank": 2, "warmup": {"rows": 10, "steps": 4, "batch_size": 8, "checkpoint_every": 2},
         "train": {"steps": 4, "batch_size": 2, "warmup_steps": 1, "checkpoint_every": 2},
         "num_generations": 4, "max_completion_length": 3, "eval_batch_size": 64}


def _params(**over) -> RlParams:
    return RlParams.model_validate({**SMALL, **over})


def _run(params, base_dir, suite_dir, out, lora=None):
    from stages.rl.stage import run

    return run(params, base_dir, lora or out.parent / "no_lora", suite_dir, out, out.parent / f"{out.name}.json",
               out.parent / f"{out.name}_plots", out.parent / f"{out.name}_report.json")


def test_stage_end_to_end_from_the_lora_adapter(tmp_path, suite_dir, tokenizer):
    base_dir = save_tiny("llama", tokenizer, tmp_path / "base")
    from slimforge.modeling import load_model

    model, _ = load_model(base_dir)
    lora = add_lora(model, 2, 4.0, ["q_proj", "v_proj"], seed=1)
    with torch.no_grad():  # a non-zero adapter, so merging it changes the start model
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    lora.save_pretrained(tmp_path / "lora" / "adapter")
    m = _run(_params(start="lora"), base_dir, suite_dir, tmp_path / "rl", lora=tmp_path / "lora")
    assert list(m["results"]) == ["start", "warmup", "rl"]
    for r in m["results"].values():
        assert 0 <= r["accuracy_rl"] <= 1 and r["n"]["chain"] == 20 and r["n"]["add3"] == 20
        assert r["ci95"]["accuracy_rl"]["lo"] <= r["accuracy_rl"] <= r["ci95"]["accuracy_rl"]["hi"]
        assert 0 <= r["accuracy_rl_val"] <= 1
    rl = m["rl"]
    assert rl["steps"] == 4 and rl["staleness"] == {0: 4} and rl["samples_per_s"] >= 0
    assert rl["rollout_tokens_per_s"] > 0 and rl["failed_rewards"] == 0
    assert m["gain_rl_test"] == pytest.approx(m["results"]["rl"]["accuracy_rl"] - m["results"]["warmup"]["accuracy_rl"])
    adapter = tmp_path / "rl" / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file()
    assert json.loads((adapter / "merge_first.json").read_text())["merge_first"] == str(tmp_path / "lora" / "adapter")
    headline = json.loads((tmp_path / "rl.json").read_text())
    assert {"accuracy_rl", "accuracy_rl_val", "accuracy_base"} <= headline["results"]["rl"].keys()
    assert "samples_per_s" in headline["rl"] and "history" not in headline["rl"]
    assert (tmp_path / "rl_plots" / "reward.csv").read_text().startswith("step,reward,correct,kept groups")


def test_a_killed_run_resumes_to_the_same_adapter(tmp_path, suite_dir, tokenizer, monkeypatch):
    from slimforge.rl import trainer

    base_dir = save_tiny("llama", tokenizer, tmp_path / "base")
    params = _params(warmup={"rows": 0}, beta=0.1)  # the KL reference and the ptx rows survive the kill too
    real, calls = trainer.make_batch, []

    def dies_at_step_3(model, tok, spec, step, version, part):
        calls.append(step)
        if step == 3 and len(calls) == 4:
            raise KeyboardInterrupt  # the process dies after the checkpoint at step 2
        return real(model, tok, spec, step, version, part)

    monkeypatch.setattr(trainer, "make_batch", dies_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        _run(params, base_dir, suite_dir, tmp_path / "rl")
    assert not (tmp_path / "rl").exists() and (tmp_path / ".checkpoints" / "rl" / "rl").exists()
    resumed = _run(params, base_dir, suite_dir, tmp_path / "rl")
    assert resumed["rl"]["resumed_from"] == 2
    _run(params, base_dir, suite_dir, tmp_path / "again")
    a, b = (load_file(tmp_path / d / "adapter" / "adapter_model.safetensors") for d in ("rl", "again"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_asynchronous_mode_keeps_the_staleness_bound(tmp_path, suite_dir, tokenizer):
    base_dir = save_tiny("llama", tokenizer, tmp_path / "base")
    m = _run(_params(warmup={"rows": 0}, max_staleness=2), base_dir, suite_dir, tmp_path / "rl")
    assert sum(m["rl"]["staleness"].values()) == 4 and max(m["rl"]["staleness"]) <= 2


def test_a_failing_reward_is_skipped_and_counted(tmp_path, suite_dir, tokenizer):
    base_dir = save_tiny("llama", tokenizer, tmp_path / "base")
    m = _run(_params(warmup={"rows": 0}, reward="tests.rl_rewards:flaky"), base_dir, suite_dir, tmp_path / "rl")
    history = json.loads((tmp_path / "rl_report.json").read_text())["rl"]["history"]
    assert m["rl"]["failed_rewards"] == sum(h["failed"] for h in history) > 0
    assert all(h["kept"] < 1 for h in history if h["failed"])  # a group with a failed sample is left out


def test_bad_input_fails_before_any_work(tmp_path, suite_dir, tokenizer):
    base_dir = save_tiny("llama", tokenizer, tmp_path / "base")
    with pytest.raises(SlimforgeError, match="cannot import module 'nowhere'"):
        _run(_params(reward="nowhere:f"), base_dir, suite_dir, tmp_path / "rl")
    with pytest.raises(SlimforgeError, match="has no function 'nope'"):
        _run(_params(reward="slimforge.tasks.families:nope"), base_dir, suite_dir, tmp_path / "rl")
    with pytest.raises(SlimforgeError, match="exceeds the model's context of 128 tokens"):
        _run(_params(max_completion_length=125), base_dir, suite_dir, tmp_path / "rl")
    with pytest.raises(ValueError, match="module:function"):
        _params(reward="not a spec")
    with pytest.raises(ValueError, match="epsilon_high"):
        _params(epsilon=0.3, epsilon_high=0.2)
    assert not (tmp_path / "rl").exists()


def test_a_nan_loss_stops_and_keeps_the_last_checkpoint(tmp_path, suite_dir, tokenizer, monkeypatch):
    from slimforge.rl import trainer

    base_dir = save_tiny("llama", tokenizer, tmp_path / "base")
    real, seen = trainer.policy_loss, []

    def nan_at_step_3(*a, **k):
        seen.append(1)
        loss, logs = real(*a, **k)
        return (loss * float("nan"), logs) if len(seen) >= 3 else (loss, logs)

    monkeypatch.setattr(trainer, "policy_loss", nan_at_step_3)
    params = _params(warmup={"rows": 0}, dynamic_sampling=False)  # every step updates
    with pytest.raises(SlimforgeError, match="the loss is nan at step 3; the last checkpoint is kept"):
        _run(params, base_dir, suite_dir, tmp_path / "rl")
    assert not (tmp_path / "rl").exists()
    assert any((tmp_path / ".checkpoints" / "rl" / "rl").iterdir())  # step 2's state, for the rerun


def test_the_probe_reads_only_validation_files_and_reports_both_phases(tmp_path, suite_dir, tokenizer, monkeypatch):
    import sys

    from experiments.rl_probe import VAL_FILES, probe

    base_dir = save_tiny("llama", tokenizer, tmp_path / "base")
    opened, recording = [], [True]  # every file opened, whichever module opens it (an audit hook)
    sys.addaudithook(lambda event, args: opened.append(str(args[0])) if recording[0] and event == "open" else None)
    monkeypatch.chdir(REPO)  # the probe merges its configs onto params/rl.yaml
    config = {**SMALL, "warmup": {**SMALL["warmup"], "rows": 4}}
    try:
        result = probe(config, str(base_dir), str(tmp_path / "no_lora"), str(suite_dir), 1, str(tmp_path / "ck"))
    finally:
        recording[0] = False
    assert set(result["warmup"]) == set(result["rl"]) == {*VAL_FILES, *(f"{k}_ci95" for k in VAL_FILES)}
    assert len(result["train"]["correct_curve"]) == 4
    suite_reads = {Path(p).name for p in opened if Path(p).parent == suite_dir}
    assert {"rl_val.jsonl", "val.jsonl", "lora_val.jsonl", "rl_train.jsonl"} <= suite_reads
    assert not [f for f in suite_reads if "test" in f]  # selection never reads a test file
