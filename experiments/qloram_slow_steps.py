"""Issue 19 probe: QLoRAM's bimodal step times (benchmarks/2026-11-30-h200-lora-memory-8b-step-times.json).
Is a slow step GPU work that got slower, or a GPU left waiting?

    python -m experiments.qloram_slow_steps --out slow.json [--shape 8b] [--steps 16] [--kinds loram qloram4]

Same models, LoRA, batch and loss as stages.lora.bench_memory (no checkpointing). Every timed step runs
under the PyTorch profiler (CUDA activity only): its wall time, the sum of its kernels' durations (GPU
busy) and that sum per kernel name, so the slowest and fastest steps can be compared kernel by kernel.
Run `nvidia-smi --query-gpu=... -lms 50` beside it to see clocks and throttling. `--trace-dir` also
writes Chrome traces with the host side (where the GPU waited for a launch); sync_sites lists where a
step makes the host wait for the GPU. `--host-probe` instead times steps on one 128-token sequence,
where the GPU's share is small, i.e. the host's own time per step, QLoRAM with and without the host
trims (old_host_path).
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from experiments.profile_qloram import warm_lora_model
from slimforge.evaluate.speed import llama3_8b_shape
from stages.lora.bench_memory import llama32_1b_shape, train_step


def profiled_step(model, optimizer, ids, trace: str | None = None) -> dict:
    """Wall ms, GPU-busy ms and per-kernel ms of one training step (`trace`: also the host side,
    written as a Chrome trace there)."""
    torch.cuda.synchronize()
    activities = [ProfilerActivity.CUDA] + ([ProfilerActivity.CPU] if trace else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        train_step(model, optimizer, ids)
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    per_kernel = defaultdict(float)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            per_kernel[e.name[:90]] += e.device_time / 1e3
    if trace:
        prof.export_chrome_trace(trace)
    return {"wall_ms": wall * 1e3, "gpu_ms": sum(per_kernel.values()), "kernels_ms": dict(per_kernel)}


def sync_sites(model, optimizer, ids) -> dict:
    """Where one training step makes the host wait for the GPU: torch.cuda's sync debug mode warns at
    every synchronising op; each warning's Python call stack (innermost 3 frames) is counted."""
    import traceback
    import warnings

    sites: dict[str, int] = defaultdict(int)
    original = warnings.showwarning

    def record(message, category, filename, lineno, file=None, line=None):
        frames = [f"{f.filename.split('site-packages/')[-1]}:{f.lineno} {f.name}"
                  for f in traceback.extract_stack()[:-1] if "warnings" not in f.filename][-3:]
        sites[str(message)[:60] + " @ " + " <- ".join(reversed(frames))] += 1

    torch.cuda.synchronize()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            train_step(model, optimizer, ids)
        finally:
            torch.cuda.set_sync_debug_mode(0)
            warnings.showwarning = original
    torch.cuda.synchronize()
    return dict(sites)


def host_bound_step_ms(model, optimizer, vocab: int, steps: int = 10) -> float:
    """Median wall ms of a training step on one sequence of 128 tokens: the GPU's share is small,
    so this is the host's time per step (128 rows: still the dequantise path at the 8B shape)."""
    ids = torch.randint(0, vocab, (1, 128), device="cuda")
    times = []
    for i in range(3 + steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        train_step(model, optimizer, ids)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times[3:])[steps // 2] * 1e3


def old_host_path(on: bool) -> None:
    """Before the host trims (kernels.lowbit_dequant.DIRECT_LAUNCH, QuantLinear's once-per-tensors
    check): every dequantise launch through triton's entry point, lowbit_linear's checks every call."""
    import kernels.lowbit_dequant as dequant
    from kernels.lowbit import lowbit_linear
    from kernels.quant_linear import QuantLinear

    dequant.DIRECT_LAUNCH = not on
    if on:
        QuantLinear._lowbit_new = QuantLinear.__dict__.get("_lowbit_new", QuantLinear._lowbit)
        QuantLinear._lowbit = lambda self, x, bias: lowbit_linear(
            x, self.packed, self.scale, self.zero, self.bits, self.group, self.out_features, self.down, self.up, bias)
    elif "_lowbit_new" in QuantLinear.__dict__:
        QuantLinear._lowbit = QuantLinear._lowbit_new


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--shape", choices=("1b", "8b"), default="8b")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--trace-dir", help="also profile --trace-steps steps per kind with the host side, as Chrome traces here")
    ap.add_argument("--trace-steps", type=int, default=4)
    ap.add_argument("--host-probe", action="store_true",
                    help="only the host's time per step (host_bound_step_ms), QLoRAM with and without the host trims")
    ap.add_argument("--kinds", nargs="+", default=["loram", "qloram4"])
    args = ap.parse_args()
    config = llama32_1b_shape() if args.shape == "1b" else llama3_8b_shape()
    result = {"gpu": torch.cuda.get_device_name(), **vars(args), "rows": {}}
    for kind in args.kinds:
        model, optimizer, ids = warm_lora_model(config, kind)
        if args.host_probe:
            row = {}
            for variant in ("new", "old", "new", "old"):
                old_host_path(variant == "old")
                row.setdefault(variant, []).append(round(host_bound_step_ms(model, optimizer, config.vocab_size), 1))
            old_host_path(False)
            result["rows"][kind] = {"host_step_ms": row}
            print(kind, row, flush=True)
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)
            del model, optimizer
            gc.collect()
            torch.cuda.empty_cache()
            continue
        steps = [profiled_step(model, optimizer, ids) for _ in range(args.steps)]
        if args.trace_dir:
            for i in range(args.trace_steps):
                profiled_step(model, optimizer, ids, f"{args.trace_dir}/{kind}_{i}.json")
        result.setdefault("sync_sites", {})[kind] = sync_sites(model, optimizer, ids)
        print(kind, "sync sites", json.dumps(result["sync_sites"][kind], indent=1), flush=True)
        fast, slow = min(steps, key=lambda s: s["wall_ms"]), max(steps, key=lambda s: s["wall_ms"])
        delta = {k: slow["kernels_ms"].get(k, 0) - fast["kernels_ms"].get(k, 0)
                 for k in set(slow["kernels_ms"]) | set(fast["kernels_ms"])}
        top = sorted(delta.items(), key=lambda kv: -abs(kv[1]))[:8]
        result["rows"][kind] = {"wall_ms": [round(s["wall_ms"], 1) for s in steps],
                                "gpu_ms": [round(s["gpu_ms"], 1) for s in steps],
                                "slowest_minus_fastest_by_kernel_ms": {k: round(v, 2) for k, v in top},
                                "fastest_kernels_ms": {k: round(v, 2) for k, v in sorted(
                                    fast["kernels_ms"].items(), key=lambda kv: -kv[1])[:10]}}
        print(kind, json.dumps(result["rows"][kind], indent=1), flush=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        del model, optimizer
        gc.collect()
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
