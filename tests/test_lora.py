"""LoRAM: recovery math, the equivalence it promises, PEFT reload, QLoRAM gradients, the stage."""

import json
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from slimforge import SlimforgeError
from slimforge.adapters import add_lora, load_adapter
from slimforge.config import PROJECTIONS
from slimforge.pruning import PrunePlan, prune_model, save_pruned
from slimforge.pruning.surgery import layer_indices
from stages.lora.stage import run
from stages.lora.params import LoraParams
from stages.lora.recover import recover_state
from tests.helpers import save_tiny, tiny_model

SMALL = {"rank": 4, "train": {"steps": 6, "batch_size": 8, "warmup_steps": 1, "checkpoint_every": 3},
         "align": {"steps": 3, "batch_size": 8},
         "eval_batch_size": 64}


def _params(suite_dir, model, **overrides) -> LoraParams:
    return LoraParams.model_validate({**SMALL, "model": str(model), "train_rows": str(suite_dir / "lora_train.jsonl"),
                                      **overrides})


def _plan(model) -> PrunePlan:
    """Uneven cuts: layer 0 drops KV head 0 (query heads 0, 1) and scattered channels; layer 1
    keeps every head but one query head per KV head, and a different channel set."""
    plan = PrunePlan.identity(model.config)
    plan.layers[0].q_heads, plan.layers[0].kv_heads = [2, 3], [1]
    plan.layers[0].channels = list(range(0, 64, 2))
    plan.layers[1].q_heads = [0, 3]
    plan.layers[1].channels = [c for c in range(64) if c % 3]
    plan.validate()
    return plan


def _adapter_state(peft_model) -> dict[str, torch.Tensor]:
    """The adapter's tensors under the keys PEFT saves them with."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(peft_model).items()}


def _random_adapter(model, seed=1):
    return add_lora(model, rank=3, alpha=6, targets=list(PROJECTIONS), seed=seed, init=False)  # B random too


def test_recovered_delta_is_the_pruned_delta_scattered_into_the_kept_positions(tokenizer):
    base = tiny_model("llama", tokenizer)
    plan = _plan(base)
    small = _random_adapter(prune_model(base, plan))
    state = _adapter_state(small)
    full = recover_state(state, plan)
    scale = 6 / 3
    for i in range(2):
        for module, (dim, kept) in layer_indices(plan, i).items():
            key = f"base_model.model.model.layers.{i}.{module}"
            small_delta = state[f"{key}.lora_B.weight"] @ state[f"{key}.lora_A.weight"] * scale
            full_delta = full[f"{key}.lora_B.weight"] @ full[f"{key}.lora_A.weight"] * scale
            weight = base.get_submodule(f"model.layers.{i}.{module}").weight
            assert full_delta.shape == weight.shape
            axis = 0 if dim == "rows" else 1
            torch.testing.assert_close(full_delta.index_select(axis, kept), small_delta)
            dropped = torch.ones(weight.shape[axis], dtype=torch.bool)
            dropped[kept] = False
            assert dropped.any() or module.endswith(("k_proj", "v_proj"))
            assert torch.count_nonzero(full_delta.index_select(axis, dropped.nonzero()[:, 0])) == 0


def _zero_pruned_positions(model, plan):
    """The full model with every pruned head/channel's weights zeroed: the kept sub-network alone."""
    with torch.no_grad():
        for i in range(len(plan.layers)):
            for module, (dim, kept) in layer_indices(plan, i).items():
                w = model.get_submodule(f"model.layers.{i}.{module}").weight
                mask = torch.ones(w.shape[0 if dim == "rows" else 1], dtype=torch.bool)
                mask[kept] = False
                if dim == "rows":
                    w[mask] = 0
                else:
                    w[:, mask] = 0
    return model


