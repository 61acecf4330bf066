"""Issue 19 probe: where does QLoRAM training lose time against LoRAM? One profiled step each.

    python -m experiments.profile_qloram [--steps 3]

Same models, batch and LoRA as stages.lora.bench_memory (1B shape, 50% pruned; QLoRAM = that pruned
model packed to 4 bits). Prints wall time per step, the GPU-busy time inside it (sum of kernel
times), and the top CUDA kernels by total time.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import pstats
import time

import torch
from torch.profiler import ProfilerActivity, profile

from slimforge.adapters import add_lora
from slimforge.config import PROJECTIONS
from stages.lora.bench_memory import build, llama32_1b_shape, train_step


def warm_lora_model(config, kind: str):
    """bench_memory's `kind` model (50% pruned) with rank-16 LoRA on every projection, its AdamW and a
    batch of 8 x 512 random tokens, after three untimed steps (autotune, allocator)."""
    model = add_lora(build(config, kind, 0.5), rank=16, alpha=32, targets=list(PROJECTIONS))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, config.vocab_size, (8, 512), device="cuda")
    for _ in range(3):
        train_step(model, optimizer, ids)
    return model, optimizer, ids


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    config = llama32_1b_shape()
    for kind in ("loram", "qloram4"):
        model, opt, ids = warm_lora_model(config, kind)
        torch.cuda.synchronize()
        before = torch.cuda.memory_stats()
        times = []
        for _ in range(args.steps):
            t = time.perf_counter()
            train_step(model, opt, ids)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        after = torch.cuda.memory_stats()
        print(f"\n{kind}: allocator over the timed steps: " + ", ".join(
            f"{k} +{after.get(k, 0) - before.get(k, 0)}" for k in ("num_alloc_retries", "num_device_alloc", "num_device_free",
                                                                   "num_sync_all_streams")), flush=True)
        pr = cProfile.Profile()
        pr.enable()
        train_step(model, opt, ids)
        torch.cuda.synchronize()
        pr.disable()
        pstats.Stats(pr).sort_stats("tottime").print_stats(14)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            train_step(model, opt, ids)
            torch.cuda.synchronize()
        events = prof.key_averages()
        gpu_us = sum(e.self_device_time_total for e in events)
        print(f"\n== {kind}: step wall {1000 * min(times):.1f} ms (min of {args.steps}), {sorted(1000 * t for t in times)}; "
              f"GPU kernel time in the profiled step {gpu_us / 1000:.1f} ms", flush=True)
        print(events.table(sort_by="self_device_time_total", row_limit=6, max_name_column_width=60), flush=True)
        del model, opt
        gc.collect()
        torch.cuda.empty_cache()
