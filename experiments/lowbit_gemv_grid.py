"""Issue 19 probe for M = 1: how far is the GEMV from the floor of kernels.bench_lowbit's harness,
and do programs without the hand prefetch (PREFETCH=False: fewer registers, more warps per SM) or
launch shapes outside the tuner's top 12 close the gap?

    python -m experiments.lowbit_gemv_grid --out gemv_grid.json [--reps 30]

Floor: a Triton kernel that only streams the packed weight's bytes (words + fp16 scales + zeros;
the best of a few launch shapes). GEMV: every config of a wide grid (BLOCK_N 2-16, 1-8 warps,
split-K 1-8, PREFETCH on/off) timed with triton's do_bench; the best three, the shipped config and
the best PREFETCH=False config re-timed in the harness (cold L2, CUDA events, median) beside cuBLAS
fp16 and the floor, with their registers per thread.
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

from kernels import bench_lowbit, lowbit, lowbit_tune
from kernels.bench_lowbit import gpu_time_us, make_problem
from experiments.lowbit_fields import compiled_gemm

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336)]


@triton.jit
def _stream(P, OUT, n_words, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    """xor of BLOCK * ITERS consecutive int32 words per program: reads the bytes, nothing else."""
    pid = tl.program_id(0)
    acc = tl.zeros((BLOCK,), tl.int32)
    for i in range(ITERS):
        offs = (pid * ITERS + i) * BLOCK + tl.arange(0, BLOCK)
        acc ^= tl.load(P + offs, mask=offs < n_words, other=0)
    tl.store(OUT + pid, tl.xor_sum(acc, 0))


def stream_us(nbytes: int, reps: int) -> tuple[float, dict]:
    buf = torch.randint(-2**31, 2**31 - 1, (nbytes // 4,), dtype=torch.int32, device="cuda")
    best = (float("inf"), {})
    for block, iters, warps in ((512, 1, 4), (512, 1, 8), (512, 2, 4), (512, 8, 4), (1024, 1, 4), (1024, 2, 8)):
        progs = triton.cdiv(buf.numel(), block * iters)
        out = torch.empty(progs, dtype=torch.int32, device="cuda")
        run = lambda: _stream[(progs,)](buf, out, buf.numel(), BLOCK=block, ITERS=iters, num_warps=warps)
        run()
        best = min(best, (gpu_time_us(run, reps), dict(BLOCK=block, ITERS=iters, num_warps=warps)), key=lambda b: b[0])
    return best


def gemv_grid(K, bits):
    lo = 2 if bits == 3 else bits
    kw = K * lo // 32
    out = []
    for warps in (1, 2, 4, 8):
        bkw = 32 * lo * warps
        for bn in (2, 4, 8, 16):
            for split in (1, 2, 4, 8):
                if kw / split < bkw:  # every program at least one whole tile
                    continue
                for prefetch in (True, False):
                    out.append(dict(BLOCK_N=bn, BLOCK_KW=bkw, SPLIT_K=split, num_warps=warps, num_stages=1,
                                    PREFETCH=prefetch))
    return out


def registers(cfg, x, packed, scale, zero, bits) -> int:
    return compiled_gemm(cfg, x, packed, scale, zero, bits, kind="gemv").n_regs


def rows(args):
    out = []
    for n, k in SHAPES:
        for bits in (4, 2):
            w16, packed, scale, zero, x, ref = make_problem(n, k, bits, 128, 1)
            timed = []
            for cfg in gemv_grid(k, bits):
                run = lambda: lowbit._forward(x, packed, scale, zero, bits, 128, None, None, None, cfg=cfg, kind="gemv")
                try:
                    y = run()
                    err = ((y.float() - ref).abs().max() / ref.abs().max()).item()
                    timed.append((triton.testing.do_bench(run, warmup=5, rep=20, return_mode="median") * 1000, err, cfg))
                except Exception:  # noqa: BLE001 -- does not fit
                    continue
            timed.sort(key=lambda t: t[0])
            shipped = lowbit_tune.tables()["NVIDIA H200"].get(lowbit_tune.config_key("gemv", 1, n, k, bits, 128))
            no_pf = next(t for t in timed if not t[2]["PREFETCH"])
            picks = timed[:3] + [no_pf] + [(0.0, None, dict(shipped, PREFETCH=True))]
            nbytes = packed.numel() * 4 + scale.numel() * 2 + zero.numel() * 2
            t_cublas = gpu_time_us(lambda: F.linear(x, w16), args.reps)
            t_floor, floor_cfg = stream_us(nbytes, args.reps)
            best = []
            for t_bench, err, cfg in picks:
                t = gpu_time_us(lambda: lowbit._forward(x, packed, scale, zero, bits, 128, None, None, None, cfg=cfg,
                                                        kind="gemv"), args.reps)
                best.append(dict(cfg=cfg, us=t, ratio=t_cublas / t, over_floor=t / t_floor, do_bench_us=t_bench,
                                 rel_err=err, n_regs=registers(cfg, x, packed, scale, zero, bits)))
            row = dict(n=n, k=k, bits=bits, bytes=nbytes, cublas_us=t_cublas, floor_us=t_floor, floor_cfg=floor_cfg,
                       floor_ratio=t_cublas / t_floor, best=best, n_configs=len(timed),
                       top10=[(round(t, 2), c) for t, _, c in timed[:10]])
            out.append(row)
            print(f"{n}x{k} W{bits}: cuBLAS {t_cublas:.1f} us, floor {t_floor:.1f} us ({row['floor_ratio']:.2f}x) | "
                  + " | ".join(f"{b['us']:.1f} us {b['ratio']:.2f}x r{b['n_regs']} {bench_lowbit._short(b['cfg'])}"
                               for b in best), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--workers", type=int, default=14)
    args = ap.parse_args()
    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__, flush=True)
    jobs = {}
    for n, k in SHAPES:
        for bits in (4, 2):
            for cfg in gemv_grid(k, bits):
                jobs[(bits, tuple(sorted(cfg.items())))] = (n, k, bits, 128, 1, "gemv", cfg, 0)
    t0 = time.time()
    with mp.get_context("spawn").Pool(args.workers) as pool:
        errors = [e for e in pool.map(bench_lowbit._compile_job, list(jobs.values()), chunksize=1) if e]
    print(f"compiled {len(jobs)} configs in {time.time() - t0:.0f}s, {len(errors)} failed", flush=True)
    out = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__, rows=rows(args))
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
