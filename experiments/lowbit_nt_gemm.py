"""Issue 19 probe, M = 64..1024: a fused low-bit GEMM *not* swapped (x is the MMA's A operand, from
shared memory; the dequantised weight tile is B, stored to shared memory by triton), against the
shipped dispatch (swap-AB GEMM at M=64, dequantise + cuBLAS from 128) and cuBLAS fp16, same run.

    python -m experiments.lowbit_nt_gemm --out nt.json [--m 64 256 1024] [--bits 4 2] [--variants 1 2]
    TRITON_INTERPRET=1 python -m experiments.lowbit_nt_gemm --check     # correctness on CPU

Why: every earlier fused GEMM (kernels/lowbit_triton.py) hands tl.dot the dequantised tile as the
*register* A operand of a swapped product, and triton 3.6 then waits for each wgmma before the next
(benchmarks/2026-11-30-h200-lowbit-big-tiles-negative.json), so at large M the MMAs never overlap
the dequantisation. With both operands in shared memory wgmma can run asynchronously, the layout
triton's own fp8/int8-upcast matmuls use. Variants (VARIANT): 0 = kernels/lowbit_tiles._dequant's
[BLOCK_N, BLOCK_K] tile, transposed for tl.dot; 1 = the tile dequantised directly as [BLOCK_K,
BLOCK_N] (words loaded k-major); 2 = one MMA per field position (x in field order, as FIELDS=2).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import time

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels import lowbit
from kernels.lowbit_tiles import _dequant, _dequant_kn, _mma
from kernels.lowbit_triton import _finish

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336)]


@triton.jit
def _fields_nt(XF, P, P16, S, Z, m, n, k0, M, N, K, acc, BITS: tl.constexpr, GROUP: tl.constexpr,
               BLOCK_K: tl.constexpr, UPCAST: tl.constexpr):
    """acc[m, n] += x[m, k-tile] @ W_hat[n, k-tile]^T, one MMA per field position of the packed units
    (kernels/lowbit_tiles._fields_tile's packing); scale and zero per unit (tiles may span groups)."""
    BLOCK_C: tl.constexpr = BLOCK_K // 8
    C = K // 8
    c = k0 // 8 + tl.arange(0, BLOCK_C)
    cmask = (c < C)[:, None] & (n < N)[None, :]
    if BITS == 4:
        w = tl.load(P + n[None, :] * (K // 8) + c[:, None], mask=cmask, other=0)
    else:
        w = tl.load(P16 + n[None, :] * (K // 8) + c[:, None], mask=cmask, other=0).to(tl.int32)
    grp = n[None, :] * (K // GROUP) + (c // 4 * 32 // GROUP)[:, None]
    s = tl.load(S + grp, mask=cmask, other=0.0).to(tl.float32)
    z = tl.load(Z + grp, mask=cmask, other=0.0).to(tl.float32) + 8388608.0
    xmask = (m < M)[:, None] & (c < C)[None, :]
    for f in tl.static_range(8):
        q = (w >> (f * BITS)) & ((1 << BITS) - 1)
        v = ((q | 0x4B000000).to(tl.float32, bitcast=True) - z) * s  # [c, n]
        xf = tl.load(XF + m[:, None] * K + f * C + c[None, :], mask=xmask, other=0.0)
        acc = _mma(xf, v.to(XF.dtype.element_ty), acc, UPCAST)
    return acc


@triton.jit
def _nt_kernel(X, XF, P, P16, S, Z, Y, WS, CNT, M, N, K, stride_xm, stride_ym, stride_p,
               BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, VARIANT: tl.constexpr, UPCAST: tl.constexpr):
    VPW: tl.constexpr = 32 // BITS
    pid = tl.program_id(0)
    n_m = tl.cdiv(M, BLOCK_M)
    tile = pid // SPLIT_K  # m fastest: the programs sharing a weight slice run together (L2 reuse)
    pid_k = pid % SPLIT_K
    m = (tile % n_m) * BLOCK_M + tl.arange(0, BLOCK_M)
    n = (tile // n_m) * BLOCK_N + tl.arange(0, BLOCK_N)
    span = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(pid_k * span, tl.minimum(pid_k * span + span, K), BLOCK_K):
        if VARIANT == 2:
            acc = _fields_nt(XF, P, P16, S, Z, m, n, k0, M, N, K, acc, BITS, GROUP, BLOCK_K, UPCAST)
        else:
            k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(X + m[:, None] * stride_xm + k[None, :], mask=(m < M)[:, None] & (k < K)[None, :], other=0.0)
            if VARIANT == 1:
                w = _dequant_kn(P, P16, S, Z, n, k0 // VPW, N, K, stride_p, BITS, GROUP, BLOCK_N, BLOCK_K // VPW,
                                X.dtype.element_ty)
            else:
                w = tl.trans(_dequant(P, P16, S, Z, n, k0 // VPW, N, K, stride_p, BITS, GROUP, BLOCK_N,
                                      BLOCK_K // VPW, X.dtype.element_ty))
            acc = _mma(x, w, acc, UPCAST)
    _finish(acc, m, n, tile, pid_k, Y, Y, Y, WS, WS, CNT, M, N, 0, 0, stride_ym, 0, n_m * tl.cdiv(N, BLOCK_N),
            False, False, SPLIT_K, 16, False, UPCAST)


def nt_outputs(x, packed, cfg):
    """(M, N, K, y, split-K workspace, grid size, counters) of one NT launch with config `cfg`."""
    M, K = x.shape
    N = packed.shape[0]
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    split = cfg["SPLIT_K"]
    tiles = triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"])
    ws = torch.empty(split, M, N, device=x.device, dtype=torch.float32) if split > 1 else y
    return M, N, K, y, ws, tiles * split, lowbit._counters(x.device, lowbit.N_SLOTS + tiles)


def nt_linear(x, packed, scale, zero, bits, group, cfg):
    """y = x @ W_hat^T through _nt_kernel with launch config `cfg`."""
    M, N, K, y, ws, grid, counters = nt_outputs(x, packed, cfg)
    xf = lowbit._field_order(x, bits).contiguous() if cfg["VARIANT"] == 2 else x
    _nt_kernel[(grid,)](
        x, xf, packed, packed.view(torch.int16), scale, zero, y, ws, counters,
        M, N, K, x.stride(0), y.stride(0), packed.stride(0), BITS=bits, GROUP=group, BLOCK_M=cfg["BLOCK_M"],
        BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], SPLIT_K=cfg["SPLIT_K"], VARIANT=cfg["VARIANT"],
        UPCAST=lowbit._upcast(x.dtype, x.device), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return y


def grid(M, variants=(1, 2), wide=False):
    """wide (M <= 64 only): also BLOCK_N 32, BLOCK_K 64/256, 2-5 stages, split-K 8."""
    wide = wide and M <= 64
    out = []
    for variant in variants:
        for bm in (64, 128):
            if bm > max(64, M):
                continue
            for bn in ((32, 64, 128) if wide else (64, 128, 256)):
                for bk in ((64, 128, 256) if wide else (128, 256) if variant == 2 else (128,)):
                    for warps in (4, 8):
                        for stages in ((2, 3, 4, 5) if wide else (3, 4) if bm * bn <= 64 * 128 else (3,)):
                            for split in ((1, 2, 4, 8) if wide else (1, 2, 4) if M <= 256 else (1,)):
                                if bm * bn >= 128 * 256 and (warps < 8 or bk > 128):
                                    continue
                                out.append(dict(VARIANT=variant, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split,
                                                num_warps=warps, num_stages=stages))
    return out


def _compile_job(job):
    """job (bits, m, cfg[, linear]): one launch of `linear` (nt_linear unless given; a module-level
    function, so the worker process can import it) on a small problem, compiling that config."""
    bits, m, cfg, *linear = job
    try:
        from kernels.bench_lowbit import make_weight
        _, packed, scale, zero = make_weight(256, 512, bits, 128)
        (linear or [nt_linear])[0](torch.zeros(m, 512, device="cuda", dtype=torch.float16), packed, scale, zero, bits,
                                   128, cfg)
        torch.cuda.synchronize()
        return ""
    except Exception as exc:  # noqa: BLE001 -- reported; the timing loop skips it too
        return f"{cfg}: {type(exc).__name__}: {str(exc)[:160]}"


def precompile(jobs: list, workers: int) -> None:
    """Compile every job's config in `workers` spawned processes (filling triton's on-disk cache), so
    that the timing loop that follows runs back to back; prints how many failed."""
    t0 = time.time()
    with mp.get_context("spawn").Pool(workers) as pool:
        errors = [e for e in pool.map(_compile_job, jobs, chunksize=1) if e]
    print(f"compiled {len(jobs)} in {time.time() - t0:.0f}s, {len(errors)} failed", errors[:3], flush=True)


def check() -> None:
    """Every variant against the reference on a small odd-M problem (run under TRITON_INTERPRET=1)."""
    from kernels.lowbit_format import dequantize_groups, pack, quantize_groups, unpack
    torch.manual_seed(0)
    for bits in (4, 2):
        w = torch.randn(96, 512)
        q, scale, zero = quantize_groups(w, bits, 128)
        packed = pack(q, bits)
        w_hat = dequantize_groups(unpack(packed, bits, 512), scale, zero, 128)
        x = torch.randn(37, 512).half()
        ref = x.float() @ w_hat.t()
        for variant in (0, 1, 2):
            for split in (1, 2):
                cfg = dict(VARIANT=variant, BLOCK_M=32, BLOCK_N=32, BLOCK_K=256 if variant == 2 else 128,
                           SPLIT_K=split, num_warps=4, num_stages=2)
                y = nt_linear(x, packed, scale.half(), zero.half(), bits, 128, cfg).float()
                err = ((y - ref).norm() / ref.norm()).item()
                print(f"W{bits} variant {variant} split {split}: rel err {err:.2e}", "OK" if err < 2e-3 else "FAIL")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out")
    ap.add_argument("--m", type=int, nargs="+", default=[64, 256, 1024])
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 2])
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--workers", type=int, default=14)
    ap.add_argument("--variants", type=int, nargs="+", default=[1, 2], help="0 fails to compile on triton 3.6")
    ap.add_argument("--wide", action="store_true", help="a wider grid at M <= 64")
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    if args.check:
        return check()
    from experiments.lowbit_fields import problems
    from experiments.lowbit_small_m import rel_err, time_configs
    from kernels.bench_lowbit import gpu_time_us
    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__, flush=True)
    jobs = {(b, m, tuple(sorted(c.items()))): (b, m, c) for b in args.bits for m in args.m for c in grid(m, args.variants, args.wide)}
    precompile(list(jobs.values()), args.workers)
    rows = []
    for n, k, bits, m, w16, packed, scale, zero, x, ref in problems(SHAPES, args.bits, args.m):
        timed = time_configs(grid(m, args.variants, args.wide), lambda cfg: nt_linear(x, packed, scale, zero, bits, 128, cfg), ref)
        t_cublas = gpu_time_us(lambda: F.linear(x, w16), args.reps)
        shipped = lambda: lowbit.lowbit_linear(x, packed, scale, zero, bits, 128)
        t_shipped = gpu_time_us(shipped, args.reps)
        best = []
        for t_bench, err, cfg in timed[:3]:
            t = gpu_time_us(lambda: nt_linear(x, packed, scale, zero, bits, 128, cfg), args.reps)
            best.append(dict(cfg=cfg, us=t, ratio=t_cublas / t, do_bench_us=t_bench, rel_err=err))
        per_variant = {v: min((t for t, _, c in timed if c["VARIANT"] == v), default=None) for v in (0, 1, 2)}
        row = dict(n=n, k=k, bits=bits, m=m, cublas_us=t_cublas, shipped_kind=lowbit.kernel_kind(m, bits),
                   shipped_us=t_shipped, shipped_ratio=t_cublas / t_shipped, shipped_rel_err=rel_err(shipped(), ref),
                   best=best, do_bench_best_per_variant=per_variant, n_configs=len(timed),
                   max_rel_err=max((e for _, e, _ in timed), default=None))
        rows.append(row)
        print(f"{n}x{k} W{bits} M={m}: cuBLAS {t_cublas:.1f} | shipped {row['shipped_kind']} {t_shipped:.1f} "
              f"{t_cublas / t_shipped:.2f}x | " + " | ".join(f"{b['us']:.1f} {b['ratio']:.2f}x {b['cfg']}" for b in best)
              + f" | per variant (do_bench) {per_variant}", flush=True)
    with open(args.out, "w") as f:
        json.dump(dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                       compile_errors=errors[:20], rows=rows), f, indent=1)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
