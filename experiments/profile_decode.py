"""Issue 19 probe: where a batch-16 decode step of the Llama-3-8B-shape model spends its GPU time,
bf16 against W4/W2 g128 (static cache + CUDA graph, as stages.quantize.bench_speed runs it).

    python -m experiments.profile_decode --out profile.json [--layers 32] [--batch 16] [--steps 24]

Kernel times from torch.profiler (CUPTI traces the kernels inside graph replays), summed per kernel
name and per step, grouped as low-bit kernels, cuBLAS/CUTLASS GEMMs, and everything else. The
question it answers: the linears alone measure 1.03-1.12x cuBLAS at M=16 in the kernel benchmark,
yet the W4 step is no faster than bf16's -- which kernels make up the difference?
"""

from __future__ import annotations

import argparse
import copy
import json
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile
from slimforge.evaluate.speed import graph_decode
from slimforge.quantized import pack_linears
from stages.quantize.bench_speed import dense_8b


def group_of(name: str) -> str:
    if "_gemm_kernel" in name or "_gemv_kernel" in name or "_dequant" in name:
        return "lowbit"
    if any(s in name for s in ("gemm", "xmma", "cutlass", "nvjet", "sm90_", "cublas")):
        return "cublas"
    return "other"


def step_profile(model, batch: int, steps: int) -> dict:
    graph_decode(model, batch_size=batch, prompt_len=128, new_tokens=2 * steps)  # compile, tune, warm
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        _, seconds = graph_decode(model, batch_size=batch, prompt_len=128, new_tokens=steps)
    per_name = defaultdict(float)
    counts = defaultdict(int)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            per_name[e.name] += e.device_time_total
            counts[e.name] += 1
    # graph_decode's first WARMUP steps and the prompt run eagerly: normalise by what was traced in total
    groups = defaultdict(float)
    for name, us in per_name.items():
        groups[group_of(name)] += us
    top = sorted(per_name.items(), key=lambda kv: -kv[1])[:25]
    return dict(wall_s=seconds, groups_us=dict(groups), top=[(n[:120], round(us, 1), counts[n]) for n, us in top])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=24)
    args = ap.parse_args()
    dense = dense_8b(args.layers)
    result = {"gpu": torch.cuda.get_device_name(), "batch": args.batch, "steps": args.steps, "rows": {}}
    for label, bits in (("bf16", 0), ("W4 g128", 4), ("W2 g128", 2)):
        model = dense if not bits else pack_linears(copy.deepcopy(dense), bits=bits, group=128, rank=0)
        torch.cuda.empty_cache()
        row = step_profile(model, args.batch, args.steps)
        result["rows"][label] = row
        print(label, {k: round(v) for k, v in row["groups_us"].items()}, flush=True)
        for n, us, c in row["top"][:12]:
            print(f"   {us:10.1f} us {c:6d}x  {n}", flush=True)
        if bits:
            del model
            torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
