"""Issue 19 probe: the per-field GEMM (FIELDS) with big tiles at M = 64..256, against the shipped
dispatch (plain GEMM at M=64, dequantise + cuBLAS from M=128) and cuBLAS fp16, on this GPU.

    python -m experiments.lowbit_big_tiles --out big.json [--m 64 128 256] [--bits 4 2]
    DISABLE_MMA_V3=1 python -m experiments.lowbit_big_tiles --grid mma --m 16 32 64 --out v2.json
    ncu ... -k regex:_gemm_kernel --launch-skip 3 --launch-count 1 \
        python -m experiments.lowbit_big_tiles --ncu '{"BLOCK_M": 64, ...}' --m 64 --n 14336

The earlier grid (experiments/lowbit_fields.py) stopped at 128 rows of W and 3 stages; at M = 64 each
program then re-reads all of x per 128 rows of W. Here: BLOCK_N up to 256, BLOCK_M up to 128,
2-4 stages. Every config is compiled in parallel, timed with triton's do_bench, the best three
re-timed in kernels.bench_lowbit's harness (cold L2, CUDA events, median) next to cuBLAS and the
shipped dispatch. For the best config: registers, spills, shared memory and the wgmma waits in
its PTX (a wait after every MMA would serialise the eight per-field MMAs of a tile).
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.nn.functional as F
import triton

from kernels import bench_lowbit, lowbit
from kernels.bench_lowbit import gpu_time_us, make_weight
from experiments.lowbit_fields import compile_gemm_grid, compiled_gemm, problems
from experiments.lowbit_small_m import rel_err, time_configs

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336)]


def big_grid(M, kind="big"):
    """kind "big": BLOCK_N up to 256, BLOCK_M up to 128, 2-4 stages. kind "mma": the tiles of M <= 64
    with 2-8 warps (run once as is and once under DISABLE_MMA_V3=1: wgmma vs mma.sync)."""
    out = []
    if kind == "mma":
        for bn in (64, 128, 256):
            for warps in (2, 4, 8):
                for split in (1, 2, 4, 8):
                    for fields in (1, 2):
                        out.append(dict(BLOCK_M=max(16, min(64, M)), BLOCK_N=bn, BLOCK_K=128, SPLIT_K=split,
                                        num_warps=warps, num_stages=3, FIELDS=fields))
        return out
    for bm in (64, 128):
        if bm > max(64, M) or (M >= 256 and bm < 128):
            continue
        for bn in (128, 256):
            for warps in (4, 8):
                for stages in (2, 3, 4):
                    for split in (1, 2, 4):
                        for fields in (1, 2):
                            out.append(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=128, SPLIT_K=split, num_warps=warps,
                                            num_stages=stages, FIELDS=fields))
    return out


def ptx_stats(cfg, x, packed, scale, zero, bits):
    kernel = compiled_gemm(cfg, x, packed, scale, zero, bits)
    ptx = kernel.asm.get("ptx", "")
    return dict(n_regs=kernel.n_regs, n_spills=kernel.n_spills, shared=kernel.metadata.shared,
                wgmma=ptx.count("wgmma.mma_async"), wait0=ptx.count("wgmma.wait_group.sync.aligned 0;"),
                waits=ptx.count("wgmma.wait_group"), mma_sync=ptx.count("mma.sync"))


def rows(args):
    out = []
    for n, k, bits, m, w16, packed, scale, zero, x, ref in problems(SHAPES, args.bits, args.m):
        run_cfg = lambda cfg: lowbit._forward(x, packed, scale, zero, bits, 128, None, None, None, cfg=cfg, kind="gemm")
        timed = time_configs(big_grid(m, args.grid), run_cfg, ref)
        t_cublas = gpu_time_us(lambda: F.linear(x, w16), args.reps)
        shipped = lambda: lowbit.lowbit_linear(x, packed, scale, zero, bits, 128)
        err_shipped = rel_err(shipped(), ref)
        t_shipped = gpu_time_us(shipped, args.reps)
        best = []
        for t_bench, err, cfg in timed[:3]:
            t = gpu_time_us(lambda: run_cfg(cfg), args.reps)
            best.append(dict(cfg=cfg, us=t, ratio=t_cublas / t, do_bench_us=t_bench, rel_err=err))
        stats = ptx_stats(timed[0][2], x, packed, scale, zero, bits) if timed else None
        row = dict(n=n, k=k, bits=bits, m=m, cublas_us=t_cublas, shipped_kind=lowbit.kernel_kind(m, bits),
                   shipped_us=t_shipped, shipped_ratio=t_cublas / t_shipped, shipped_rel_err=err_shipped,
                   best=best, best_ptx=stats, n_configs=len(timed), max_rel_err=max((e for _, e, _ in timed), default=None),
                   top10=[(round(t, 1), c) for t, _, c in timed[:10]])
        out.append(row)
        print(f"{n}x{k} W{bits} M={m}: cuBLAS {t_cublas:.1f} | shipped {row['shipped_kind']} {t_shipped:.1f} "
              f"{t_cublas / t_shipped:.2f}x | "
              + " | ".join(f"{b['us']:.1f} {b['ratio']:.2f}x {bench_lowbit._short(b['cfg'])}/s{b['cfg']['num_stages']}"
                           for b in best) + f" | {stats}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out")
    ap.add_argument("--m", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 2])
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--workers", type=int, default=14)
    ap.add_argument("--grid", choices=("big", "mma"), default="big")
    ap.add_argument("--ncu", help="one config (JSON): launch it 5 times and exit, for Nsight Compute")
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--k", type=int, default=4096)
    args = ap.parse_args()
    if args.ncu:
        _, packed, scale, zero = make_weight(args.n, args.k, args.bits[0], 128)
        x = torch.randn(args.m[0], args.k, device="cuda", dtype=torch.float16)
        for _ in range(5):
            lowbit._forward(x, packed, scale, zero, args.bits[0], 128, None, None, None, cfg=json.loads(args.ncu),
                            kind="gemm")
        torch.cuda.synchronize()
        return
    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__, "DISABLE_MMA_V3 =",
          os.environ.get("DISABLE_MMA_V3"), flush=True)
    compile_gemm_grid(lambda m, bits: big_grid(m, args.grid), args.bits, args.m, args.workers)
    result = rows(args)
    with open(args.out, "w") as f:
        json.dump(dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                       grid=args.grid,
                       disable_mma_v3=os.environ.get("DISABLE_MMA_V3"), rows=result), f, indent=1)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
