"""Issue 19 probe: the M=1 GEMV runs at 25% occupancy (119 registers per thread, ncu in
benchmarks/2026-11-30-h200-lowbit-small-m-dispatch.json). Does capping registers (Triton's `maxnreg`)
buy more bytes in flight, or do spills eat it?

    python -m experiments.lowbit_gemv_regs --out gemv_regs.json

Every GEMV tuning candidate x maxnreg in (none, 128, 96, 80, 64), timed with triton's do_bench; the
best three and the shipped config re-timed in kernels.bench_lowbit's harness beside cuBLAS fp16.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp

import torch
import torch.nn.functional as F
import triton

from kernels import lowbit, lowbit_tune
from kernels.bench_lowbit import _compile_job, _short, gpu_time_us, make_problem

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336)]
REGS = (0, 128, 96, 80, 64)  # 0: no cap


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--reps", type=int, default=30)
    args = ap.parse_args()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    gpu = torch.cuda.get_device_name()
    print(gpu, torch.__version__, triton.__version__, flush=True)
    jobs = {}  # compile every (config, cap) once, in parallel (binaries depend on bits and M == 1 only)
    for n, k in SHAPES:
        for bits in (4, 2):
            for base in lowbit_tune.CANDIDATES["gemv"](1, n, k, bits, sms):
                for regs in REGS:
                    cfg = dict(base, maxnreg=regs)
                    jobs[(bits, tuple(sorted(cfg.items())))] = (n, k, bits, 128, 1, "gemv", cfg, 0)
    with mp.get_context("spawn").Pool(14) as pool:
        errors = [e for e in pool.map(_compile_job, list(jobs.values()), chunksize=1) if e]
    print(f"compiled {len(jobs)} configs, {len(errors)} failed", flush=True)
    rows = []
    for n, k in SHAPES:
        for bits in (4, 2):
            w16, packed, scale, zero, x, ref = make_problem(n, k, bits, 128, 1)
            shipped = lowbit_tune.tables().get(gpu, {}).get(lowbit_tune.config_key("gemv", 1, n, k, bits, 128))
            cands = lowbit_tune.CANDIDATES["gemv"](1, n, k, bits, sms) + ([shipped] if shipped else [])
            timed = []
            for base in cands:
                for regs in REGS:
                    cfg = dict(base, maxnreg=regs)
                    run = lambda: lowbit._forward(x, packed, scale, zero, bits, 128, None, None, None, cfg=cfg, kind="gemv")  # noqa: E731
                    try:
                        err = ((run().float() - ref).abs().max() / ref.abs().max()).item()
                        timed.append((triton.testing.do_bench(run, warmup=5, rep=20, return_mode="median") * 1000, err, cfg))
                    except Exception as exc:  # noqa: BLE001 -- a cap the kernel cannot meet
                        print("  skipped", _short(cfg), type(exc).__name__, flush=True)
            timed.sort(key=lambda t: t[0])
            t_cublas = gpu_time_us(lambda: F.linear(x, w16), args.reps)
            picks = timed[:3] + [t for t in timed if shipped and t[2] == dict(shipped, maxnreg=0)][:1]
            best = []
            for t_bench, err, cfg in picks:
                t = gpu_time_us(lambda: lowbit._forward(x, packed, scale, zero, bits, 128, None, None, None, cfg=cfg,
                                                        kind="gemv"), args.reps)
                best.append(dict(cfg=cfg, us=t, ratio=t_cublas / t, do_bench_us=t_bench, rel_err=err))
            by_regs = {r: min(t for t, _, c in timed if c["maxnreg"] == r) for r in REGS if any(c["maxnreg"] == r for _, _, c in timed)}
            rows.append(dict(n=n, k=k, bits=bits, m=1, cublas_us=t_cublas, best=best, best_do_bench_by_maxnreg=by_regs,
                             max_rel_err=max(e for _, e, _ in timed)))
            print(f"{n}x{k} W{bits}: cuBLAS {t_cublas:.1f} us | "
                  + " | ".join(f"{b['us']:.1f} us {b['ratio']:.2f}x {_short(b['cfg'])}" for b in best)
                  + " | do_bench best by maxnreg " + ", ".join(f"{r}: {t:.1f}" for r, t in by_regs.items()), flush=True)
            del w16, packed, scale, zero
            torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        json.dump(dict(gpu=gpu, torch=torch.__version__, triton=triton.__version__, rows=rows), f, indent=1)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
