"""Issue 19 probe: what bounds the end-to-end decode speed-up of the W4 model over bf16 (Llama-3-8B
shape, static cache, one CUDA graph per step, as stages.quantize.bench_speed runs it).

    python -m experiments.decode_breakdown --out breakdown.json [--layers 32] [--batch 1 16] [--steps 32] [--fuse]

Only the graph replays are timed and profiled (experiments/profile_decode.py also traces the eager
prefill and warm-up steps). Per step: wall time (CUDA events around the replays), and the kernel
times torch.profiler sees inside them, grouped as the low-bit linears, cuBLAS (the decoder linears
in bf16; only lm_head in the W4 model) and everything else (norms, rotary, attention, cache
writes, residual adds, argmax). Amdahl then bounds the W4 speed-up: with everything but the
low-bit kernels as measured, `ceiling_at(r)` is the step speed-up if the low-bit linears ran r
times faster than the bf16 linears they replace, and `ceiling_free` if they took no time at all.
--fuse: the W4 model's q|k|v and gate|up projections fused (slimforge/fused_projections.py), bf16 as is.
"""

from __future__ import annotations

import argparse
import copy
import json
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import StaticCache

from experiments.profile_decode import group_of
from slimforge.evaluate.speed import WARMUP, _next, _prompt
from slimforge.fused_projections import fuse_projections
from slimforge.modeling import cache_kwarg
from slimforge.quantized import pack_linears
from stages.quantize.bench_speed import dense_8b


@torch.no_grad()
def step_graph(model, batch: int, prompt_len: int, max_new: int, step_forward=None) -> torch.cuda.CUDAGraph:
    """One decode step captured as a CUDA graph (the capture slimforge.evaluate.speed.graph_decode
    makes); every replay advances the static cache by one token. `step_forward` (default: the model)
    runs the decode steps, e.g. a torch.compile'd model; the prompt always runs eagerly."""
    step_forward = model if step_forward is None else step_forward
    cache = StaticCache(config=model.config, max_cache_len=prompt_len + max_new + 1)
    kw = {cache_kwarg(model): cache}
    token = _next(model(input_ids=_prompt(model, batch, prompt_len), use_cache=True, **kw).logits)
    position = torch.full((batch, 1), prompt_len, device=token.device)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(WARMUP):
            token.copy_(_next(step_forward(input_ids=token, position_ids=position, use_cache=True, **kw).logits))
            position += 1
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        token.copy_(_next(step_forward(input_ids=token, position_ids=position, use_cache=True, **kw).logits))
        position += 1  # captured too: a replay is a whole step
    return graph


def replay_us(graph: torch.cuda.CUDAGraph, steps: int) -> float:
    """Microseconds per replay over `steps` replays (CUDA events), after one untimed replay."""
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / steps


def measure(model, batch: int, steps: int) -> dict:
    graph = step_graph(model, batch, prompt_len=128, max_new=3 * steps + WARMUP + 2)
    step_us = replay_us(graph, steps)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            graph.replay()
        torch.cuda.synchronize()
    groups, names = defaultdict(float), defaultdict(float)
    kernels = 0
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            groups[group_of(e.name)] += e.device_time_total / steps
            names[e.name[:100]] += e.device_time_total / steps
            kernels += 1
    top = sorted(names.items(), key=lambda kv: -kv[1])[:10]
    return dict(step_us=step_us, kernels_per_step=kernels / steps, groups_us={k: round(v, 1) for k, v in groups.items()},
                gap_us=step_us - sum(groups.values()), top=[(n, round(us, 1)) for n, us in top])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--fuse", action="store_true")
    args = ap.parse_args()
    dense = dense_8b(args.layers)
    result = {"gpu": torch.cuda.get_device_name(), "layers": args.layers, "rows": []}
    quant = pack_linears(copy.deepcopy(dense), bits=4, group=128, rank=0)
    if args.fuse:
        fuse_projections(quant)
    result["fused"] = args.fuse
    for batch in args.batch:
        base, w4 = measure(dense, batch, args.steps), measure(quant, batch, args.steps)
        # bf16 decoder linears = bf16 cuBLAS time minus lm_head's (W4's cuBLAS time is lm_head alone)
        linears_bf16 = base["groups_us"]["cublas"] - w4["groups_us"].get("cublas", 0.0)
        rest = w4["step_us"] - w4["groups_us"]["lowbit"]  # everything the low-bit kernels do not cover
        row = dict(batch=batch, bf16=base, w4=w4, speedup=base["step_us"] / w4["step_us"],
                   linears_bf16_us=linears_bf16, linears_ratio=linears_bf16 / w4["groups_us"]["lowbit"],
                   ceiling_free=base["step_us"] / rest,
                   ceiling_at={r: base["step_us"] / (rest + linears_bf16 / r) for r in (2.5, 3.0, 4.0)})
        result["rows"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k not in ("bf16", "w4")}), flush=True)
        for label in ("bf16", "w4"):
            print(label, json.dumps(row[label]), flush=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
