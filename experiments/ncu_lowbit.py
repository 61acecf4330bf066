"""Issue 19 probe: one low-bit launch per kernel kind for Nsight Compute (why is it slow?).

    ncu --section SpeedOfLight --section Occupancy --section WarpStateStats --section LaunchStats \
        -k regex:_gemm_kernel --launch-skip 3 --launch-count 1 python -m experiments.ncu_lowbit --m 16

Shipped configs only (no tuning): a 4096 x 4096 W4 g128 layer, fp16, M rows of activations.
"""

from __future__ import annotations

import argparse

import torch

from kernels import lowbit
from kernels.bench_lowbit import make_weight

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--m", type=int, default=16)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--k", type=int, default=4096)
    args = ap.parse_args()
    _, packed, scale, zero = make_weight(args.n, args.k, args.bits, 128)
    x = torch.randn(args.m, args.k, device="cuda", dtype=torch.float16)
    for _ in range(5):
        lowbit.lowbit_linear(x, packed, scale, zero, args.bits, 128)
    torch.cuda.synchronize()
