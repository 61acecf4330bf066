"""The quantize stage on tiny random models: the folder round trip, LREC training only the
factors, the budget allocation, end to end on a pruned input, and bad input."""

import copy
import json

import pytest
import torch

from slimforge import SlimforgeError
from slimforge.batching import encode_records
from slimforge.pruning import PrunePlan, prune_model, save_pruned
from kernels.quant_linear import QuantLinear
from slimforge.quantized import (bits_report, dequantize_for_cpu, load_quantized, quantize_model, save_quantized,
                                 target_linears)
from slimforge.tasks.records import load_records
from slimforge.config import Schedule
from slimforge.losses import distillation_loss
from slimforge.training import train_causal_lm
from stages.quantize.stage import pad_columns, run, zero_init_factors
from stages.quantize.decompose import lq_decompose
from slimforge.config import PROJECTIONS
from stages.quantize.params import QuantizeParams
from tests.helpers import save_tiny, tiny_model

SMALL = {"calibration": {"samples": 8, "max_len": 32, "batch_size": 1}, "rank": 4, "lq_iters": 3,
         "lrec": {"steps": 6, "batch_size": 8, "warmup_steps": 1, "checkpoint_every": 3}, "eval_batch_size": 64}


def _quantized(model, bits=2, group=32, rank=4):
    formats = {n: (bits, group) for n in target_linears(model, list(PROJECTIONS))}
    decomposed = {}
    for n, m in target_linears(model, list(PROJECTIONS)).items():
        decomposed[n] = lq_decompose(pad_columns(m.weight.detach(), group), bits, group, rank=rank, iters=3)
    return quantize_model(model, decomposed, formats)


