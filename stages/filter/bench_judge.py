"""Judging throughput: Meta Ranking pairs per second with a realistic judge shape, batched vs one
pair at a time, on one GPU in the same run.

    python -m stages.filter.bench_judge [--pairs 4096] [--json out.json]

A Llama-3.2-1B-shaped judge (hidden 2048, 16 layers, GQA 32/8, MLP 8192, vocabulary 128256) with
random weights in bf16 (speed does not depend on them), the embedded suite's tokenizer and
pairwise prompts. A pair is judged in both orders (two prompts); verdicts are read from the
last position's log-probs through the fused kernel.
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from slimforge.tasks.judge import VERDICTS, pairwise_prompt, verify_prompt
from slimforge.tasks.suite import noisy_records, reference_records
from slimforge.tokenizer import build_tokenizer
from slimforge.evaluate.judging import pairwise_win_probs


def judge_1b() -> LlamaForCausalLM:
    config = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, max_position_embeddings=2048,
                         tie_word_embeddings=True)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).eval()
    torch.set_default_dtype(torch.float32)
    return model


def pairs_per_s(model, tokenizer, targets, refs, batch_size: int) -> float:
    pairwise_win_probs(model, tokenizer, targets[:8], refs[:8], batch_size=batch_size)  # warm-up
    torch.cuda.synchronize()
    start = time.perf_counter()
    pairwise_win_probs(model, tokenizer, targets, refs, batch_size=batch_size)
    torch.cuda.synchronize()
    return len(targets) / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=4096)
    ap.add_argument("--single", type=int, default=128, help="pairs timed one at a time")
    ap.add_argument("--json")
    args = ap.parse_args()
    targets, _ = noisy_records(("add", "sub", "mul"), args.pairs, 0.3, 0.5, random.Random(0))
    pool = reference_records(("add", "sub", "mul"), 200, 0.5, random.Random(1))
    rng = random.Random(2)
    refs = [[rng.choice(pool)] for _ in targets]
    texts = [pairwise_prompt((t["prompt"], t["response"]), (r["prompt"], r["response"])) + " A" + " B"
             for t, (r,) in zip(targets, refs)] + [verify_prompt(t["prompt"], t["response"]) + " yes no"
                                                    for t in targets]
    tokenizer = build_tokenizer(texts, vocab_size=300, must_be_single=[v for pair in VERDICTS.values() for v in pair])
    tokenizer.padding_side = "left"
    model = judge_1b()
    result = {"gpu": torch.cuda.get_device_name(), "judge": "Llama 1B shape, bf16"}
    for bs in (256, 1024):
        result[f"batched_{bs}"] = pairs_per_s(model, tokenizer, targets, refs, batch_size=bs)
    result["one_at_a_time"] = pairs_per_s(model, tokenizer, targets[:args.single], refs[:args.single], batch_size=1)
    result["speedup"] = max(result["batched_256"], result["batched_1024"]) / result["one_at_a_time"]
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
