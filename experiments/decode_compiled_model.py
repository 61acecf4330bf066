"""Issue 19 probe: the whole decode step compiled, torch.compile(model, fullgraph=True), bf16 against
W4 with fused projections, Llama-3-8B shape, static cache, the step replayed as one CUDA graph.

    python -m experiments.decode_compiled_model --out out.json [--layers 32] [--batch 1] [--steps 64]
        [--fuse-bf16] [--compiled-only]

--fuse-bf16: the bf16 baseline with the same projection fusion.

The low-bit layers enter the graph as the custom op slimforge::lowbit_linear (kernels/lowbit_op.py)
and fused projections share one op call per group, so there is no graph break: inductor fuses the
norms, rotary, adds and cache writes around the matmuls; bf16's linears are inductor's own (cuBLAS).
Per step: CUDA-event time of `--steps` replays. The prompt runs eagerly; only the step compiles.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

from experiments.decode_breakdown import replay_us, step_graph
from slimforge.fused_projections import fuse_projections
from slimforge.quantized import pack_linears
from stages.quantize.bench_speed import dense_8b


def step_us(model, batch: int, steps: int, compiled: bool) -> tuple[float, float]:
    """(microseconds per replayed step, seconds spent building the graph incl. compilation)."""
    torch._dynamo.reset()
    start = time.perf_counter()
    forward = torch.compile(model, fullgraph=True, dynamic=False) if compiled else None
    graph = step_graph(model, batch, prompt_len=128, max_new=2 * steps + 8, step_forward=forward)
    build_s = time.perf_counter() - start
    return replay_us(graph, steps), build_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--batch", type=int, nargs="+", default=[1])
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--fuse-bf16", action="store_true")
    ap.add_argument("--compiled-only", action="store_true")
    args = ap.parse_args()
    dense = dense_8b(args.layers)
    w4 = pack_linears(copy.deepcopy(dense), bits=4, group=128)
    fuse_projections(w4)
    if args.fuse_bf16:
        fuse_projections(dense)
    rows = []
    for batch in args.batch:
        for compiled in (True,) if args.compiled_only else (False, True):
            base_us, base_s = step_us(dense, batch, args.steps, compiled)
            w4_us, w4_s = step_us(w4, batch, args.steps, compiled)
            row = dict(batch=batch, compiled=compiled, bf16_fused=args.fuse_bf16, bf16_step_us=base_us, w4_fused_step_us=w4_us,
                       speedup=base_us / w4_us, build_s=[base_s, w4_s])
            rows.append(row)
            print(json.dumps(row), flush=True)
    with open(args.out, "w") as f:
        json.dump(dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, layers=args.layers, rows=rows),
                  f, indent=1)


if __name__ == "__main__":
    main()
