"""Speed of a 50%-pruned model against the dense one, on one GPU, in the same run.

    python -m stages.prune.bench_speed [--layers 32] [--prompt 512] [--new 512] [--json out.json]

A Llama-3-8B-shaped model (hidden 4096, 32 layers, 32 query / 8 key-value heads, MLP 14336,
vocabulary 128256), bf16, random weights (speed does not depend on them), and the same model
with half of its attention+MLP weights cut out uniformly (4 of 8 key/value groups, MLP 7168 wide)
by the prune stage's surgery. Prefill: one forward over the prompt, logits for the last position
only. Decode: `--new` (512) timed greedy steps after a `--prompt` (512) token prompt, from a static KV cache,
each replayed as one CUDA graph (eager decoding of an 8B model is launch-bound and would hide the
gain). Results before this docstring said so (benchmarks/2026-11-29-*.json, README's H100 table)
timed 125 steps after the 512-token prompt: the call passed new_tokens=128, of which 3 were warm-up.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from transformers import LlamaForCausalLM

from slimforge.evaluate.speed import decode_tokens_per_s, llama3_8b_shape
from slimforge.pruning import PrunePlan, prune_model


def half_plan(config) -> PrunePlan:
    plan = PrunePlan.identity(config)
    for lp in plan.layers:
        lp.kv_heads = [0, 2, 4, 6]
        lp.q_heads = [h for kv in lp.kv_heads for h in range(kv * 4, kv * 4 + 4)]
        lp.channels = list(range(0, config.intermediate_size, 2))
    return plan


@torch.no_grad()
def prefill_ms(model, batch: int, seq: int, reps: int = 10) -> float:
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), device="cuda")
    for _ in range(2):
        model(input_ids=ids, logits_to_keep=1, use_cache=False)
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        model(input_ids=ids, logits_to_keep=1, use_cache=False)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=512, help="prompt tokens before the timed decode steps")
    ap.add_argument("--new", type=int, default=512, help="timed decode steps (new tokens) per sequence")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    torch.manual_seed(0)
    config = llama3_8b_shape(args.layers)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        dense = LlamaForCausalLM(config).eval()
    torch.set_default_dtype(torch.float32)
    pruned = prune_model(dense, half_plan(config))
    n = lambda m: sum(p.numel() for p in m.parameters()) / 1e9  # noqa: E731
    results = {"gpu": torch.cuda.get_device_name(), "command": " ".join(["python -m stages.prune.bench_speed", *sys.argv[1:]]),
               "torch": torch.__version__, "params_b": {"dense": n(dense), "pruned": n(pruned)}, "rows": []}
    print(f"{results['gpu']}: dense {n(dense):.2f}B params, pruned {n(pruned):.2f}B, bf16")
    # (phase, batch, prompt tokens, new tokens): prefill makes none; decode times `new` steps after the prompt
    cases = [("prefill", 1, 2048, 0), ("prefill", 8, 512, 0), ("decode", 1, args.prompt, args.new),
             ("decode", 16, args.prompt, args.new)]
    print(f"{'phase':8s} {'batch':>5s} {'prompt':>6s} {'new':>5s} {'dense':>12s} {'pruned':>12s} {'speedup':>8s}")
    for phase, batch, prompt, new in cases:
        if phase == "prefill":
            d, p = (prefill_ms(m, batch=batch, seq=prompt) for m in (dense, pruned))
            speedup, unit = d / p, "ms"
        else:
            d, p = (decode_tokens_per_s(m, batch_size=batch, prompt_len=prompt, new_tokens=new)[0]
                    for m in (dense, pruned))
            speedup, unit = p / d, "tok/s"
        results["rows"].append({"phase": phase, "batch": batch, "prompt_tokens": prompt, "new_tokens": new,
                                "dense": d, "pruned": p, "unit": unit, "speedup": speedup})
        print(f"{phase:8s} {batch:5d} {prompt:6d} {new:5d} {d:9.2f} {unit:>2s} {p:9.2f} {unit:>2s} {speedup:7.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
