"""Issue 19 probe: one low-bit call for q/k/v (and one for gate/up) instead of three (two), back to
back in a CUDA graph as decode runs them, against cuBLAS bf16 separate and fused in the same run.

    python -m experiments.lowbit_fused_proj --out fused.json [--m 1 16] [--bits 4] [--sets 4]

Why: at decode the Llama-3-8B-shape layer makes 7 low-bit calls, two of them on the small k/v
(1024x4096: 2 MB at 4 bits, less than one wave of the GPU); concatenating the weights along N
(6144x4096 for q|k|v, 28672x4096 for gate|up) halves the launches. Each point is `--sets` distinct
weight sets (cold in L2, as in decode) in one graph; per-set time = graph time / sets.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from experiments.lowbit_graph_chain import graph_us
from kernels import lowbit
from kernels.bench_lowbit import make_weight

GROUPS = {"qkv": [(4096, 4096), (1024, 4096), (1024, 4096)], "gate_up": [(14336, 4096), (14336, 4096)]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--m", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--bits", type=int, nargs="+", default=[4])
    ap.add_argument("--sets", type=int, default=4)
    ap.add_argument("--replays", type=int, default=50)
    args = ap.parse_args()
    rows = []
    for name, shapes in GROUPS.items():
        k = shapes[0][1]
        n_fused = sum(n for n, _ in shapes)
        for bits in args.bits:
            parts = [[make_weight(n, k, bits, 128, seed=10 * s + i) for i, (n, _) in enumerate(shapes)]
                     for s in range(args.sets)]
            fused = [make_weight(n_fused, k, bits, 128, seed=100 + s) for s in range(args.sets)]
            for m in args.m:
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                call = lambda w: (lambda: lowbit.lowbit_linear(x, w[1], w[2], w[3], bits, 128))
                dense = lambda w: (lambda d=w[0].to(torch.bfloat16): F.linear(x, d))
                for w in (*parts[0], fused[0]):  # tune outside the graph (the fused shapes are not in the table)
                    call(w)()
                row = dict(group=name, bits=bits, m=m, n_fused=n_fused, k=k,
                           ours_separate_us=graph_us([call(w) for ws in parts for w in ws], args.replays) * len(shapes),
                           ours_fused_us=graph_us([call(w) for w in fused], args.replays),
                           cublas_separate_us=graph_us([dense(w) for ws in parts for w in ws], args.replays) * len(shapes),
                           cublas_fused_us=graph_us([dense(w) for w in fused], args.replays))
                row["ratio_separate"] = row["cublas_separate_us"] / row["ours_separate_us"]
                row["ratio_fused_vs_cublas_separate"] = row["cublas_separate_us"] / row["ours_fused_us"]
                row["ratio_fused_vs_cublas_fused"] = row["cublas_fused_us"] / row["ours_fused_us"]
                rows.append(row)
                print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
            del parts, fused
            torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        json.dump(dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=lowbit.triton.__version__,
                       rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
