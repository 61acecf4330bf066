"""Evaluation harness against hand-computed cases."""

import json
import math

import pytest
import torch

from slimforge.batching import left_pad, prompt_ids
from slimforge.evaluate.harness import TEST_FILES
from slimforge.evaluate.speed import decode_tokens_per_s
from slimforge.evaluate import (evaluate_suite, exact_match, greedy_generate,
                                judge_accuracy, perplexity, token_logprobs)
from slimforge.tasks.records import load_records
from tests.helpers import tiny_model


class ArithmeticOracle(torch.nn.Module):
    """A stand-in model whose `generate` reads the prompt and answers; subtraction it gets wrong
    by one. Exact match must then be 1.0 on add/mul and 0.0 on sub."""

    def __init__(self, tokenizer):
        super().__init__()
        self.tok = tokenizer
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def generate(self, input_ids, attention_mask, max_new_tokens, **_):
        rows = []
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist()):
            prompt = self.tok.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=True)
            value = eval(prompt.rstrip("="))
            answer = str(value + 1 if "-" in prompt else value)
            new = self.tok.encode(answer, add_special_tokens=False) + [self.tok.eos_token_id]
            new += [self.tok.pad_token_id] * (max_new_tokens - len(new))
            rows.append(ids + new[:max_new_tokens])
        return torch.tensor(rows)


class FixedVerdicts(torch.nn.Module):
    """Always prefers ' yes' and ' A' at the last position."""

    def __init__(self, tokenizer):
        super().__init__()
        self.vocab = len(tokenizer)
        self.favoured = [tokenizer.encode(v, add_special_tokens=False)[0] for v in (" yes", " A")]
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None, logits_to_keep=0, **_):
        logits = torch.zeros(*input_ids.shape, self.vocab)
        logits[..., self.favoured] = 5.0
        return type("Out", (), {"logits": logits})()


def test_token_logprobs_by_hand():
    logits = torch.tensor([[0.0, math.log(3.0)], [2.0, 2.0]])
    got = token_logprobs(logits, torch.tensor([1, 0]))
    assert torch.allclose(got, torch.tensor([math.log(3 / 4), math.log(1 / 2)]))


def test_exact_match_per_family(tokenizer, suite_dir):
    records = load_records(suite_dir / "test.jsonl", need_answer=True)
    acc = exact_match(ArithmeticOracle(tokenizer), tokenizer, records, batch_size=7)
    assert acc == {"add": 1.0, "mul": 1.0, "sub": 0.0}


def test_perplexity_of_uniform_model_is_vocab_size(tokenizer, suite_dir):
    model = tiny_model("llama", tokenizer, tie=False)
    torch.nn.init.zeros_(model.lm_head.weight)
    records = load_records(suite_dir / "test.jsonl")
    assert perplexity(model, tokenizer, records, batch_size=5) == pytest.approx(len(tokenizer), rel=1e-5)


def test_judge_accuracy_by_hand(tokenizer, suite_dir):
    records = load_records(suite_dir / "judge_test.jsonl")
    acc = judge_accuracy(FixedVerdicts(tokenizer), tokenizer, records)
    for fmt, favoured in (("verify", " yes"), ("pairwise", " A")):
        items = [r for r in records if r["format"] == fmt]
        assert acc[fmt] == pytest.approx(sum(r["response"] == favoured for r in items) / len(items))


def test_batched_generation_matches_one_at_a_time(tokenizer):
    model = tiny_model("llama", tokenizer, seed=3)
    prompts = ["1+1=", "23*4=", "99-12=", "Is this correct?\n1+1=2\nAnswer:"]
    batched = greedy_generate(model, tokenizer, prompts, max_new_tokens=5, batch_size=4)
    single = [greedy_generate(model, tokenizer, [p], max_new_tokens=5)[0] for p in prompts]
    assert batched == single


def test_left_pad_puts_prompts_at_the_end(tokenizer):
    ids, mask = left_pad(prompt_ids(tokenizer, ["1+1=", "123+456="]), tokenizer.pad_token_id)
    assert ids[0, 0] == tokenizer.pad_token_id and mask[0, 0] == 0
    assert (mask[:, -1] == 1).all() and (ids[:, 0] != tokenizer.pad_token_id).any()


def test_decode_speed_and_full_harness(tokenizer, suite_dir, tmp_path):
    model = tiny_model("llama", tokenizer)
    tok_s, mode = decode_tokens_per_s(model, new_tokens=8)
    assert tok_s > 0 and mode == "eager"
    model.save_pretrained(tmp_path)
    metrics = evaluate_suite(model, tokenizer, suite_dir, model_dir=tmp_path)
    assert set(metrics["accuracy"]) == {"add", "sub", "mul"}  # test.jsonl only: a stage reads what it names
    every = evaluate_suite(model, tokenizer, suite_dir, test_files=TEST_FILES)
    assert set(every["accuracy"]) == {"add", "sub", "mul", "add3", "chain"}
    acc = every["accuracy"]
    assert every["accuracy_base"] == pytest.approx((acc["add"] + acc["sub"] + acc["mul"]) / 3)  # test.jsonl's families
    assert metrics["ppl"] > 1 and metrics["bytes"] > 0
    assert "decode_tokens_per_s" not in metrics  # a benchmark, not a stage metric (slimforge eval --speed)
    assert metrics["params"] == sum(p.numel() for p in model.parameters())
    assert set(metrics["judge"]) == {"verify", "pairwise"}


