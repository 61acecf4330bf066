"""Issue 19 probe, M = 16..128: the per-field GEMM (FIELDS) and the un-swapped one (NT) with half2
dequantisation (HALF2: kernels/lowbit_half2._half2_pair, two weights per LOP3 / HSUB2 / HMUL2)
against the same grid with the fp32 route, the shipped dispatch and cuBLAS fp16, one run, g128,
fp16 x.

    python -m experiments.lowbit_half2 --out half2.json [--m 16 32 64 128] [--bits 4 2]

Why: at M = 16..64 the fused GEMMs are bound by the dequantisation's instruction count (ncu at
M=64: ~9 instructions per weight, benchmarks/2026-12-01-h200-lowbit-nt-gemm.json), where the
fp32 route spends ~5 ALU ops on each weight (shift, LOP3, FADD, FMUL, F2F).
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


def grid(M, N, K, bits, sms):
    """Up to M = 32 FIELDS 1/2 tiles (2-bit: both x orders; 4-bit: gathered), wgmma and mma.sync; from
    M = 17 the tuner's NT tiles of BLOCK_K 128 (one group per tile); HALF2 off and on."""
    out = [dict(c, HALF2=half2) for c in lowbit_tune._nt_candidates(M, N, K, bits, sms, 128) if c["BLOCK_K"] == 128
           for half2 in (0, 1)]
    for fields in ((1, 2) if bits == 2 else (1,)) if M <= 32 else ():
        for bm in sorted({16, min(64, max(16, 1 << (M - 1).bit_length()))}):
            for bn, warps in ((64, 4), (128, 4), (128, 8)):
                for split in (1, 2, 4, 8):
                    if math.ceil(N / bn) * math.ceil(M / bm) * split > 16 * sms:
                        continue
                    for mma in (3, 2):
                        for half2 in (0, 1):
                            out.append(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=128, SPLIT_K=split, num_warps=warps,
                                            num_stages=3, FIELDS=fields, MMA=mma, HALF2=half2))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out")
    ap.add_argument("--m", type=int, nargs="+", default=[16, 32, 64])
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
                for cfg in grid(m, n, k, bits, sms):
                    jobs.setdefault((bits, m == 1, tuple(sorted(cfg.items()))), (n, k, bits, 128, m, "gemm", cfg, 0))
    compile_jobs(list(jobs.values()), args.workers)
    rows = []
    for n, k, bits, m, w16, packed, scale, zero, x, ref in problems(SHAPES, args.bits, args.m):
        run_cfg = lambda cfg: lowbit._forward(x, packed, scale, zero, bits, 128, None, None, None, cfg=cfg, kind="gemm")
        timed = time_configs(grid(m, n, k, bits, sms), run_cfg, ref)
        t_cublas = gpu_time_us(lambda: F.linear(x, w16), args.reps)
        shipped = lambda: lowbit.lowbit_linear(x, packed, scale, zero, bits, 128)
        t_shipped = gpu_time_us(shipped, args.reps)
        row = dict(n=n, k=k, bits=bits, m=m, cublas_us=t_cublas, shipped_us=t_shipped, shipped_ratio=t_cublas / t_shipped,
                   shipped_cfg=lowbit_tune.tables().get(torch.cuda.get_device_name(), {}).get(
                       lowbit_tune.config_key("gemm", m, n, k, bits, 128)),
                   shipped_rel_err=rel_err(shipped(), ref), n_configs=len(timed),
                   max_rel_err=max((e for _, e, _ in timed), default=None))
        for half2 in (0, 1):
            best = [(t, e, c) for t, e, c in timed if c["HALF2"] == half2][:2]
            row[f"half2_{half2}"] = []
            for _, err, cfg in best:
                t = gpu_time_us(lambda: run_cfg(cfg), args.reps)
                row[f"half2_{half2}"].append(dict(cfg=cfg, us=t, ratio=t_cublas / t, rel_err=err))
        # same tile, HALF2 on vs off: the dequantisation's share
        pairs = {tuple(sorted((k2, v) for k2, v in c.items() if k2 != "HALF2")): {} for _, _, c in timed}
        for t, _, c in timed:
            pairs[tuple(sorted((k2, v) for k2, v in c.items() if k2 != "HALF2"))][c["HALF2"]] = t
        speedups = sorted(p[0] / p[1] for p in pairs.values() if 0 in p and 1 in p)
        row["same_tile_speedup_median"] = speedups[len(speedups) // 2] if speedups else None
        rows.append(row)
        print(f"{n}x{k} W{bits} M={m}: cuBLAS {t_cublas:.1f} | shipped {t_shipped:.1f} {t_cublas / t_shipped:.2f}x | "
              + " | ".join(f"HALF2={h}: " + ", ".join(f"{b['us']:.1f} {b['ratio']:.2f}x" for b in row[f"half2_{h}"])
                           for h in (0, 1))
              + f" | same-tile median {row['same_tile_speedup_median']}", flush=True)
    if args.out:
        meta = dict(command="python -m experiments.lowbit_half2 " + " ".join(f"--{k} {v}" for k, v in vars(args).items()
                                                                             if k not in ("out",)),
                    gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                    commit=subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip())
        with open(args.out, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