def test_full_model_plus_recovered_adapter_equals_pruned_model_plus_adapter_on_the_kept_network(tokenizer, tmp_path):
    """With the pruned positions' weights zero, the full model computes exactly the pruned one (a
    zeroed query head scores uniformly, but its o_proj columns are zero too); the recovered adapter
    is zero at those positions, so adding it keeps the equality — with the adapter on."""
    base = tiny_model("llama", tokenizer)
    plan = _plan(base)
    small = _random_adapter(prune_model(base, plan))
    small.save_pretrained(tmp_path / "small")
    full_state = recover_state(load_file(tmp_path / "small" / "adapter_model.safetensors"), plan)
    full = _random_adapter(_zero_pruned_positions(tiny_model("llama", tokenizer), plan), seed=7)
    missing = full.load_state_dict({k.replace(".lora_A.weight", ".lora_A.default.weight")
                                    .replace(".lora_B.weight", ".lora_B.default.weight"): v
                                    for k, v in full_state.items()}, strict=False)
    assert not missing.unexpected_keys
    ids = torch.tensor([[1, 8, 5, 9, 3, 7, 2, 4], [1, 6, 6, 2, 9, 5, 3, 8]])
    with torch.no_grad():
        want, got = small(input_ids=ids).logits, full(input_ids=ids).logits
        plain = prune_model(base, plan)(input_ids=ids).logits
    assert (want - plain).abs().max() > 1e-2  # the adapter does change the output
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_random_init_fills_only_the_pruned_input_columns(tokenizer):
    base = tiny_model("llama", tokenizer)
    plan = _plan(base)
    state = _adapter_state(_random_adapter(prune_model(base, plan)))
    zeros, noisy = recover_state(state, plan), recover_state(state, plan, init="random", std=0.01, seed=3)
    key = "base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"
    kept = torch.tensor(plan.layers[0].channels)
    torch.testing.assert_close(noisy[key][:, kept], zeros[key][:, kept])
    assert 0 < noisy[key].abs().max() and noisy[key][:, 1::2].abs().max() < 0.1
    b = "base_model.model.model.layers.0.mlp.up_proj.lora_B.weight"
    assert torch.equal(noisy[b], zeros[b])  # output rows stay zero: only A gets the option


def test_recovery_refuses_an_adapter_from_another_plan(tokenizer):
    base = tiny_model("llama", tokenizer)
    plan = _plan(base)
    state = _adapter_state(_random_adapter(prune_model(base, plan)))
    other = PrunePlan.identity(base.config)
    with pytest.raises(SlimforgeError, match="not trained on this plan"):
        recover_state(state, other)
    with pytest.raises(SlimforgeError, match="decoder projections only"):
        recover_state({"base_model.model.lm_head.lora_A.weight": torch.zeros(2, 32)}, plan)


