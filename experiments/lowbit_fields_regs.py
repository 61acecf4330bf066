"""Issue 19 probe: the per-field GEMM at M = 16 holds 167 registers per thread (Nsight Compute,
18.75% theoretical occupancy); does a register cap (the config key `maxnreg`) buy occupancy
without spilling its gains away?

    python -m experiments.lowbit_fields_regs --out regs.json [--reps 30]

For each shape and format (g128): the table's M=16 config, then the same with maxnreg 128 / 96 / 80,
timed in kernels.bench_lowbit's harness (cold L2, CUDA events, median) beside cuBLAS fp16, with the
compiled kernel's registers and spills.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
import triton

from kernels import lowbit, lowbit_tune
from kernels.bench_lowbit import gpu_time_us, make_weight
from kernels.lowbit_format import dequantize_groups, unpack
from experiments.lowbit_fields import compiled_gemm

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (1024, 4096)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--m", type=int, default=16)
    ap.add_argument("--reps", type=int, default=30)
    args = ap.parse_args()
    gpu = torch.cuda.get_device_name()
    rows = []
    for n, k in SHAPES:
        for bits in (4, 2):
            w16, packed, scale, zero = make_weight(n, k, bits, 128)
            x = torch.randn(args.m, k, device="cuda", dtype=torch.float16)
            ref = x.float() @ dequantize_groups(unpack(packed, bits, k), scale, zero, 128).t()
            lowbit._forward(x, packed, scale, zero, bits, 128, None, None, None)  # tunes where the table has no entry
            base = lowbit_tune.tables()[gpu][lowbit_tune.config_key("gemm", args.m, n, k, bits, 128)]
            row = dict(n=n, k=k, bits=bits, m=args.m, cfg=base, cublas_us=gpu_time_us(lambda: F.linear(x, w16), args.reps))
            for cap in (None, 128, 96, 80):
                cfg = dict(base, **({"maxnreg": cap} if cap else {}))
                run = lambda: lowbit._forward(x, packed, scale, zero, bits, 128, None, None, None, cfg=cfg, kind="gemm")
                err = ((run().float() - ref).abs().max() / ref.abs().max()).item()
                kernel = compiled_gemm(cfg, x, packed, scale, zero, bits)
                regs, spills = kernel.n_regs, kernel.n_spills
                t = gpu_time_us(run, args.reps)
                row[str(cap)] = dict(us=t, ratio=row["cublas_us"] / t, regs=regs, spills=spills, rel_err=err)
            rows.append(row)
            print(f"{n}x{k} W{bits} M={args.m} cuBLAS {row['cublas_us']:.1f} us | " + " | ".join(
                f"cap {c}: {row[c]['us']:.1f} us {row[c]['ratio']:.2f}x regs {row[c]['regs']} spills {row[c]['spills']}"
                for c in ("None", "128", "96", "80")), flush=True)
    with open(args.out, "w") as f:
        json.dump(dict(gpu=gpu, torch=torch.__version__, triton=triton.__version__, rows=rows), f, indent=1)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
