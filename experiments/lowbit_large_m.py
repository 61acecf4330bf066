"""Issue 19 probe: at large M, does "dequantise the packed weight to fp16 with one Triton kernel
(kernels/lowbit_dequant.py), then cuBLAS" beat slimforge's fused Triton GEMM, and where is the
crossover (what set kernels.lowbit.DEQUANT_MIN_M)? Same harness as kernels.bench_lowbit (cold L2, CUDA events, median), same run.

    python -m experiments.lowbit_large_m --out benchmarks/<date>-h200-lowbit-large-m.json

Rows: per shape, format (bits:group) and M: cuBLAS fp16 alone, the fused Triton GEMM
(kernels.lowbit.lowbit_linear), and dequantise + cuBLAS (the transient fp16 W_hat costs N*K*2 bytes),
with ratios to cuBLAS; the dequantise kernel alone; and the max relative error of each path. (The
committed probe JSONs were measured with the kernel's first copy here, writing into a preallocated
buffer; the library allocates per call, from the caching allocator.)
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess

import torch
import torch.nn.functional as F
import triton

from kernels import lowbit
from kernels.bench_lowbit import gpu_time_us, make_weight
from kernels.lowbit_dequant import dequantize
from kernels.lowbit_format import dequantize_groups, unpack


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--m", type=int, nargs="+", default=[16, 64, 128, 256, 512, 1024, 2048])
    ap.add_argument("--reps", type=int, default=30)
    args = ap.parse_args()
    shapes, formats, rows = [(4096, 4096), (14336, 4096), (4096, 14336)], [(4, 128), (2, 128)], []
    for n, k in shapes:
        for bits, group in formats:
            w16, packed, scale, zero = make_weight(n, k, bits, group)
            w_hat = dequantize_groups(unpack(packed, bits, k), scale, zero, group)
            assert torch.equal(dequantize(packed, scale, zero, bits, group, k, torch.float16), w_hat.half())
            t_deq = gpu_time_us(lambda: dequantize(packed, scale, zero, bits, group, k, torch.float16), args.reps)
            for m in args.m:
                x = torch.randn(m, k, device="cuda", dtype=torch.float16)
                ref = x.float() @ w_hat.t()
                fused = lowbit.lowbit_linear(x, packed, scale, zero, bits, group)  # tunes on first use
                split = F.linear(x, dequantize(packed, scale, zero, bits, group, k, torch.float16))
                err = {name: ((y.float() - ref).abs().max() / ref.abs().max()).item()
                       for name, y in (("fused", fused), ("dequant_cublas", split))}
                t_cublas = gpu_time_us(lambda: F.linear(x, w16), args.reps)
                t_fused = gpu_time_us(lambda: lowbit.lowbit_linear(x, packed, scale, zero, bits, group), args.reps)
                t_split = gpu_time_us(lambda: F.linear(x, dequantize(packed, scale, zero, bits, group, k, torch.float16)),
                                      args.reps)
                row = dict(section="forward", n=n, k=k, bits=bits, group=group, m=m, cublas_us=t_cublas, fused_us=t_fused,
                           dequant_cublas_us=t_split, dequant_only_us=t_deq, fused_ratio=t_cublas / t_fused,
                           dequant_cublas_ratio=t_cublas / t_split, rel_err=err)
                rows.append(row)
                print(f"{n}x{k} W{bits} M={m:5d}: cuBLAS {t_cublas:7.1f} us | fused {t_fused:7.1f} "
                      f"({row['fused_ratio']:.2f}x) | dequant+cuBLAS {t_split:7.1f} ({row['dequant_cublas_ratio']:.2f}x)"
                      f" | dequant alone {t_deq:.1f} us", flush=True)
            dy = torch.randn(2048, n, device="cuda", dtype=torch.float16)
            dx_ref = dy.float() @ w_hat
            dx_fused = lowbit._input_grad(dy, packed, scale, zero, bits, group, k, None, None)
            dx_split = dy @ dequantize(packed, scale, zero, bits, group, k, torch.float16)
            t_cublas = gpu_time_us(lambda: dy @ w16, args.reps)
            t_fused = gpu_time_us(lambda: lowbit._input_grad(dy, packed, scale, zero, bits, group, k, None, None),
                                  args.reps)
            t_split = gpu_time_us(lambda: dy @ dequantize(packed, scale, zero, bits, group, k, torch.float16), args.reps)
            rows.append(dict(section="dx", n=n, k=k, bits=bits, group=group, m=2048, cublas_us=t_cublas,
                             fused_us=t_fused, dequant_cublas_us=t_split, fused_ratio=t_cublas / t_fused,
                             dequant_cublas_ratio=t_cublas / t_split,
                             rel_err={name: ((d.float() - dx_ref).abs().max() / dx_ref.abs().max()).item()
                                      for name, d in (("fused", dx_fused), ("dequant_cublas", dx_split))}))
            print(f"{n}x{k} W{bits} dx M=2048: cuBLAS {t_cublas:7.1f} us | fused {t_fused:7.1f} "
                  f"({t_cublas / t_fused:.2f}x) | dequant+cuBLAS {t_split:7.1f} ({t_cublas / t_split:.2f}x)", flush=True)
            del w16, packed, scale, zero, w_hat
            torch.cuda.empty_cache()
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    record = {"command": "python -m experiments.lowbit_large_m --out ...", "commit": commit or "see the repo log",
              "gpu": torch.cuda.get_device_name(), "versions": {"torch": torch.__version__, "triton": triton.__version__,
                                                                 "python": platform.python_version()},
              "harness": "cold L2 (256 MB zeroed), CUDA events around the call, median of reps; fp16; same run",
              "rows": rows}
    with open(args.out, "w") as f:
        json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
