"""Benchmark the low-bit matmul against cuBLAS fp16 (F.linear) on one GPU, in the same run.

    python -m kernels.bench_lowbit --out bench.json [--configs-out lowbit_configs.json]
        [--shapes 4096x4096 14336x4096 4096x14336] [--m 1 16 64 256] [--formats 4:128 3:128 2:128 2:64]

Every timed call starts with a cold L2: a 256 MB buffer (the H100's L2 is 50 MB, an fp16 4096x4096
weight 32 MB) is zeroed before it, then the GPU spins for ~0.5 ms (torch.cuda._sleep) so the
Python launch overhead of the next call is hidden (kernels.lowbit_tune.gpu_time_us, which the
tuner uses too); CUDA events bracket the call alone; median of --reps. No CUDA graphs. Ratios are
cuBLAS time / low-bit time (> 1: the low-bit kernel is faster).

Sections: (1) forward y = x @ W^T per shape, format (bits:group) and M; (2) the fused rank-r
correction at M in --lr-m: plain low-bit kernel vs fused vs unfused (plain kernel + two matmuls and
an add); (3) GEMV vs GEMM for M = 2, 4 (picks GEMV_MAX_M); (4) the input gradient dx = dy @ W at
M = --dx-m vs cuBLAS; (5) PyTorch's int4 kernel as a peer (kernels/bench_peer.py). Configs are
tuned on first use (kernels/lowbit_tune.py); candidate kernels are
compiled first in parallel worker processes (into Triton's disk cache) so tuning only times them.
--configs-out writes the tuned table for this GPU (to ship as kernels/lowbit_configs.json).

Last runs (H200, torch 2.11, triton 3.6, g128, ratios vs cuBLAS fp16):
benchmarks/2026-11-30-h200-lowbit-prefetch-dispatch.json: W4 M=1 1.85-2.15x, W2 1.82-2.15x; fused
rank-64 correction +21-33% (M=1); PyTorch's int4 kernel at M=1 1.76-1.82x (ours 1.76-2.14x in bf16).
benchmarks/2026-11-30-h200-lowbit-fields-dispatch.json (the per-field GEMM): W4 M=8 1.07-1.15x, M=16
1.01-1.06x, M=32 0.78-0.94x; W2 0.93-1.01x, 0.89-0.95x, 0.73-0.82x; fused correction at M=16 +13-26%. A kernel that only streams the packed bytes reaches 2.28-2.99x (W4) in this harness
(benchmarks/2026-11-30-h200-lowbit-gemv-grid.json). Timings vary ~5-20% between machines of the pool.
benchmarks/2026-11-30-h200-lowbit-mma-v2.json (per-field GEMM on mma.sync, 4 shapes incl. 1024x4096): W4
M=8 1.11-1.19x, M=16 1.03-1.12x, M=32 0.83-0.95x; W2 0.92-1.12x, 0.98-1.07x, 0.75-0.99x.
This harness isolates each call (cold L2, idle GPU before it); back to back in a CUDA graph cuBLAS
runs 6-10 us faster per call and M=16 reads 0.80-0.95x on the 8B shapes
(benchmarks/2026-11-30-h200-lowbit-graph-chain.json, experiments/lowbit_graph_chain.py).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import time

import torch
import torch.nn.functional as F

from kernels import lowbit, lowbit_tune
from kernels.lowbit_tune import gpu_time_us  # noqa: F401  (the harness; bench_peer and experiments import it here)
from kernels.lowbit_dequant import dequantize
from kernels.lowbit_format import dequantize_groups, pack, quantize_groups, storage_bits_per_weight, unpack

def _short(cfg: dict) -> str:
    return "/".join(str(v) for k, v in cfg.items() if k != "num_stages")


def make_weight(n: int, k: int, bits: int, group: int, seed: int = 0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    w = torch.randn(n, k, device="cuda", generator=gen) * 0.02
    q, scale, zero = quantize_groups(w, bits, group)
    return w.half(), pack(q, bits), scale, zero


def make_problem(n: int, k: int, bits: int, group: int, m: int):
    """make_weight's tensors, an fp16 x (m, k) and the fp32 reference x @ W_hat^T."""
    w16, packed, scale, zero = make_weight(n, k, bits, group)
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    ref = x.float() @ dequantize_groups(unpack(packed, bits, k), scale, zero, group).t()
    return w16, packed, scale, zero, x, ref


# --------------------------------------------------------------------------------------------
# parallel precompilation of tuning candidates

_WORKER_CACHE: dict = {}


