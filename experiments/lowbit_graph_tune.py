"""Issue 19 probe: does timing the tuner's candidates back to back in a CUDA graph (as decode runs
them) pick other configs than the isolated cold-L2 harness does, and how much faster are they there?

    python -m experiments.lowbit_graph_tune --out graph_tune.json [--m 16] [--bits 4 2]

For every Llama-8B shape and format: every GEMM (or GEMV) tuning candidate timed as a chain of
`--chain` calls on distinct weights captured in one CUDA graph (experiments/lowbit_graph_chain.py),
fp16; the shipped config and cuBLAS timed the same way; the graph's best and the shipped config also
in the cold-L2 harness (kernels.lowbit_tune.gpu_time_us). The PDL column needs the patch named in
experiments/lowbit_graph_chain.py.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from kernels import bench_lowbit, lowbit, lowbit_tune
from kernels.bench_lowbit import gpu_time_us, make_weight
from experiments.lowbit_fields import compile_jobs
from experiments.lowbit_graph_chain import SHAPES, graph_us, pdl_patched


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--m", type=int, nargs="+", default=[16])
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 2])
    ap.add_argument("--chain", type=int, default=8)
    ap.add_argument("--replays", type=int, default=20)
    ap.add_argument("--workers", type=int, default=14)
    args = ap.parse_args()
    gpu = torch.cuda.get_device_name()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    jobs = {}
    for n, k in SHAPES:
        for bits in args.bits:
            for m in args.m:
                kind = lowbit.kernel_kind(m, bits)
                for cfg in lowbit_tune.CANDIDATES[kind](m, n, k, bits, sms, 128):
                    jobs.setdefault((kind, bits, m == 1, tuple(sorted(cfg.items()))), (n, k, bits, 128, m, kind, cfg, 0))
    compile_jobs(list(jobs.values()), args.workers)
    rows = []
    for n, k in SHAPES:
        for bits in args.bits:
            weights = [make_weight(n, k, bits, 128, seed=i) for i in range(args.chain)]
            for m in args.m:
                x = torch.randn(m, k, device="cuda", dtype=torch.float16)
                kind = lowbit.kernel_kind(m, bits)
                chain = lambda c: [lambda w=w: lowbit._forward(x, w[1], w[2], w[3], bits, 128, None, None, None, cfg=c,
                                                               kind=kind) for w in weights]
                timed = []
                for cfg in lowbit_tune.CANDIDATES[kind](m, n, k, bits, sms, 128):
                    try:
                        timed.append((graph_us(chain(cfg), args.replays), cfg))
                    except Exception:  # noqa: BLE001 -- does not fit: skipped, as the tuner does
                        continue
                timed.sort(key=lambda t: t[0])
                shipped = lowbit_tune.tables()[gpu][lowbit_tune.config_key(kind, m, n, k, bits, 128)]
                dense = [w[0] for w in weights]
                row = dict(n=n, k=k, bits=bits, m=m, kind=kind, shipped=shipped, best=timed[0][1],
                           cublas_graph_us=graph_us([lambda d=d: F.linear(x, d) for d in dense], args.replays),
                           shipped_graph_us=graph_us(chain(shipped), args.replays), best_graph_us=timed[0][0],
                           best_pdl_graph_us=(graph_us(chain(dict(timed[0][1], PDL=True)), args.replays)
                                              if pdl_patched() else None),
                           cublas_cold_us=gpu_time_us(lambda: F.linear(x, dense[0]), 30),
                           shipped_cold_us=gpu_time_us(chain(shipped)[0], 30),
                           best_cold_us=gpu_time_us(chain(timed[0][1])[0], 30),
                           top10=[(round(t, 2), c) for t, c in timed[:10]], n_configs=len(timed))
                rows.append(row)
                c = row["cublas_graph_us"]
                print(f"{n}x{k} W{bits} M={m}: graph cuBLAS {c:.1f} | shipped {row['shipped_graph_us']:.1f} "
                      f"({c / row['shipped_graph_us']:.2f}x) | best {row['best_graph_us']:.1f} ({c / row['best_graph_us']:.2f}x) "
                      + (f"+PDL {row['best_pdl_graph_us']:.1f} ({c / row['best_pdl_graph_us']:.2f}x) " if pdl_patched() else "")
                      + f"{bench_lowbit._short(row['best'])} | cold: cuBLAS {row['cublas_cold_us']:.1f} shipped "
                      f"{row['shipped_cold_us']:.1f} best-in-graph {row['best_cold_us']:.1f}", flush=True)
            del weights
            torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        json.dump(dict(gpu=gpu, torch=torch.__version__, triton=lowbit.triton.__version__, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
