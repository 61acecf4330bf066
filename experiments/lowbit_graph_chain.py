"""Issue 19 probe: the low-bit linears back to back inside one CUDA graph, as decode runs them,
against cuBLAS bf16 in the same setting and against the isolated cold-L2 harness the tuner uses.

    python -m experiments.lowbit_graph_chain --out chain.json [--m 1 16] [--chain 8] [--replays 50]
        [--dtypes bfloat16 float16]

Why: in the Llama-8B-shape decode at batch 16 the W4 linears' kernels summed to ~4% more GPU time
than bf16's cuBLAS ones (experiments/profile_decode.py), while the harness puts every M=16 shape at
1.03-1.12x cuBLAS. Here each point is a graph of `--chain` calls on distinct weights (cold in L2,
as in decode) with the same x, replayed; per-call time = graph time / calls. Our kernel runs with
the shipped config, plain and -- with the patch stored as `pdl_patch` in
benchmarks/2026-11-30-h200-lowbit-graph-chain.json applied (`git apply`), a config key PDL -- launched
with programmatic dependent launch (the grid is scheduled while the previous one drains and waits on
griddepcontrol before any memory access). Without the patch the PDL columns are left out. The patch
is not in kernels/: 0-8% per call here, no gain end to end.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from kernels import lowbit, lowbit_tune
from kernels.bench_lowbit import gpu_time_us, make_weight

SHAPES = [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)]


def graph_us(calls, replays: int) -> float:
    """Microseconds per call of `calls` (a list of thunks) captured in one CUDA graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for c in calls:  # compile, counters, allocator
            c()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in calls:
            c()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(5):
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1000 / replays / len(calls))
    return sorted(times)[2]


def pdl_patched() -> bool:
    return "PDL" in lowbit._gemm_kernel.arg_names


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--m", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 2])
    ap.add_argument("--chain", type=int, default=8)
    ap.add_argument("--replays", type=int, default=50)
    ap.add_argument("--dtypes", nargs="+", default=["bfloat16"], choices=["bfloat16", "float16"],
                    help="x's dtype (and cuBLAS's); fp16 takes the half2 dequantisation, bf16 the fp32 route")
    args = ap.parse_args()
    gpu = torch.cuda.get_device_name()
    rows = []
    for n, k in SHAPES:
        for bits in args.bits:
            weights = [make_weight(n, k, bits, 128, seed=i) for i in range(args.chain)]
            for m, dtype in [(m, getattr(torch, d)) for m in args.m for d in args.dtypes]:
                dense = [w[0].to(dtype) for w in weights]
                x = torch.randn(m, k, device="cuda", dtype=dtype)
                kind = lowbit.kernel_kind(m, bits, x.device, dtype)
                lowbit.lowbit_linear(x, *weights[0][1:], bits, 128)  # tunes if the table lacks it
                key = lowbit_tune.config_key(kind, m, n, k, bits, 128)
                bf16_key = key + "|bf16" if kind == "gemm" and dtype == torch.bfloat16 else key
                cfg = lowbit_tune.tables()[gpu].get(bf16_key) or lowbit_tune.tables()[gpu][key]  # what dispatch runs
                ours = lambda c: [lambda w=w: lowbit._forward(x, w[1], w[2], w[3], bits, 128, None, None, None, cfg=c,
                                                              kind=kind) for w in weights]
                row = dict(n=n, k=k, bits=bits, m=m, dtype=str(dtype), kind=kind, cfg=cfg,
                           cublas_graph_us=graph_us([lambda d=d: F.linear(x, d) for d in dense], args.replays),
                           ours_graph_us=graph_us(ours(cfg), args.replays),
                           cublas_cold_us=gpu_time_us(lambda: F.linear(x, dense[0]), 30),
                           ours_cold_us=gpu_time_us(ours(cfg)[0], 30))
                if pdl_patched():
                    row.update(ours_pdl_graph_us=graph_us(ours(dict(cfg, PDL=True)), args.replays),
                               ours_pdl_cold_us=gpu_time_us(ours(dict(cfg, PDL=True))[0], 30))
                for key in ("graph", "pdl_graph", "cold", "pdl_cold"):
                    if f"ours_{key}_us" in row:
                        row["ratio_" + key] = row["cublas_" + key.replace("pdl_", "") + "_us"] / row[f"ours_{key}_us"]
                rows.append(row)
                pdl = f" PDL {row['ours_pdl_graph_us']:.1f} ({row['ratio_pdl_graph']:.2f}x)" if pdl_patched() else ""
                print(f"{n}x{k} W{bits} M={m} {dtype} {kind}: graph cuBLAS {row['cublas_graph_us']:.1f} ours "
                      f"{row['ours_graph_us']:.1f} ({row['ratio_graph']:.2f}x){pdl} | cold cuBLAS "
                      f"{row['cublas_cold_us']:.1f} ours {row['ours_cold_us']:.1f} ({row['ratio_cold']:.2f}x)", flush=True)
            del weights
            torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        json.dump(dict(gpu=gpu, torch=torch.__version__, triton=lowbit.triton.__version__, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
