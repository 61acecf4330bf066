"""Issue 19 probe: the GEMM with per-field MMAs (FIELDS, kernels/lowbit_tiles.py _fields_tile) at
M = 16..64, against the shipped GEMM config and cuBLAS fp16, on this GPU.

    python -m experiments.lowbit_fields --out fields.json [--m 16 64] [--reps 30]

FIELDS=1 reads x in natural order (LO-wide runs), FIELDS=2 from a copy of x in field order made by
the launcher (its cost is inside the timing). The comparison row is the shipped config of the plain
GEMM, or where the table has none (3-bit) the tuner's pick among the plain candidates. Every config of a grid is compiled in parallel, timed
with triton's do_bench, the best three re-timed in kernels.bench_lowbit's harness (cold L2, CUDA
events, median) next to cuBLAS and the shipped config. The TTGIR of a few configs is searched for
where the weight tile crosses shared memory: words loaded straight into the MMA operand layout
(int dot-operand local_load) or a dequantised fp16 tile stored and reloaded.
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
from kernels.lowbit_format import dequantize_groups, unpack
from experiments.lowbit_small_m import rel_err, time_configs

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336)]


def fields_grid(M, bits):
    out = []
    bk = 128  # 16 units per field (the MMA's K) and one scale per row at group 128
    for bm in (16, 32, 64):
        if bm > max(16, lowbit_tune.pow2(M)):
            continue
        for bn in (16, 32, 64, 128):
            for split in (1, 2, 4, 8):
                for warps in (2, 4, 8):
                    if (warps == 8 and bn < 128) or (warps == 2 and bn > 32):
                        continue
                    for fields in (1, 2):
                        out.append(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split, num_warps=warps,
                                        num_stages=3, FIELDS=fields))
    return out


def compile_jobs(jobs, workers: int) -> None:
    """Compile bench_lowbit._compile_job tuples in `workers` processes (the timing loops then find
    every binary in triton's cache); prints how many failed."""
    t0 = time.time()
    with mp.get_context("spawn").Pool(workers) as pool:
        errors = [e for e in pool.map(bench_lowbit._compile_job, list(jobs), chunksize=1) if e]
    print(f"compiled {len(jobs)} configs in {time.time() - t0:.0f}s, {len(errors)} failed", errors[:3], flush=True)


def compile_gemm_grid(grid, bits_list, ms, workers: int) -> None:
    """Every GEMM config of grid(m, bits), once per binary: M, N, K are runtime arguments (M > 1)."""
    jobs = {}
    for bits in bits_list:
        for m in ms:
            for cfg in grid(m, bits):
                jobs[(bits, tuple(sorted(cfg.items())))] = (4096, 4096, bits, 128, m, "gemm", cfg, 0)
    compile_jobs(list(jobs.values()), workers)


def compiled_gemm(cfg, x, packed, scale, zero, bits, kind="gemm"):
    """The CompiledKernel (TTGIR, registers, spills, shared memory) of this GEMM (or, kind="gemv",
    GEMV) config."""
    attr = f"_{kind}_kernel"
    orig = getattr(lowbit, attr)
    seen = []

    class Capture:  # kernel[grid](...) returns the CompiledKernel: keep it
        def __getitem__(self, grid):
            return lambda *a, **kw: seen.append(orig[grid](*a, **kw))

    setattr(lowbit, attr, Capture())
    try:
        lowbit._forward(x, packed, scale, zero, bits, 128, None, None, None, cfg=cfg, kind=kind)
    finally:
        setattr(lowbit, attr, orig)
    return seen[0]


def ir_stats(cfg, x, packed, scale, zero, bits):
    kernel = compiled_gemm(cfg, x, packed, scale, zero, bits)
    ir = kernel.asm.get("ttgir", "")
    dot_loads = [line for line in ir.splitlines() if "local_load" in line and "dot_op" in line]
    return dict(cfg=cfg, local_alloc=ir.count("local_alloc"), async_copies=ir.count("async_copy_global_to_local"),
                int_operand_loads=sum(("xi32" in t or "xi16" in t) for t in dot_loads),
                fp16_A_operand_loads=sum(("xf16" in t and "opIdx = 0" in t) for t in dot_loads),
                wgmma="warp_group_dot" in ir, n_regs=kernel.n_regs, shared_bytes=kernel.metadata.shared)


def problems(shapes, bits_list, ms):
    """(n, k, bits, m, w16, packed, scale, zero, x, ref) for every point, g128, fp16 x; one weight
    per shape and width, freed before the next."""
    for n, k in shapes:
        for bits in bits_list:
            w16, packed, scale, zero = make_weight(n, k, bits, 128)
            w_hat = dequantize_groups(unpack(packed, bits, k), scale, zero, 128)
            for m in ms:
                x = torch.randn(m, k, device="cuda", dtype=torch.float16)
                yield n, k, bits, m, w16, packed, scale, zero, x, x.float() @ w_hat.t()
            del w16, packed, scale, zero, w_hat
            torch.cuda.empty_cache()


def grid_rows(args):
    rows = []
    for n, k, bits, m, w16, packed, scale, zero, x, ref in problems(SHAPES, args.bits, args.m):
        timed = time_configs(fields_grid(m, bits), lambda cfg: lowbit._forward(
            x, packed, scale, zero, bits, 128, None, None, None, cfg=cfg, kind="gemm"), ref)
        shipped = lowbit_tune.tables().get(torch.cuda.get_device_name(), {}).get(
            lowbit_tune.config_key("gemm", m, n, k, bits, 128))
        t_cublas = gpu_time_us(lambda: F.linear(x, w16), args.reps)
        best = []
        if shipped is None:  # no table entry (3-bit on the H200): the tuner's pick among the plain candidates
            lowbit._forward(x, packed, scale, zero, bits, 128, None, None, None, kind="gemm")
            shipped = lowbit_tune.tables()[torch.cuda.get_device_name()][
                lowbit_tune.config_key("gemm", m, n, k, bits, 128)]
        for t_bench, err, cfg in timed[:3] + [(0, None, shipped)]:
            run = lambda: lowbit._forward(x, packed, scale, zero, bits, 128, None, None, None, cfg=cfg, kind="gemm")
            err = rel_err(run(), ref) if err is None else err
            t = gpu_time_us(run, args.reps)
            best.append(dict(cfg=cfg, us=t, ratio=t_cublas / t, do_bench_us=t_bench, rel_err=err))
        row = dict(n=n, k=k, bits=bits, m=m, cublas_us=t_cublas, best=best, n_configs=len(timed),
                   max_rel_err=max(e for _, e, _ in timed), top10=[(round(t, 1), c) for t, _, c in timed[:10]])
        rows.append(row)
        print(f"{n}x{k} W{bits} M={m}: cuBLAS {t_cublas:.1f} us | "
              + " | ".join(f"{b['us']:.1f} us {b['ratio']:.2f}x {bench_lowbit._short(b['cfg'])}" for b in best)
              + f" | max err {row['max_rel_err']:.1e}", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--m", type=int, nargs="+", default=[16, 32, 64])
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 2, 3])
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--workers", type=int, default=14)
    args = ap.parse_args()
    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__, flush=True)
    x = torch.randn(16, 4096, device="cuda", dtype=torch.float16)
    ir = []
    for bits in args.bits:
        _, packed, scale, zero = make_weight(4096, 4096, bits, 128)
        ir += [dict(bits=bits, **ir_stats(dict(BLOCK_M=16, BLOCK_N=bn, BLOCK_K=128, SPLIT_K=4, num_warps=w, num_stages=3,
                                                FIELDS=f), x, packed, scale, zero, bits))
               for bn, w in ((16, 2), (64, 4)) for f in (0, 1, 2)]
    for r in ir:
        print("ir", r, flush=True)
    compile_gemm_grid(fields_grid, args.bits, args.m, args.workers)
    rows = grid_rows(args)
    with open(args.out, "w") as f:
        json.dump(dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                       ir=ir, grid=rows), f, indent=1)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