def _compile_job(job) -> str:
    n, k, bits, group, m, kind, cfg, rank = job
    try:
        key = (n, k, bits, group, m)
        if key not in _WORKER_CACHE:
            _WORKER_CACHE.clear()
            words = k * bits // 32
            _WORKER_CACHE[key] = (torch.zeros(n, words, dtype=torch.int32, device="cuda"),
                                  torch.ones(n, k // group, dtype=torch.float16, device="cuda"),
                                  torch.zeros(n, k // group, dtype=torch.float16, device="cuda"),
                                  torch.zeros(m, k if kind != "dx" else n, dtype=torch.float16, device="cuda"))
        packed, scale, zero, a = _WORKER_CACHE[key]
        if kind == "dx":
            lowbit._input_grad(a, packed, scale, zero, bits, group, k, None, None, cfg=cfg)
        else:
            lr = [torch.zeros(rank, k, dtype=torch.float16, device="cuda"),
                  torch.zeros(n, rank, dtype=torch.float16, device="cuda")] if rank else [None, None]
            lowbit._forward(a, packed, scale, zero, bits, group, *lr, None, cfg=cfg, kind=kind)
        torch.cuda.synchronize()
        return ""
    except Exception as exc:  # noqa: BLE001 -- reported, the tuner skips it too
        return f"{job}: {type(exc).__name__}: {str(exc)[:200]}"


def precompile(points, workers: int) -> None:
    """points: (n, k, bits, group, m, kind, rank); compiles every tuning candidate not yet tuned
    (rank > 0: the fused low-rank variant, tuned apart)."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    gpu = torch.cuda.get_device_name()
    jobs = {}  # one per compiled binary: sizes here are all multiples of 16, so only M == 1 specialises
    for n, k, bits, group, m, kind, rank in points:
        key = lowbit_tune.config_key(kind, m, n, k, bits, group) + ("|lr" if rank else "")
        if key in lowbit_tune.tables().get(gpu, {}):
            continue
        for cfg in lowbit_tune.CANDIDATES[kind](m, n, k, bits, sms, group):
            jobs.setdefault((kind, bits, group, m == 1, rank > 0, tuple(sorted(cfg.items()))),
                            (n, k, bits, group, m, kind, cfg, rank))
    jobs = list(jobs.values())
    if not jobs:
        return
    t0 = time.time()
    with mp.get_context("spawn").Pool(workers) as pool:
        errors = [e for e in pool.map(_compile_job, jobs, chunksize=1) if e]
    print(f"precompiled {len(jobs)} candidate kernels in {time.time() - t0:.0f}s with {workers} workers"
          + (f"; {len(errors)} failed, e.g. {errors[0]}" if errors else ""), flush=True)


# --------------------------------------------------------------------------------------------


def forward_rows(args, formats) -> list[dict]:
    rows = []
    print(f"\n{'N x K':>12s} {'fmt':>6s} {'M':>4s} {'kernel':>6s} {'cuBLAS us':>10s} {'lowbit us':>10s} {'ratio':>6s} "
          f"{'GB/s':>6s} {'bw ratio':>8s} {'rel err':>8s}", flush=True)
    for n, k in args.shapes:
        for bits, group in formats:
            w16, packed, scale, zero = make_weight(n, k, bits, group)
            w_hat = dequantize_groups(unpack(packed, bits, k), scale, zero, group)
            for m in args.m:
                x = torch.randn(m, k, device="cuda", dtype=torch.float16)
                n_log = len(lowbit_tune.TUNE_LOG)
                y = lowbit.lowbit_linear(x, packed, scale, zero, bits, group)  # tunes on first use
                tuning = [[(round(t, 1), c) for t, c in log] for log in lowbit_tune.TUNE_LOG[n_log:]]
                ref = x.float() @ w_hat.t()
                err = ((y.float() - ref).abs().max() / ref.abs().max()).item()
                t_cublas = gpu_time_us(lambda: F.linear(x, w16), args.reps)
                t_low = gpu_time_us(lambda: lowbit.lowbit_linear(x, packed, scale, zero, bits, group), args.reps)
                moved = n * k * storage_bits_per_weight(bits, group) / 8 + 2 * m * (n + k)
                row = dict(section="forward", n=n, k=k, bits=bits, group=group, m=m, kernel=lowbit.kernel_kind(m, bits),
                           cublas_us=t_cublas, lowbit_us=t_low, ratio=t_cublas / t_low, lowbit_gbps=moved / t_low / 1e3,
                           bandwidth_ratio=16 / storage_bits_per_weight(bits, group), rel_err=err, tuning=tuning)
                rows.append(row)
                print(f"{n:>5d}x{k:<6d} {bits}:{group:<4d} {m:4d} {row['kernel']:>6s} {t_cublas:10.1f} {t_low:10.1f} "
                      f"{row['ratio']:5.2f}x {row['lowbit_gbps']:6.0f} {row['bandwidth_ratio']:7.2f}x {err:8.1e}"
                      + "".join(f"  [tuned: {', '.join(f'{t}us {_short(c)}' for t, c in log[:3])}]" for log in tuning),
                      flush=True)
            del w16, packed, scale, zero, w_hat
            torch.cuda.empty_cache()
    return rows


def lowrank_formats(formats):
    """The first two formats that are not 3-bit (default: 4:128, 2:128)."""
    return [f for f in formats if f[0] != 3][:2]


def lowrank_rows(args, formats) -> list[dict]:
    rows = []
    r = args.rank
    print(f"\nrank-{r} correction: time over the plain low-bit kernel")
    print(f"{'N x K':>12s} {'fmt':>6s} {'M':>4s} {'plain us':>9s} {'fused us':>9s} {'unfused us':>10s} "
          f"{'fused +%':>8s} {'unfused +%':>10s} {'rel err':>8s}", flush=True)
    for n, k in args.shapes:
        for bits, group in formats:
            _, packed, scale, zero = make_weight(n, k, bits, group)
            w_hat = dequantize_groups(unpack(packed, bits, k), scale, zero, group)
            down = torch.randn(r, k, device="cuda", dtype=torch.float16) * 0.02
            up = torch.randn(n, r, device="cuda", dtype=torch.float16) * 0.02
            for m in args.lr_m:
                x = torch.randn(m, k, device="cuda", dtype=torch.float16)
                y = lowbit.lowbit_linear(x, packed, scale, zero, bits, group, down=down, up=up)
                ref = x.float() @ w_hat.t() + (x.float() @ down.float().t()) @ up.float().t()
                err = ((y.float() - ref).abs().max() / ref.abs().max()).item()
                plain = gpu_time_us(lambda: lowbit.lowbit_linear(x, packed, scale, zero, bits, group), args.reps)
                fused = gpu_time_us(lambda: lowbit.lowbit_linear(x, packed, scale, zero, bits, group, down=down, up=up),
                                    args.reps)
                unfused = gpu_time_us(lambda: lowbit.lowbit_linear(x, packed, scale, zero, bits, group)
                                      + (x @ down.t()) @ up.t(), args.reps)
                row = dict(section="lowrank", n=n, k=k, bits=bits, group=group, m=m, rank=r, plain_us=plain,
                           fused_us=fused, unfused_us=unfused, fused_overhead=fused / plain - 1,
                           unfused_overhead=unfused / plain - 1, rel_err=err)
                rows.append(row)
                print(f"{n:>5d}x{k:<6d} {bits}:{group:<4d} {m:4d} {plain:9.1f} {fused:9.1f} {unfused:10.1f} "
                      f"{100 * row['fused_overhead']:7.1f}% {100 * row['unfused_overhead']:9.1f}% {err:8.1e}", flush=True)
    return rows


def threshold_rows(args) -> list[dict]:
    rows = []
    n, k = args.shapes[0]
    print(f"\nGEMV vs GEMM at small M ({n}x{k}); GEMV_MAX_M is {lowbit.GEMV_MAX_M}")
    for bits, group in ((4, 128), (2, 128)):
        _, packed, scale, zero = make_weight(n, k, bits, group)
        for m in (2, 4):
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            times = {}
            for kind in ("gemv", "gemm"):
                lowbit._forward(x, packed, scale, zero, bits, group, None, None, None, kind=kind)
                times[kind] = gpu_time_us(lambda: lowbit._forward(x, packed, scale, zero, bits, group, None, None, None,
                                                                  kind=kind), args.reps)
            rows.append(dict(section="threshold", n=n, k=k, bits=bits, group=group, m=m, **{f"{kk}_us": v for kk, v in times.items()}))
            print(f"  {bits}:{group} M={m}: GEMV {times['gemv']:.1f} us, GEMM {times['gemm']:.1f} us", flush=True)
    return rows


def dx_formats(formats):
    return [f for f in formats if f[1] == 128 and f[0] in (4, 2)] or formats[:1]


def dx_rows(args, formats) -> list[dict]:
    rows = []
    m = args.dx_m
    print(f"\ninput gradient dx = dy @ W at M={m}")
    for n, k in args.shapes:
        for bits, group in dx_formats(formats):
            w16, packed, scale, zero = make_weight(n, k, bits, group)
            w_hat = dequantize_groups(unpack(packed, bits, k), scale, zero, group)
            dy = torch.randn(m, n, device="cuda", dtype=torch.float16)
            kind = lowbit.kernel_kind(m, bits)  # what lowbit_linear's backward runs at this M

            def input_grad():
                if kind == "dequant":
                    return dy @ dequantize(packed, scale, zero, bits, group, k, dy.dtype)
                return lowbit._input_grad(dy, packed, scale, zero, bits, group, k, None, None)

            ref = dy.float() @ w_hat
            err = ((input_grad().float() - ref).abs().max() / ref.abs().max()).item()
            t_cublas = gpu_time_us(lambda: dy @ w16, args.reps)
            t_low = gpu_time_us(input_grad, args.reps)
            rows.append(dict(section="dx", n=n, k=k, bits=bits, group=group, m=m, kernel=kind, cublas_us=t_cublas,
                             lowbit_us=t_low, ratio=t_cublas / t_low, rel_err=err))
            print(f"  {n}x{k} {bits}:{group}: cuBLAS {t_cublas:.1f} us, low-bit {t_low:.1f} us, {t_cublas / t_low:.2f}x, "
                  f"rel err {err:.1e}", flush=True)
            del w16, packed, scale, zero, w_hat
            torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench_lowbit.json")
    ap.add_argument("--configs-out", default=None)
    ap.add_argument("--shapes", nargs="+", default=["4096x4096", "14336x4096", "4096x14336"])
    ap.add_argument("--m", type=int, nargs="+", default=[1, 16, 64, 256])
    ap.add_argument("--formats", nargs="+", default=["4:128", "3:128", "2:128", "2:64"])
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--lr-m", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--dx-m", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=40)
    ap.add_argument("--workers", type=int, default=max(1, min(14, (os.cpu_count() or 2) - 2)))
    ap.add_argument("--skip", nargs="*", default=[], choices=["lowrank", "threshold", "dx", "peer"])
    ap.add_argument("--precompile-only", action="store_true", help="compile the tuning candidates and exit")
    args = ap.parse_args()
    args.shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes]
    formats = [tuple(int(v) for v in f.split(":")) for f in args.formats]
    gpu = torch.cuda.get_device_name()
    print(f"{gpu}, torch {torch.__version__}, triton {lowbit.triton.__version__}", flush=True)

    points = [(n, k, b, g, m, lowbit.kernel_kind(m, b), 0) for n, k in args.shapes for b, g in formats for m in args.m]
    if "lowrank" not in args.skip:
        points += [(n, k, b, g, m, lowbit.kernel_kind(m, b), args.rank) for n, k in args.shapes
                   for b, g in lowrank_formats(formats) for m in args.lr_m]
    points = [p for p in points if p[5] != "dequant"]  # cuBLAS + one fixed dequantise kernel: nothing to tune
    if "threshold" not in args.skip:
        points += [(*args.shapes[0], b, 128, m, kind, 0) for b in (4, 2) for m in (2, 4) for kind in ("gemv", "gemm")]
    if "dx" not in args.skip:
        points += [(n, k, b, g, args.dx_m, "dx", 0) for n, k in args.shapes for b, g in dx_formats(formats)
                   if lowbit.kernel_kind(args.dx_m, b) != "dequant"]
    precompile(points, args.workers)
    if args.precompile_only:
        return

    rows = forward_rows(args, formats)
    if "lowrank" not in args.skip:
        rows += lowrank_rows(args, lowrank_formats(formats))
    if "threshold" not in args.skip:
        rows += threshold_rows(args)
    if "dx" not in args.skip:
        rows += dx_rows(args, formats)
    if "peer" not in args.skip:
        from kernels.bench_peer import peer_rows

        rows += peer_rows(args, args.shapes)

    configs = lowbit_tune.tables().get(gpu, {})
    with open(args.out, "w") as f:
        json.dump(dict(gpu=gpu, torch=torch.__version__, triton=lowbit.triton.__version__, rows=rows,
                       configs=configs), f, indent=1)
    if args.configs_out:
        with open(args.configs_out, "w") as f:
            json.dump({gpu: configs}, f, indent=1, sort_keys=True)
    print(f"\nwrote {args.out}" + (f" and {args.configs_out}" if args.configs_out else ""))


if __name__ == "__main__":
    main()
