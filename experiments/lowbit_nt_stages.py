"""Issue 19 probe, M = 64 (W4 0.80-0.82x cuBLAS, target 0.85x): is the NT GEMM with half2
dequantisation short of pipeline depth or of tile width? The tuner offers it 2-3 stages and 32-128
rows of W; this grid adds 4 and 5 stages and 256 rows, and times every tile in one run against the
shipped pick and cuBLAS fp16, g128, fp16 x.

    python -m experiments.lowbit_nt_stages --out nt_stages.json [--m 64] [--bits 4 2]

Why: Nsight Compute at M=64 found the NT GEMM latency-bound (11% achieved occupancy, DRAM 8%),
where more loads in flight per program is the usual remedy (benchmarks/2026-12-01-h200-lowbit-nt-gemm.json).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess

import torch
import torch.nn.functional as F
import triton

from kernels import lowbit, lowbit_tune
from kernels.bench_lowbit import gpu_time_us

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (1024, 4096)]


def grid(M, N, K, sms):
    """NT tiles, BLOCK_K 128 (one group per tile, half2), 64-128 rows of x, 32-256 rows of W,
    split-K 1-8 where it leaves 0.5-8 programs per SM, 4 or 8 warps, 2-5 stages."""
    out = []
    for bm in sorted({min(64, M), min(128, M)}):
        for bn in (32, 64, 128, 256):
            for split in (1, 2, 4, 8):
                progs = math.ceil(N / bn) * math.ceil(M / bm) * split
                if not (sms // 2 <= progs <= 8 * sms) or K / split < 2 * 128:
                    continue
                for warps in (4, 8):
                    for stages in (2, 3, 4, 5):
                        out.append(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=128, SPLIT_K=split, num_warps=warps,
                                        num_stages=stages, NT=1, HALF2=1))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out")
    ap.add_argument("--m", type=int, nargs="+", default=[64])
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 2])
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--workers", type=int, default=14)
    args = ap.parse_args()
    from experiments.lowbit_fields import compile_jobs, problems
    from experiments.lowbit_small_m import rel_err, time_configs
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    jobs = {}
    for n, k in SHAPES:
        for bits in args.bits:
            for m in args.m:
                for cfg in grid(m, n, k, sms):
                    jobs.setdefault((bits, tuple(sorted(cfg.items()))), (n, k, bits, 128, m, "gemm", cfg, 0))
    compile_jobs(list(jobs.values()), args.workers)
    rows = []
    for n, k, bits, m, w16, packed, scale, zero, x, ref in problems(SHAPES, args.bits, args.m):
        run_cfg = lambda cfg: lowbit._forward(x, packed, scale, zero, bits, 128, None, None, None, cfg=cfg, kind="gemm")
        timed = time_configs(grid(m, n, k, sms), run_cfg, ref)
        t_cublas = gpu_time_us(lambda: F.linear(x, w16), args.reps)
        shipped_cfg = lowbit_tune.tables().get(torch.cuda.get_device_name(), {}).get(
            lowbit_tune.config_key("gemm", m, n, k, bits, 128))
        t_shipped = gpu_time_us(lambda: lowbit.lowbit_linear(x, packed, scale, zero, bits, 128), args.reps)
        best = []
        for _, err, cfg in timed[:4]:  # do_bench ranks; the harness (cold L2, launch hidden) decides
            t = gpu_time_us(lambda: run_cfg(cfg), args.reps)
            best.append(dict(cfg=cfg, us=t, ratio=t_cublas / t, rel_err=err))
        best.sort(key=lambda b: b["us"])
        by_stages = {s: min((t for t, _, c in timed if c["num_stages"] == s), default=None) for s in (2, 3, 4, 5)}
        by_bn = {bn: min((t for t, _, c in timed if c["BLOCK_N"] == bn), default=None) for bn in (32, 64, 128, 256)}
        row = dict(n=n, k=k, bits=bits, m=m, cublas_us=t_cublas, shipped_us=t_shipped, shipped_ratio=t_cublas / t_shipped,
                   shipped_cfg=shipped_cfg, n_configs=len(timed), best=best, do_bench_best_by_stages=by_stages,
                   do_bench_best_by_block_n=by_bn, max_rel_err=max((e for _, e, _ in timed), default=None))
        rows.append(row)
        print(f"{n}x{k} W{bits} M={m}: cuBLAS {t_cublas:.1f} | shipped {t_shipped:.1f} {t_cublas / t_shipped:.2f}x | best "
              + ", ".join(f"{b['us']:.1f} {b['ratio']:.2f}x (bn {b['cfg']['BLOCK_N']} s{b['cfg']['SPLIT_K']} "
                          f"w{b['cfg']['num_warps']} st{b['cfg']['num_stages']})" for b in best[:2])
              + " | stages " + " ".join(f"{s}:{v:.1f}" for s, v in by_stages.items() if v)
              + f" | {len(timed)} configs", flush=True)
    if args.out:
        meta = dict(command="python -m experiments.lowbit_nt_stages " + " ".join(
            f"--{k} {' '.join(map(str, v)) if isinstance(v, list) else v}" for k, v in vars(args).items() if k != "out"),
                    gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                    commit=subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip())
        with open(args.out, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
