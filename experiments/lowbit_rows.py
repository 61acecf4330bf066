"""Issue 19 probe (small M), a negative result: a CUDA-core kernel for several rows of x
(_rows_kernel below: one packed word per thread, M FMAs per dequantised weight, no tensor core, no
shared memory) against what the dispatch runs today at M = 2..32 (GEMV for M <= 4, the tensor-core
GEMM above) and cuBLAS fp16, same run, same harness as kernels.bench_lowbit. On an H200 it lost
everywhere (benchmarks/2026-11-30-h200-lowbit-rows-negative.json): the x loads of a warp touch up
to 32 sectors each (one word per thread, permuted) and every x element is loaded once per W row
block, so L1 bounds it long before the FMA pipes do.

    python -m experiments.lowbit_rows --out rows.json [--m 2 4 8 16 32] [--reps 20] [--lr 0 64]

Every candidate config of the rows kernel (_rows_candidates) is compiled first in worker processes, then timed
(kernels.lowbit_tune.tune: cold L2, CUDA events, median); the best is re-timed beside the others.
--configs-out writes the tuned entries (to merge into kernels/lowbit_configs.json).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import time

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels import lowbit, lowbit_tune
from kernels.bench_lowbit import gpu_time_us, make_problem
from kernels.lowbit_triton import T_K, T_ROWS, _finish, _t_gemv
from kernels.lowbit_tune import pow2

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336)]


@triton.jit
def _rows_kernel(X, P, P16, S, Z, B, D, U, T, Y, WS, CNT, M, N, K, R, TS, stride_xm, stride_ym, stride_p, n_tprog,
                 BITS: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LR: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr,
                 SPLIT_K: tl.constexpr, BLOCK_R: tl.constexpr, UPCAST: tl.constexpr, T_WARPS: tl.constexpr):
    """Small M (2- and 4-bit) on the CUDA cores: a program owns BLOCK_N rows of W, a K-slice and
    all BLOCK_M (>= M) rows of x. Each thread holds ONE packed word per row of W (the word
    order is permuted so triton sees no contiguity and does not give a thread a 4-word vector:
    that would multiply the accumulators by 4), dequantises each field once in fp32 (shift,
    mask into 2**23, subtract 2**23 + z, times s: exact (q - z) * s) and FMAs it with that
    column of all M rows of x: M FMAs per weight, no tensor core, no shared memory. The M x
    BLOCK_N x BLOCK_KW partial products are summed over the threads once, at the end."""
    pid = tl.program_id(0)
    if pid < n_tprog:
        if HAS_LR:
            _t_gemv(pid, X, D, T, CNT, M, K, R, stride_xm, tl.cdiv(N, BLOCK_N), BLOCK_M, T_WARPS)
    else:
        pid = pid - n_tprog
        VPW: tl.constexpr = 32 // BITS
        KW = K // VPW
        tile = pid // SPLIT_K
        pid_k = pid % SPLIT_K
        n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        m = tl.arange(0, BLOCK_M)
        span = tl.cdiv(tl.cdiv(KW, SPLIT_K), BLOCK_KW) * BLOCK_KW
        e = tl.arange(0, BLOCK_KW)
        perm = (e % BITS) * (BLOCK_KW // BITS) + e // BITS  # a permutation of 0..BLOCK_KW-1
        acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_KW), tl.float32)
        for kw0 in range(pid_k * span, tl.minimum(pid_k * span + span, KW), BLOCK_KW):
            kw = kw0 + perm
            wmask = (n < N)[None, :, None] & (kw < KW)[None, None, :]
            w = tl.load(P + n[None, :, None] * stride_p + kw[None, None, :], mask=wmask, other=0)
            grp = n[None, :, None] * (K // GROUP) + (kw // BITS * 32 // GROUP)[None, None, :]
            s = tl.load(S + grp, mask=wmask, other=0.0).to(tl.float32)
            z = tl.load(Z + grp, mask=wmask, other=0.0).to(tl.float32) + 8388608.0
            col = (kw // BITS * 32 + kw % BITS)[None, None, :]  # x column of field 0 of each word
            xmask = (m < M)[:, None, None] & (kw < KW)[None, None, :]
            for i in tl.static_range(VPW):
                xi = tl.load(X + m[:, None, None] * stride_xm + col + i * BITS, mask=xmask, other=0.0)
                q = ((w >> (i * BITS)) & ((1 << BITS) - 1)) | 0x4B000000
                acc = tl.fma((q.to(tl.float32, bitcast=True) - z) * s, xi.to(tl.float32), acc)
        _finish(tl.sum(acc, axis=2), m, n, tile, pid_k, Y, B, U, T, WS, CNT, M, N, R, TS, stride_ym, n_tprog,
                tl.cdiv(N, BLOCK_N), HAS_BIAS, HAS_LR, SPLIT_K, BLOCK_R, False, UPCAST)


def _rows_candidates(M, N, K, bits, sms):
    """kernels.lowbit_triton._rows_kernel: one packed word per thread (BLOCK_KW = 32 * warps) and
    pow2(M) x BLOCK_N fp32 accumulators per thread (at most 128: past that it spills)."""
    bm, kw = pow2(M), K * bits // 32
    out = []
    for warps in (1, 2, 4, 8):
        bkw = 32 * warps
        if bkw > kw:
            continue
        for bn in (1, 2, 4, 8):
            if bm * bn > 128:
                continue
            for split in (1, 2, 4, 8, 16):
                progs, iters = math.ceil(N / bn) * split, kw / split / bkw
                if (split == 1 or iters >= 1) and sms <= progs <= 64 * sms:
                    out.append(dict(BLOCK_N=bn, BLOCK_KW=bkw, SPLIT_K=split, num_warps=warps, num_stages=1))

    def rank(c):  # ~16 warps per SM, at least two tiles per program, little split
        progs = math.ceil(N / c["BLOCK_N"]) * c["SPLIT_K"]
        iters = kw / c["SPLIT_K"] / c["BLOCK_KW"]
        return abs(math.log2(progs * c["num_warps"] / (16 * sms))) + (iters < 2) + 0.25 * math.log2(c["SPLIT_K"])
    out.sort(key=rank)
    return out[:24] or [dict(BLOCK_N=1, BLOCK_KW=32, SPLIT_K=1, num_warps=1, num_stages=1)]




def rows_forward(x, packed, scale, zero, bits, group, down, up, cfg):
    """y = x @ W_hat^T (+ (x @ down^T) @ up^T) with _rows_kernel (kernels.lowbit._forward's launch)."""
    M, K = x.shape
    N, R = packed.shape[0], (down.shape[0] if down is not None else 0)
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    bm, split, tiles = pow2(M), cfg["SPLIT_K"], math.ceil(N / cfg["BLOCK_N"])
    ts = math.ceil(K / (T_K // 4 * cfg["num_warps"] // bm)) if R else 0
    n_tprog = math.ceil(R / T_ROWS) * ts
    t = torch.empty(ts, M, R, device=x.device, dtype=torch.float32) if R else y
    ws = torch.empty(split, M, N, device=x.device, dtype=torch.float32) if split > 1 else y
    cnt = lowbit._counters(x.device, lowbit.N_SLOTS + tiles)
    _rows_kernel[(n_tprog + tiles * split,)](
        x, packed, packed.view(torch.int16), scale, zero, y, down if R else y, up if R else y, t, y, ws, cnt,
        M, N, K, R, ts, x.stride(0), y.stride(0), packed.stride(0), n_tprog, BITS=bits, GROUP=group,
        HAS_BIAS=False, HAS_LR=R > 0, BLOCK_M=bm, BLOCK_N=cfg["BLOCK_N"], BLOCK_KW=cfg["BLOCK_KW"], SPLIT_K=split,
        BLOCK_R=max(16, pow2(R)), UPCAST=False, T_WARPS=cfg["num_warps"], num_warps=cfg["num_warps"], num_stages=1)
    return y


def _compile(job) -> str:
    n, k, bits, m, cfg, rank = job
    try:
        x = torch.zeros(m, k, device="cuda", dtype=torch.float16)
        packed = torch.zeros(n, k * bits // 32, dtype=torch.int32, device="cuda")
        scale = torch.ones(n, k // 128, dtype=torch.float16, device="cuda")
        lr = [torch.zeros(rank, k, dtype=torch.float16, device="cuda"),
              torch.zeros(n, rank, dtype=torch.float16, device="cuda")] if rank else [None, None]
        rows_forward(x, packed, scale, scale * 0, bits, 128, *lr, cfg)
        torch.cuda.synchronize()
        return ""
    except Exception as exc:  # noqa: BLE001 -- reported
        return f"{job}: {type(exc).__name__}: {str(exc)[:200]}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--configs-out")
    ap.add_argument("--m", type=int, nargs="+", default=[2, 4, 8, 16, 32])
    ap.add_argument("--lr", type=int, nargs="+", default=[0])
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    jobs = {}
    for n, k in SHAPES:
        for bits in (4, 2):
            for m in args.m:
                for rank in args.lr:
                    for cfg in _rows_candidates(m, n, k, bits, sms):
                        jobs.setdefault((bits, lowbit_tune.pow2(m), rank > 0, tuple(sorted(cfg.items()))),
                                        (n, k, bits, m, cfg, rank))
    t0 = time.time()
    with mp.get_context("spawn").Pool(min(16, os.cpu_count() or 1)) as pool:
        errors = [e for e in pool.map(_compile, list(jobs.values()), chunksize=1) if e]
    print(f"compiled {len(jobs)} kernels in {time.time() - t0:.0f}s; {len(errors)} failed {errors[:1]}", flush=True)
    rows, table = [], {}
    for n, k in SHAPES:
        for bits in (4, 2):
            for m in args.m:
                for rank in args.lr:
                    w16, packed, scale, zero, x, ref = make_problem(n, k, bits, 128, m)
                    lr = [torch.randn(rank, k, device="cuda", dtype=torch.float16) * 0.02,
                          torch.randn(n, rank, device="cuda", dtype=torch.float16) * 0.02] if rank else [None, None]
                    if rank:
                        ref = ref + x.float() @ lr[0].float().t() @ lr[1].float().t()

                    def run(cfg=None, kind=None):
                        if kind == "rows":
                            return rows_forward(x, packed, scale, zero, bits, 128, *lr, cfg)
                        return lowbit._forward(x, packed, scale, zero, bits, 128, *lr, None, kind=kind)

                    cands = _rows_candidates(m, n, k, bits, sms)
                    best = lowbit_tune.tune(cands, lambda c: run(c, "rows"), reps=args.reps)
                    top = lowbit_tune.TUNE_LOG[-1][:3]
                    today = lowbit.kernel_kind(m, bits)
                    paths = {"cublas": lambda: F.linear(x, w16) if not rank else
                             F.linear(x, w16) + F.linear(F.linear(x, lr[0]), lr[1]),
                             "today": lambda: run(kind=today), "rows": lambda: run(best, "rows")}
                    row = dict(n=n, k=k, bits=bits, m=m, rank=rank, today_kind=today, best=best,
                               top3=[dict(us=t, **c) for t, c in top])
                    for name, fn in paths.items():
                        y = fn()
                        row[f"{name}_err"] = ((y.float() - ref).abs().max() / ref.abs().max()).item()
                        row[f"{name}_us"] = gpu_time_us(fn, args.reps)
                    row["today_ratio"] = row["cublas_us"] / row["today_us"]
                    row["rows_ratio"] = row["cublas_us"] / row["rows_us"]
                    rows.append(row)
                    table[f"rows|b{bits}g128n{n}k{k}m{pow2(m)}" + ("|lr" if rank else "")] = best
                    print(f"{n}x{k} W{bits} M={m} r={rank}: cuBLAS {row['cublas_us']:.1f} us | today ({today}) "
                          f"{row['today_us']:.1f} us {row['today_ratio']:.2f}x | rows {row['rows_us']:.1f} us "
                          f"{row['rows_ratio']:.2f}x err {row['rows_err']:.1e} {best}", flush=True)
    meta = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                python=platform.python_version())
    with open(args.out, "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    if args.configs_out:
        with open(args.configs_out, "w") as f:
            json.dump({meta["gpu"]: table}, f, indent=1, sort_keys=True)


if __name__ == "__main__":
    main()