def test_stock_pipeline_in_a_fresh_process_generates_what_the_harness_does(tokenizer, suite_dir, tmp_path):
    """A user's `pipeline('text-generation')` on a saved folder (no slimforge) sees the same tokens as
    the harness, BOS included: greedy continuations match token for token."""
    import json
    import subprocess
    import sys

    from slimforge.evaluate.generation import greedy_generate
    from slimforge.tasks.records import load_records

    model = tiny_model("llama", tokenizer, seed=3)
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    prompts = [r["prompt"] for r in load_records(suite_dir / "test.jsonl")[:6]]
    ours = greedy_generate(model, tokenizer, prompts, max_new_tokens=6)
    script = ("import json, sys\nfrom transformers import pipeline\n"
              f"p = pipeline('text-generation', model={str(tmp_path / 'm')!r})\n"
              f"prompts = {prompts!r}\n"
              "outs = [p(q, max_new_tokens=6, do_sample=False, return_full_text=False)[0]['generated_text'] for q in prompts]\n"
              "assert 'slimforge' not in sys.modules\nprint(json.dumps(outs))\n")
    stock = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                           env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}, timeout=300)
    assert stock.returncode == 0, stock.stderr[-2000:]
    theirs = json.loads(stock.stdout.strip().splitlines()[-1])
    assert theirs == ours and any(ours)
    assert tokenizer(prompts[0])["input_ids"][0] == tokenizer.bos_token_id  # what makes them agree


def test_a_quantized_linear_counts_the_weights_it_stands_for(tokenizer):
    from kernels.quant_linear import QuantLinear
    from slimforge.modeling import count_parameters

    model = tiny_model("llama", tokenizer)
    dense = count_parameters(model)
    mlp = model.model.layers[0].mlp
    old = mlp.down_proj  # 64 -> 32, no bias
    mlp.down_proj = QuantLinear.empty(old.in_features, old.out_features, bits=4, group=32, rank=2)
    lowrank = mlp.down_proj.up.numel() + mlp.down_proj.down.numel()
    assert count_parameters(model) == dense + lowrank  # packed codes are buffers, yet count as 64x32 weights


def test_slimforge_eval_measures_decode_speed_only_when_asked(tokenizer, suite_dir, tmp_path, capsys):
    from slimforge.cli import main

    model = tiny_model("llama", tokenizer)
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    main(["eval", str(tmp_path / "m"), "--data", str(suite_dir), "--out", str(tmp_path / "plain.json")])
    main(["eval", str(tmp_path / "m"), "--data", str(suite_dir), "--out", str(tmp_path / "timed.json"), "--speed"])
    plain, timed = (json.loads((tmp_path / f).read_text()) for f in ("plain.json", "timed.json"))
    assert "decode_tokens_per_s" not in plain and timed["decode_tokens_per_s"] > 0 and timed["decode_mode"] == "eager"
    assert timed["accuracy"] == plain["accuracy"] and timed["params"] == plain["params"]


def test_bootstrap_interval_covers_the_mean_narrows_with_n_and_is_stratified():
    from slimforge.evaluate.intervals import accuracy_with_intervals, macro_interval

    small = {"a": [True] * 45 + [False] * 5}
    big = {"a": [True] * 450 + [False] * 50}
    lo, hi = macro_interval(small, ["a"]).values()
    assert lo < 0.9 < hi and macro_interval(small, ["a"]) == macro_interval(small, ["a"])  # deterministic
    assert 0.78 < lo and hi <= 1.0  # about ±0.08 at n=50: 1.96 * sqrt(0.9 * 0.1 / 50)
    big_lo, big_hi = macro_interval(big, ["a"]).values()
    assert big_hi - big_lo < (hi - lo) / 2.5  # 10x the problems: about 1/sqrt(10) the width
    # a macro mean over a big sure family and a small noisy one: the small one carries the width
    mixed = {"sure": [True] * 1000, "noisy": [True, False] * 25}
    out = accuracy_with_intervals(mixed, {"accuracy_base": ["sure", "noisy"], "accuracy_lora": ["noisy"]})
    assert out["accuracy_base"] == 0.75 and out["n"] == {"noisy": 50, "sure": 1000}
    base, noisy = out["ci95"]["accuracy_base"], out["ci95"]["accuracy_lora"]
    assert base["lo"] < 0.75 < base["hi"] and abs((base["hi"] - base["lo"]) - (noisy["hi"] - noisy["lo"]) / 2) < 0.02
    assert out["ci95"]["accuracy"]["sure"] == {"lo": 1.0, "hi": 1.0}


def test_every_accuracy_carries_n_and_an_interval(tokenizer, suite_dir):
    model = tiny_model("llama", tokenizer)
    m = evaluate_suite(model, tokenizer, suite_dir, test_files=TEST_FILES, macro={"accuracy_lora": ["add3"]})
    assert set(m["n"]) == set(m["accuracy"]) == set(m["ci95"]["accuracy"]) and all(n > 0 for n in m["n"].values())
    for name in ("accuracy_base", "accuracy_lora"):
        assert m["ci95"][name]["lo"] <= m[name] <= m["ci95"][name]["hi"]
    assert m["accuracy_lora"] == m["accuracy"]["add3"]
