"""Issue 19 probe, M = 64 and 128: the un-swapped GEMM (NT, half2 dequantisation, as shipped) with
its K loop warp-specialised (tl.range(..., warp_specialize=True): producer warps load, consumer
warps dequantise and multiply) against the same tiles without, one run, fp16 x, g128.

    python -m experiments.lowbit_nt_ws --out ws.json [--m 64 128] [--bits 4 2]

Why: at M = 64 the NT kernel is latency-bound (Nsight Compute: 11% occupancy, 167 registers,
benchmarks/2026-12-01-h200-lowbit-nt-gemm.json) while its ALU work is ~1.5 us of a ~22 us call;
overlapping the loads with the dequantisation is what warp specialisation is for.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from experiments.lowbit_nt_gemm import nt_outputs, precompile
from kernels import lowbit_tune
from kernels.lowbit_half2 import _dequant_kn_half2
from kernels.lowbit_triton import _finish

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (1024, 4096)]


@triton.jit
def _nt_ws_kernel(X, P, S, Z, Y, WS, CNT, M, N, K, stride_xm, stride_ym, stride_p, BITS: tl.constexpr,
                  GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  SPLIT_K: tl.constexpr, WARP_SPEC: tl.constexpr):
    VPW: tl.constexpr = 32 // BITS
    pid = tl.program_id(0)
    n_m = tl.cdiv(M, BLOCK_M)
    tile = pid // SPLIT_K
    pid_k = pid % SPLIT_K
    m = (tile % n_m) * BLOCK_M + tl.arange(0, BLOCK_M)
    n = (tile // n_m) * BLOCK_N + tl.arange(0, BLOCK_N)
    span = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in tl.range(pid_k * span, tl.minimum(pid_k * span + span, K), BLOCK_K, warp_specialize=WARP_SPEC):
        k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(X + m[:, None] * stride_xm + k[None, :], mask=(m < M)[:, None] & (k < K)[None, :], other=0.0)
        w = _dequant_kn_half2(P, S, Z, n, k0 // VPW, N, K, stride_p, BITS, GROUP, BLOCK_N, BLOCK_K // VPW, True)
        acc = tl.dot(x, w, acc)
    _finish(acc, m, n, tile, pid_k, Y, Y, Y, WS, WS, CNT, M, N, 0, 0, stride_ym, 0, n_m * tl.cdiv(N, BLOCK_N),
            False, False, SPLIT_K, 16, False, False)


def nt_ws_linear(x, packed, scale, zero, bits, group, cfg):
    M, N, K, y, ws, grid, counters = nt_outputs(x, packed, cfg)
    _nt_ws_kernel[(grid,)](
        x, packed, scale, zero, y, ws, counters, M, N, K, x.stride(0), y.stride(0),
        packed.stride(0), BITS=bits, GROUP=group, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
        SPLIT_K=cfg["SPLIT_K"], WARP_SPEC=cfg["WARP_SPEC"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return y


def grid(M, N, K, bits, sms):
    return [dict({k: v for k, v in c.items() if k != "NT"}, WARP_SPEC=ws)
            for c in lowbit_tune._nt_candidates(M, N, K, bits, sms, 128) if c["BLOCK_K"] == 128 for ws in (False, True)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out")
    ap.add_argument("--m", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 2])
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--workers", type=int, default=14)
    args = ap.parse_args()
    from experiments.lowbit_fields import problems
    from experiments.lowbit_small_m import time_configs
    from kernels.bench_lowbit import gpu_time_us
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    jobs = {(b, m, tuple(sorted(c.items()))): (b, m, c, nt_ws_linear) for n, k in SHAPES for b in args.bits for m in args.m
            for c in grid(m, n, k, b, sms)}
    precompile(list(jobs.values()), args.workers)
    rows = []
    for n, k, bits, m, w16, packed, scale, zero, x, ref in problems(SHAPES, args.bits, args.m):
        timed = time_configs(grid(m, n, k, bits, sms), lambda cfg: nt_ws_linear(x, packed, scale, zero, bits, 128, cfg), ref)
        t_cublas = gpu_time_us(lambda: F.linear(x, w16), args.reps)
        row = dict(n=n, k=k, bits=bits, m=m, cublas_us=t_cublas, n_configs=len(timed))
        for ws in (False, True):
            best = [(e, c) for _, e, c in timed if c["WARP_SPEC"] == ws][:1]
            for err, cfg in best:
                t = gpu_time_us(lambda: nt_ws_linear(x, packed, scale, zero, bits, 128, cfg), args.reps)
                row[f"ws_{int(ws)}"] = dict(cfg=cfg, us=t, ratio=t_cublas / t, rel_err=err)
        rows.append(row)
        print(f"{n}x{k} W{bits} M={m}: cuBLAS {t_cublas:.1f} | " + " | ".join(
            f"WS={ws}: {row[f'ws_{ws}']['us']:.1f} {row[f'ws_{ws}']['ratio']:.2f}x" for ws in (0, 1) if f"ws_{ws}" in row),
            flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                           errors=errors, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