def test_folder_reloads_to_the_same_logits(tmp_path, tokenizer):
    model = _quantized(tiny_model("qwen2", tokenizer), group=64)  # K=32 < 64: the padded path, and q/k/v biases
    save_quantized(model, tokenizer, tmp_path, tmp_path / "q")
    again, _ = load_quantized(tmp_path / "q")
    ids = torch.tensor([[1, 5, 9, 3, 7, 2]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)
    meta = json.loads((tmp_path / "q" / "quantization.json").read_text())
    assert meta["modules"]["model.layers.0.self_attn.q_proj"]["bits"] == 2
    report = bits_report(again)
    assert report["bits_per_weight"] > report["quantized_bits_per_weight"] > 2


def test_dequantize_for_cpu_gives_the_same_logits_with_plain_linears(tmp_path, tokenizer):
    model = _quantized(tiny_model("qwen2", tokenizer), group=64)  # rank 4; K=32 < 64 padded, K=64 not; biases
    save_quantized(model, tokenizer, tmp_path, tmp_path / "q")
    packed, _ = load_quantized(tmp_path / "q")
    dense, _ = load_quantized(tmp_path / "q")
    assert dequantize_for_cpu(dense) == 2 * len(PROJECTIONS)
    assert not any(isinstance(m, QuantLinear) for m in dense.modules())
    assert all(not p.requires_grad for n, p in dense.named_parameters() if "_proj" in n)
    ids = torch.tensor([[1, 5, 9, 3, 7, 2]])
    with torch.no_grad():
        assert torch.equal(packed(ids).logits, dense(ids).logits)
        assert torch.equal(packed.generate(ids, max_new_tokens=4, do_sample=False),
                           dense.generate(ids, max_new_tokens=4, do_sample=False))
    half = load_quantized(tmp_path / "q")[0].to(torch.bfloat16)  # other dtypes: weights rounded to it once
    dequantize_for_cpu(half)
    assert half.model.layers[0].mlp.down_proj.weight.dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.allclose(half(ids).logits.float(), packed(ids).logits, atol=0.02)


def test_dequantize_for_cpu_refuses_a_layer_off_the_cpu(tokenizer):
    model = _quantized(tiny_model("llama", tokenizer))
    model.model.layers[1].mlp.up_proj.to("meta")  # stands in for a GPU: checked before anything changes
    with pytest.raises(SlimforgeError, match="model.layers.1.mlp.up_proj is on meta, not the CPU"):
        dequantize_for_cpu(model)
    assert isinstance(model.model.layers[0].mlp.up_proj, QuantLinear)


def test_stock_transformers_refuses_the_packed_folder_instead_of_loading_garbage(tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM

    save_quantized(_quantized(tiny_model("llama", tokenizer)), tokenizer, tmp_path, tmp_path / "q")
    with pytest.raises(OSError, match="no file named model.safetensors"):  # loudly, not random weights
        AutoModelForCausalLM.from_pretrained(tmp_path / "q")


def test_tampered_folder_is_refused(tmp_path, tokenizer):
    model = _quantized(tiny_model("llama", tokenizer))
    save_quantized(model, tokenizer, tmp_path, tmp_path / "q")
    weights = tmp_path / "q" / "lowbit.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(SlimforgeError, match="checksum"):
        load_quantized(tmp_path / "q")


def test_lrec_trains_only_the_factors_and_lowers_the_loss(tmp_path, tokenizer, suite_dir):
    teacher = tiny_model("llama", tokenizer, seed=1)
    student = _quantized(tiny_model("llama", tokenizer, seed=1), bits=2)
    student.requires_grad_(False)
    for n, p in student.named_parameters():
        if n.endswith((".down", ".up")):
            p.requires_grad_(True)
    frozen = {k: v.clone() for k, v in student.state_dict().items() if not k.endswith((".down", ".up"))}
    factors = {k: v.clone() for k, v in student.state_dict().items() if k.endswith((".down", ".up"))}
    examples = encode_records(load_records(suite_dir / "train.jsonl")[:64], tokenizer, max_len=32)
    schedule = Schedule(steps=30, batch_size=16, lr=5e-3, warmup_steps=1, min_lr_ratio=1.0, checkpoint_every=0)
    out = train_causal_lm(student, examples, schedule, pad_id=tokenizer.pad_token_id, seed=0,
                          checkpoint_dir=tmp_path / "ck", fingerprint="t", progress=False, log_every=5,
                          loss_fn=distillation_loss(teacher, kl_weight=1.0, ce_weight=0.0))
    state = student.state_dict()
    assert all(torch.equal(state[k], v) for k, v in frozen.items())
    assert any(not torch.equal(state[k], v) for k, v in factors.items())
    assert sum(out["losses"][-5:]) < sum(out["losses"][:5])


def test_control_starts_exactly_at_rtn(tokenizer):
    model = tiny_model("llama", tokenizer)
    linears = target_linears(model, list(PROJECTIONS))
    formats = {n: (2, 32) for n in linears}
    rtn = {n: lq_decompose(m.weight.detach(), 2, 32, rank=0) for n, m in linears.items()}
    control = zero_init_factors(rtn, rank=4, seed=0)
    assert all(control[n].down.shape == (4, rtn[n].q.shape[1]) and control[n].down.abs().max() > 0 for n in linears)
    assert all(torch.equal(control[n].weight(), rtn[n].weight()) for n in linears)  # up = 0: W_hat unchanged
    assert all(torch.equal(control[n].down, zero_init_factors(rtn, 4, 0)[n].down) for n in linears)  # seeded
    ids = torch.randint(0, len(tokenizer), (2, 8), generator=torch.Generator().manual_seed(0))
    a = quantize_model(copy.deepcopy(model), rtn, formats)(ids).logits
    b = quantize_model(copy.deepcopy(model), control, formats)(ids).logits
    assert torch.allclose(a, b, atol=1e-6)


def _pruned_folder(tmp_path, tokenizer):
    base = save_tiny("llama", tokenizer, tmp_path / "base")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    plan = PrunePlan.identity(model.config)
    for lp in plan.layers:
        lp.channels = lp.channels[:48]  # 48 channels: down_proj's K is no multiple of 32 or 64
    save_pruned(prune_model(model, plan), tokenizer, plan, tmp_path / "pruned")
    return base, tmp_path / "pruned"


def test_stage_end_to_end_on_a_pruned_model(tmp_path, suite_dir, tokenizer):
    base, pruned = _pruned_folder(tmp_path, tokenizer)
    params = QuantizeParams.model_validate({**SMALL, "bits": 2, "group": 32, "rank": 1,
                                            "choices": [[2, 32], [3, 32], [4, 32]]})
    m = run(params, pruned, base, suite_dir, tmp_path / "q", tmp_path / "m.json", tmp_path / "plots")
    results = m["results"]
    assert set(results) == {"full_precision", "rtn", "rtn_matched", "lq_lora", "lq_lora_lrec", "rtn_lrec"}
    assert m["final"] == "lq_lora_lrec" and m["lrec_steps"] == 6 and m["bits"]["bits_per_weight"] > 2.5
    # every column carries its own bits and judge accuracy
    assert all("bits_per_weight" in r and set(r["judge"]) == {"verify", "pairwise"} for r in results.values())
    lrec_bits = results["lq_lora_lrec"]["bits_per_weight"]
    assert lrec_bits == results["lq_lora"]["bits_per_weight"] == results["rtn_lrec"]["bits_per_weight"]
    assert results["rtn"]["bits_per_weight"] < lrec_bits - 0.5  # same format without factors: fewer bits
    # RTN at matched bits spends (nearly) the corrected model's budget, on weights alone
    assert lrec_bits - 0.05 <= results["rtn_matched"]["bits_per_weight"] <= lrec_bits + 1e-9
    assert m["rtn_matched_allocation"]["budget_bits_per_weight"] == lrec_bits
    # the control trained exactly as long as LREC; gap closed is measured from the matched baseline
    assert m["rtn_lrec_steps"] == m["lrec_steps"] == 6
    assert set(m["gap_closed"]) == {"rtn_matched"}
    assert {"lq_lora_lrec.ppl", "rtn_lrec.ppl"} <= set(m["gap_closed"]["rtn_matched"])  # (accuracy: 0 for all here)
    headline = json.loads((tmp_path / "m.json").read_text())
    assert "bits_per_weight" in headline["results"]["rtn_matched"] and "judge" in m["results"]["rtn_lrec"]
    assert "ci95" in headline["results"]["rtn_lrec"] and "judge" not in headline["results"]["rtn_lrec"]  # report only
    model, _ = load_quantized(tmp_path / "q")
    assert model.model.layers[0].mlp.down_proj.in_features == 48
    assert (tmp_path / "plots" / "bits.png").exists() and not (tmp_path / ".checkpoints" / "q").exists()
    assert json.loads((tmp_path / "q" / "slimforge.json").read_text())["stage"] == "quantize"


def test_budget_picks_mixed_formats_within_it(tmp_path, suite_dir, tokenizer):
    base = save_tiny("llama", tokenizer, tmp_path / "base")
    params = QuantizeParams.model_validate({**SMALL, "model": "base", "budget": 3.5, "choices": [[2, 32], [4, 32]], "rank": 0,
                                            "lrec": {"steps": 0}, "compare": False})
    m = run(params, tmp_path / "none", base, suite_dir, tmp_path / "q", tmp_path / "m.json", tmp_path / "plots")
    assert m["allocation"]["allocated_bits_per_weight"] <= 3.5 + 1e-9
    assert m["bits"]["bits_per_weight"] <= 3.5 + 1e-9
    assert set(m["formats"]) == {"2-bit g32", "4-bit g32"}
    assert m["final"] == "rtn" and m["bits"]["low_rank_bits_per_weight"] == 0


def test_bad_input_fails_with_one_line(tmp_path, suite_dir, tokenizer, monkeypatch):
    import stages.quantize.stage as stage

    def no_work(*a, **k):
        raise AssertionError("the Fisher pass ran before the budget was checked")

    monkeypatch.setattr(stage, "fisher_diagonal", no_work)
    base = save_tiny("llama", tokenizer, tmp_path / "base")
    params = QuantizeParams.model_validate({**SMALL, "model": "base", "budget": 0.5, "choices": [[2, 32]]})
    with pytest.raises(SlimforgeError, match=r"budget 0.5 bits/weight is infeasible: .* needs \d+\.\d+ bits/weight"):
        run(params, tmp_path / "none", base, suite_dir, tmp_path / "q", tmp_path / "m.json", tmp_path / "plots")
    assert not (tmp_path / "q").exists()
    for bad, msg in (({"bits": 5}, "unsupported bit width"), ({"group": 48}, "unsupported group size"),
                     ({"targets": ["c_attn"]}, "targets must be")):
        with pytest.raises(Exception, match=msg):
            QuantizeParams.model_validate(bad)