def test_recovered_adapter_reloads_with_peft_in_a_fresh_process(tmp_path, suite_dir, tokenizer):
    base_dir = save_tiny("llama", tokenizer, tmp_path / "base")
    params = _params(suite_dir, tmp_path / "pruned", baselines=False)
    _write_pruned(base_dir, tmp_path / "pruned", tokenizer)
    run(params, base_dir, suite_dir, tmp_path / "lora", tmp_path / "m.json", tmp_path / "plots")
    from transformers import AutoModelForCausalLM

    ids = [[1, 8, 5, 9, 3, 7, 2, 4]]
    with torch.no_grad():
        here = load_adapter(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "lora" / "adapter")(
            input_ids=torch.tensor(ids)).logits
    script = ("import json, sys, torch\nfrom transformers import AutoModelForCausalLM\nfrom peft import PeftModel\n"
              f"m = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({str(base_dir)!r}), "
              f"{str(tmp_path / 'lora' / 'adapter')!r})\n"
              f"print(json.dumps(m(input_ids=torch.tensor({ids})).logits[0, -1].tolist()))\n")
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})  # only transformers + peft
    assert out.returncode == 0, out.stderr
    torch.testing.assert_close(torch.tensor(json.loads(out.stdout)), here[0, -1], atol=1e-5, rtol=1e-5)
    config = json.loads((tmp_path / "lora" / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base_dir) and config["r"] == 4
    assert not config.get("modules_to_save") and config["bias"] == "none"
    assert config["target_modules"] == sorted(PROJECTIONS)  # a stable order: the folder hashes the same every run


def test_qloram_gradients_reach_only_the_adapters(tokenizer):
    from tests.test_quantize_stage import _quantized

    model = _quantized(prune_model(tiny_model("llama", tokenizer), _plan(tiny_model("llama", tokenizer))))
    model.requires_grad_(False)
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    peft_model = add_lora(model, rank=2, alpha=4, targets=list(PROJECTIONS), init=False)
    ids = torch.tensor([[1, 8, 5, 9, 3, 7, 2, 4]])
    peft_model(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in peft_model.named_parameters() if p.grad is not None}
    assert grads and all(".lora_A." in n or ".lora_B." in n for n in grads)
    assert len(grads) == 2 * len(PROJECTIONS) * 2 and all(g.abs().sum() > 0 for g in grads.values())
    state = {k.replace("base_model.model.", "").replace(".base_layer", ""): v for k, v in peft_model.state_dict().items()}
    assert all(torch.equal(state[k], v) for k, v in frozen.items())  # packed weights and LREC factors untouched


def _write_pruned(base_dir, folder, tokenizer, refit_noise: float = 0.0):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    plan = _plan(model)
    pruned = prune_model(model, plan)
    if refit_noise:  # stands in for an OBS refit: kept weights that differ from the base's
        with torch.no_grad():
            for layer in pruned.model.layers:
                layer.mlp.down_proj.weight.add_(refit_noise * torch.randn_like(layer.mlp.down_proj.weight))
    save_pruned(pruned, tokenizer, plan, folder)
    return plan


@pytest.mark.parametrize("prune_weights", ["selection", "refit"])
def test_stage_end_to_end(tmp_path, suite_dir, tokenizer, prune_weights):
    base_dir = save_tiny("llama", tokenizer, tmp_path / "base")
    _write_pruned(base_dir, tmp_path / "pruned", tokenizer, refit_noise=0.5)
    params = _params(suite_dir, tmp_path / "pruned", prune_weights=prune_weights)
    m = run(params, base_dir, suite_dir, tmp_path / "lora", tmp_path / "m.json", tmp_path / "plots")
    assert m["model"] == "pruned" and m["families"] == ["add3"]
    assert m["results"]["recovered"]["accuracy_lora"] == m["results"]["recovered"]["accuracy"]["add3"]
    assert set(m["results"]) == {"base", "pruned_adapter", "recovered", "full_lora"}
    assert m["results"]["pruned_adapter"]["params"] < m["results"]["base"]["params"]
    assert m["training"]["loram"]["state_bytes"] < m["training"]["full_lora"]["state_bytes"]
    assert 0 < m["state_bytes_ratio"] < 1 and m["tokens_per_s_ratio"] > 0
    for variant in m["results"].values():  # every variant scored on lora_val (what ablations select on) and on
        assert 0 <= variant["accuracy_lora_val"] <= 1  # val.jsonl's base families (did it keep them?)
        assert set(variant["accuracy_val"]) == {"add3", "add", "sub", "mul"} and 0 <= variant["accuracy_base_val"] <= 1
    assert m["replay_rows"] == 40 and m["train_rows"] == 60  # ratio 2: two base-family rows per training row
    metrics = json.loads((tmp_path / "m.json").read_text())
    recovered = metrics["results"]["recovered"]
    assert set(recovered) == {"accuracy_lora", "accuracy_lora_val", "ci95"}
    assert recovered["ci95"]["accuracy_lora"]["lo"] <= recovered["accuracy_lora"] <= recovered["ci95"]["accuracy_lora"]["hi"]
    aligned = m["training"]["align"]  # alignment's cost, beside the LoRA trainings'
    assert aligned["seconds"] > 0 and aligned["tokens_per_s"] > 0
    assert (aligned["peak_memory_bytes"] is None) == (m["training"]["loram"]["peak_memory_bytes"] is None)  # CUDA only
    assert aligned["state_bytes"] > m["training"]["loram"]["state_bytes"]  # full-parameter, teacher resident
    assert m["loram_with_align_seconds_ratio"] > m["align_seconds_ratio"] > 0 and m["align_state_bytes_ratio"] > 0
    assert (tmp_path / "lora" / "pruned_adapter" / "adapter_model.safetensors").exists()
    full = load_file(tmp_path / "lora" / "adapter" / "adapter_model.safetensors")
    assert full["base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"].shape == (4, 64)
    header, *rows = (tmp_path / "plots" / "loss.csv").read_text().splitlines()  # long: one row per step per run
    assert header == "step,run,loss" and [r.split(",")[1] for r in rows[::len(rows) // 2]] == ["loram", "full_lora"]
    assert not (tmp_path / ".checkpoints" / "lora").exists()
    from slimforge.modeling import load_model

    small, _ = load_model(tmp_path / "pruned")
    trained = load_file(tmp_path / "lora" / "pruned_adapter" / "adapter_model.safetensors")
    assert trained["base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"].shape == (4, 32)
    assert small.model.layers[0].mlp.down_proj.in_features == 32
    aligned, _ = load_model(tmp_path / "lora" / "pruned_model")  # the aligned model the pruned adapter belongs to
    assert aligned.model.layers[0].mlp.down_proj.in_features == 32
    assert not torch.equal(aligned.model.layers[1].mlp.up_proj.weight, small.model.layers[1].mlp.up_proj.weight)
    with_adapter = load_adapter(aligned, tmp_path / "lora" / "pruned_adapter")
    ids = torch.tensor([[1, 8, 5, 9, 3]])
    with torch.no_grad():
        adapted = with_adapter(input_ids=ids).logits
        with with_adapter.disable_adapter():
            plain = with_adapter(input_ids=ids).logits
    assert (adapted - plain).abs().max() > 0  # the trained adapter loads onto the saved small model


def test_stage_on_the_quantized_model_and_plain_lora(tmp_path, suite_dir, tokenizer):
    from slimforge.quantized import save_quantized
    from tests.test_quantize_stage import _quantized

    base_dir = save_tiny("llama", tokenizer, tmp_path / "base")
    _write_pruned(base_dir, tmp_path / "pruned", tokenizer)
    from slimforge.modeling import load_model

    pruned, _ = load_model(tmp_path / "pruned")
    save_quantized(_quantized(pruned), tokenizer, tmp_path / "pruned", tmp_path / "quantized")
    assert (tmp_path / "quantized" / "plan.json").exists()  # the quantized folder carries the plan for recovery
    params = _params(suite_dir, tmp_path / "quantized", baselines=False)
    m = run(params, base_dir, suite_dir, tmp_path / "q", tmp_path / "m.json", tmp_path / "p")
    assert set(m["results"]) == {"pruned_adapter", "recovered"} and m["training"]["loram"]["trainable_params"] > 0
    again, _ = load_model(tmp_path / "q" / "pruned_model")  # the packed small model, factors aligned
    assert type(again.model.layers[0].mlp.down_proj).__name__ == "QuantLinear"
    load_adapter(again, tmp_path / "q" / "pruned_adapter")
    params = _params(suite_dir, base_dir, baselines=False)
    m = run(params, base_dir, suite_dir, tmp_path / "plain", tmp_path / "m.json", tmp_path / "p")
    assert set(m["results"]) == {"lora"} and (tmp_path / "plain" / "adapter" / "adapter_config.json").exists()


def test_bad_input(tmp_path, suite_dir, tokenizer):
    base_dir = save_tiny("llama", tokenizer, tmp_path / "base")
    other = save_tiny("qwen2", tokenizer, tmp_path / "other")
    _write_pruned(other, tmp_path / "pruned_other", tokenizer)
    args = (suite_dir, tmp_path / "lora", tmp_path / "m.json", tmp_path / "plots")
    with pytest.raises(SlimforgeError, match="does not match the model"):
        run(_params(suite_dir, tmp_path / "pruned_other"), base_dir, *args)
    _write_pruned(base_dir, tmp_path / "pruned", tokenizer)
    with pytest.raises(SlimforgeError, match="no usable training rows"):
        run(_params(suite_dir, tmp_path / "pruned", train={"max_len": 8}), base_dir, *args)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(SlimforgeError, match="no records"):
        run(_params(suite_dir, tmp_path / "pruned", train_rows=str(tmp_path / "empty.jsonl")), base_dir, *args)
    with pytest.raises(SlimforgeError, match="model: .*nowhere is not a folder"):
        run(_params(suite_dir, tmp_path / "nowhere"), base_dir, *args)
    user_rows = tmp_path / "mine.jsonl"
    user_rows.write_text('{"prompt": "2@3=", "response": "5", "family": "at"}\n')
    with pytest.raises(SlimforgeError, match=r"families \['at'\] have no test problems in .*lora_test.jsonl"):
        run(_params(suite_dir, tmp_path / "pruned", train_rows=str(user_rows)), base_dir, *args)
    assert not (tmp_path / "lora").exists()
    for bad, msg in (({"rank": 0}, "greater than or equal to 1"), ({"targets": ["c_attn"]}, "targets must be")):
        with pytest.raises(Exception, match=msg):
            LoraParams.model_validate(bad)


def test_alignment_moves_the_pruned_residual_stream_towards_the_base(tmp_path, suite_dir, tokenizer):
    from stages.lora.stage import align

    base = tiny_model("llama", tokenizer)
    pruned = prune_model(base, _plan(base))
    ids = torch.tensor([[1, 8, 5, 9, 3, 7, 2, 4, 6, 5]])

    def residual_error():
        with torch.no_grad():
            s, t = (m(input_ids=ids, output_hidden_states=True).hidden_states[1:] for m in (pruned, base))
        return sum(((a - b) ** 2).mean() / (b ** 2).mean() for a, b in zip(s, t)).item()

    before = residual_error()
    params = LoraParams.model_validate({**SMALL, "align": {"steps": 40, "batch_size": 16, "lr": 3e-3}})
    report = align(pruned, params, suite_dir, tokenizer, tmp_path / "ck", "t", base, [])
    assert report["steps"] == 40 and residual_error() < 0.7 * before
    assert not any(p.requires_grad for p in pruned.parameters())  # frozen again for the adapters


def test_a_crashed_run_resumes_from_its_last_checkpoint(tmp_path, suite_dir, tokenizer, monkeypatch):
    import stages.lora.stage as stage

    base_dir = save_tiny("llama", tokenizer, tmp_path / "base")
    _write_pruned(base_dir, tmp_path / "pruned", tokenizer)
    params = _params(suite_dir, tmp_path / "pruned", baselines=False)
    args = (params, base_dir, suite_dir, tmp_path / "lora", tmp_path / "m.json", tmp_path / "p")
    real = stage.evaluate_suite

    def killed(*a, **k):  # the process dies right after the LoRA training, before anything is written
        raise KeyboardInterrupt

    monkeypatch.setattr(stage, "evaluate_suite", killed)
    with pytest.raises(KeyboardInterrupt):
        run(*args)
    assert not (tmp_path / "lora").exists() and (tmp_path / ".checkpoints" / "lora" / "loram").exists()
    monkeypatch.setattr(stage, "evaluate_suite", real)
    m = run(*args)
    assert m["training"]["loram"]["resumed_from"] == 3  # checkpoint_every: 3 of 6 steps
    run(params, base_dir, suite_dir, tmp_path / "again", tmp_path / "m2.json", tmp_path / "p2")
    resumed, straight = (load_file(tmp_path / d / "adapter" / "adapter_model.safetensors") for d in ("lora", "again"))
    assert resumed.keys() == straight.keys()
    assert all(torch.allclose(resumed[k], straight[k], atol=1e-6) for k in resumed)  # as if never killed


def test_each_training_holds_only_the_model_it_trains(tmp_path, suite_dir, tokenizer, monkeypatch):
    """The CUDA peak of a training is that training's own: while LoRA trains on the small model the
    base (alignment's teacher) is gone, and while full-model LoRA trains no other base copy (the one
    the recovered adapter was scored on) is alive; alignment holds its student and its teacher."""
    import gc
    import weakref

    from stages.lora import stage

    created = []  # weak references to every model the stage builds

    def tracked(fn):
        def wrapper(*a, **k):
            out = fn(*a, **k)
            model = out[0] if isinstance(out, tuple) else out
            created.append(weakref.ref(model))
            return out
        return wrapper

    def alive():
        gc.collect()
        return [m for m in (r() for r in created) if m is not None]

    seen = {}
    real_lora, real_align = stage.train_lora, stage.align

    def spy_lora(model, *a, desc, **k):
        seen[desc] = alive()
        assert len(seen[desc]) == 1 and seen[desc][0] is model, f"{desc}: {len(seen[desc])} models alive"
        seen[desc] = None
        return real_lora(model, *a, desc=desc, **k)

    def spy_align(model, params, data_dir, tokenizer, ckpt, fingerprint, teacher, rows):
        held = alive()
        assert len(held) == 2 and any(m is model for m in held) and any(m is teacher for m in held)
        seen["align"] = None
        del held
        return real_align(model, params, data_dir, tokenizer, ckpt, fingerprint, teacher, rows)

    monkeypatch.setattr(stage, "load_model", tracked(stage.load_model))
    monkeypatch.setattr(stage, "prune_model", tracked(stage.prune_model))
    monkeypatch.setattr(stage, "train_lora", spy_lora)
    monkeypatch.setattr(stage, "align", spy_align)
    base_dir = save_tiny("llama", tokenizer, tmp_path / "base")
    _write_pruned(base_dir, tmp_path / "pruned", tokenizer)
    m = run(_params(suite_dir, tmp_path / "pruned"), base_dir, suite_dir, tmp_path / "lora", tmp_path / "m.json",
            tmp_path / "p")
    assert set(seen) == {"align", "loram", "full_lora"} and "full_lora" in m["training"]


def test_val_accuracy_needs_every_family(tmp_path, caplog):
    from stages.lora.scores import macro_accuracy as _macro, val_records

    (tmp_path / "lora_val.jsonl").write_text('{"prompt": "1+1+1=", "response": "3", "answer": "3", "family": "add3"}\n')
    assert [r["family"] for r in val_records(tmp_path, ["add3"])] == ["add3"]
    assert _macro({"add3": 0.5}, ["add3"]) == 0.5
    assert val_records(tmp_path, ["add3", "at"]) and "no validation problems for at" in caplog.text
    assert _macro({"add3": 0.5}, ["add3", "at"]) is None  # a partial mean would not compare with test's
    assert val_records(tmp_path / "nowhere", ["add3"]) == []
    (tmp_path / "val.jsonl").write_text('{"prompt": "1+1=", "response": "2", "answer": "2", "family": "add"}\n')
    assert [r["family"] for r in val_records(tmp_path, ["add3"])] == ["add3", "add"]  # + the base families


def test_replay_rows_are_seeded_base_family_rows_and_off_at_ratio_0(suite_dir):
    from stages.lora.stage import replay_rows, suite_files

    params = LoraParams.model_validate({"replay": {"ratio": 0.5}})
    rows = replay_rows(suite_dir, params, 20)
    assert len(rows) == 10 and {r["family"] for r in rows} <= {"add", "sub", "mul"}
    assert rows == replay_rows(suite_dir, params, 20)
    assert rows != replay_rows(suite_dir, params.model_copy(update={"seed": 1}), 20)
    off = LoraParams.model_validate({"replay": {"ratio": 0.0, "files": ["judge_train.jsonl"]}})
    assert replay_rows(suite_dir, off, 20) == [] and "judge_train.jsonl" not in suite_files(off)
    assert {"train.jsonl", "val.jsonl"} <= set(suite_files(params))


def test_every_ablation_row_is_a_valid_params_file_on_the_defaults():
    from experiments.lora_ablation import ROWS, row_params
    from tests.conftest import REPO

    rows = sorted((REPO / "params" / "ablations" / "lora").glob("*.yaml"))
    assert len(rows) >= 12 and ROWS == "params/ablations/lora/*.yaml"
    parsed = {r.stem: row_params(r, REPO / "params" / "lora.yaml")[1] for r in rows}
    default = parsed["07_selection_hidden_kl_default"]
    from slimforge.config import load_params

    assert default.model_copy(update={"baselines": True}) == load_params(REPO / "params" / "lora.yaml", LoraParams)
    assert parsed["01_selection_no_align"].align.steps == 0 and parsed["01_selection_no_align"].align.lr == default.align.lr
    assert parsed["02_refit_no_align"].prune_weights == "refit"
    assert all(not p.baselines for p in parsed.values())  # rows compare on val; the baselines do not change


def test_ablation_rows_run_and_print_a_val_table(tmp_path, suite_dir, tokenizer, monkeypatch, capsys):
    from experiments.lora_ablation import main

    base_dir = save_tiny("llama", tokenizer, tmp_path / "base")
    _write_pruned(base_dir, tmp_path / "pruned", tokenizer)
    defaults = tmp_path / "lora.yaml"  # a tiny stand-in for params/lora.yaml
    defaults.write_text(yaml.safe_dump({**SMALL, "model": str(tmp_path / "pruned"),
                                        "train_rows": str(suite_dir / "lora_train.jsonl")}))
    (tmp_path / "rows").mkdir()
    (tmp_path / "rows" / "a_default.yaml").write_text("{}\n")
    (tmp_path / "rows" / "b_no_align.yaml").write_text("align: {steps: 0}\n")
    args = ["--rows", str(tmp_path / "rows" / "*.yaml"), "--defaults", str(defaults), "--out", str(tmp_path / "out"),
            "--base", str(base_dir), "--data", str(suite_dir), "--json", str(tmp_path / "table.json")]
    main(args)
    table = json.loads((tmp_path / "table.json").read_text())
    assert [t["row"] for t in table] == ["a_default", "b_no_align"]
    assert [t["align_steps"] for t in table] == [3, 0]
    assert all(0 <= t["val_recovered"] <= 1 and 0 <= t["val_pruned_adapter"] <= 1 for t in table)
    printed = capsys.readouterr().out
    assert "| a_default | pruned (selection) | 3 |" in printed and "best on lora_val" in printed
    assert "test" not in printed.split("best on lora_val")[0]  # rows are compared on val only
    saved = yaml.safe_load((tmp_path / "out" / "b_no_align" / "params.yaml").read_text())
    assert saved["align"]["steps"] == 0 and saved["align"]["batch_size"] == 8 and saved["baselines"] is False
    report = json.loads((tmp_path / "out" / "a_default" / "report.json").read_text())
    assert set(report["results"]) == {"pruned_adapter", "recovered"}
    main(args)  # a finished row is read back, not trained again
    assert json.loads((tmp_path / "table.json").read_text()) == table
