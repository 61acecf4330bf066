"""Issue 19 probe: why is the fused low-bit GEMM slow at M = 16..64, and what do wider launch
configs, the GEMV kernel at M = 8..16 and PyTorch's int4 kernel (tinygemm) give on this GPU?

    python -m experiments.lowbit_small_m --out small_m.json [--m 16 64] [--reps 30]

For every shape (Llama-8B), format (4:128, 2:128) and M: a wide grid of GEMM configs (BLOCK_N down
to 16, split-K up to 16: more programs per SM) timed with triton's do_bench, the best three re-timed
in kernels.bench_lowbit's harness (cold L2, CUDA events, median) next to cuBLAS fp16 and the shipped
config. Then PyTorch's int4 kernel beside ours in bf16 (kernels/bench_peer.py).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import time

import torch
import torch.nn.functional as F
import triton

from kernels import bench_lowbit, lowbit, lowbit_tune
from kernels.bench_lowbit import gpu_time_us, make_weight
from kernels.bench_peer import peer_rows
from kernels.lowbit_format import dequantize_groups, unpack

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336)]


def wide_grid(M, N, K, bits, sms):
    vpw = 16 if bits in (2, 3) else 8
    out = []
    for bm in (16, 32, 64):
        if bm > max(16, lowbit_tune.pow2(M)):
            continue
        for bn in (16, 32, 64, 128):
            for bk in (64, 128, 256):
                if bk // vpw < 4:
                    continue
                for split in (1, 2, 4, 8, 16):
                    if K / split < bk:
                        continue
                    for warps in (2, 4, 8):
                        if (warps == 8 and bn * bm < 64 * 32) or (warps == 2 and bn * bm > 64 * 32):
                            continue
                        out.append(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split, num_warps=warps, num_stages=3))
    return out


def rel_err(y, ref):
    return ((y.float() - ref).abs().max() / ref.abs().max()).item()


def time_configs(configs, run_cfg, ref):
    """(do_bench us, rel err, cfg) for every config that runs, fastest first; run_cfg(cfg) launches one."""
    timed = []
    for cfg in configs:
        run = lambda: run_cfg(cfg)
        try:
            err = rel_err(run(), ref)
            timed.append((triton.testing.do_bench(run, warmup=5, rep=20, return_mode="median") * 1000, err, cfg))
        except Exception:  # noqa: BLE001 -- out of shared memory / registers
            continue
    return sorted(timed, key=lambda t: t[0])


def grid_rows(args, sms):
    rows = []
    for n, k in SHAPES:
        for bits in (4, 2):
            w16, packed, scale, zero = make_weight(n, k, bits, 128)
            w_hat = dequantize_groups(unpack(packed, bits, k), scale, zero, 128)
            for m in args.m:
                x = torch.randn(m, k, device="cuda", dtype=torch.float16)
                ref = x.float() @ w_hat.t()
                timed = time_configs(wide_grid(m, n, k, bits, sms), lambda cfg: lowbit._forward(
                    x, packed, scale, zero, bits, 128, None, None, None, cfg=cfg, kind="gemm"), ref)
                shipped = lowbit_tune.tables().get(torch.cuda.get_device_name(), {}).get(
                    lowbit_tune.config_key("gemm", m, n, k, bits, 128))
                t_cublas = gpu_time_us(lambda: F.linear(x, w16), args.reps)
                best = []
                for t_bench, err, cfg in timed[:3] + ([(0, 0, shipped)] if shipped else []):
                    t = gpu_time_us(lambda: lowbit._forward(x, packed, scale, zero, bits, 128, None, None, None,
                                                            cfg=cfg, kind="gemm"), args.reps)
                    best.append(dict(cfg=cfg, us=t, ratio=t_cublas / t, do_bench_us=t_bench, rel_err=err))
                gemv = None
                if m <= 16:
                    run = lambda: lowbit._forward(x, packed, scale, zero, bits, 128, None, None, None, kind="gemv")
                    err = rel_err(run(), ref)  # tunes on first use
                    t = gpu_time_us(run, args.reps)
                    gemv = dict(us=t, ratio=t_cublas / t, rel_err=err)
                row = dict(n=n, k=k, bits=bits, m=m, cublas_us=t_cublas, best=best, gemv=gemv, n_configs=len(timed),
                           top10=[(round(t, 1), c) for t, _, c in timed[:10]])
                rows.append(row)
                print(f"{n}x{k} W{bits} M={m}: cuBLAS {t_cublas:.1f} us | "
                      + " | ".join(f"{b['us']:.1f} us {b['ratio']:.2f}x {bench_lowbit._short(b['cfg'])}" for b in best)
                      + (f" | gemv {gemv['us']:.1f} us {gemv['ratio']:.2f}x" if gemv else ""), flush=True)
            del w16, packed, scale, zero, w_hat
            torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--m", type=int, nargs="+", default=[8, 16, 64])
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--workers", type=int, default=14)
    ap.add_argument("--skip-grid", action="store_true")
    args = ap.parse_args()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__, flush=True)
    rows = []
    if not args.skip_grid:
        jobs = {}  # one per compiled binary: M, N, K are runtime arguments (M > 1 here)
        for bits in (4, 2):
            for m in args.m:
                for cfg in wide_grid(m, 4096, 4096, bits, sms):
                    jobs[(bits, tuple(sorted(cfg.items())))] = (4096, 4096, bits, 128, m, "gemm", cfg, 0)
        t0 = time.time()
        with mp.get_context("spawn").Pool(args.workers) as pool:
            errors = [e for e in pool.map(bench_lowbit._compile_job, list(jobs.values()), chunksize=1) if e]
        print(f"compiled {len(jobs)} configs in {time.time() - t0:.0f}s, {len(errors)} failed", flush=True)
        rows += grid_rows(args, sms)
    peers = peer_rows(args, SHAPES)  # kernels/bench_peer.py (this probe had its own copy when it first ran)
    out = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
               grid=rows, peer=peers)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
