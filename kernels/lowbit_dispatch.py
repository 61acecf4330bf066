"""Which low-bit kernel runs at M rows of x (kernels/lowbit.py): the GEMV, the fused GEMM, or
dequantise + cuBLAS, by crossovers measured per GPU.

    from kernels.lowbit_dispatch import kernel_kind
    kernel_kind(16, bits=4)   # "gemm"
"""

from __future__ import annotations

import functools

import torch

# GEMV (grid over rows of x) up to here: H100, 4096x4096, GEMV vs GEMM: W4 M=2 15.6 vs 27.9 us,
# M=4 20.7 vs 30.4 us; W2 M=4 20.0 vs 22.2 us. Each extra row costs ~2.5 us more.
GEMV_MAX_M = 4
# Dequantise + cuBLAS (kernels/lowbit_dequant.py) from here on, per bit width (3-bit: never). H200,
# three Llama-8B shapes, same run (benchmarks/2026-11-29-h200-lowbit-crossover.json): from M = 128
# it beat the fused GEMM on all three for W4 (0.48-0.56x vs 0.37-0.45x cuBLAS) and W2 (0.50-0.61x vs
# 0.47-0.49x); at M = 64 the two are mixed; at M = 256 dequant won on all six
# (benchmarks/2026-11-29-h200-lowbit-large-m.json). A per-width table for GPUs where they part.
DEQUANT_MIN_M = {4: 128, 2: 128}
# GPUs with a crossover measured since: on an H200 the un-swapped GEMM (NT) with half2 dequantisation
# beat dequantise + cuBLAS at M = 128 on all four shapes and both widths (W4 0.55-0.72x cuBLAS vs
# 0.49-0.68x, W2 0.59-0.77x vs 0.51-0.70x, benchmarks/2026-12-01-h200-lowbit-half2.json) and lost at
# 256 (0.33-0.53x vs 0.53-0.76x, benchmarks/2026-12-01-h200-lowbit-nt-gemm.json); M in between untimed.
# fp16 x only: bf16 takes the fp32 dequantisation route, with which NT only tied at 128.
DEQUANT_MIN_M_BY_GPU = {"NVIDIA H200": {4: 129, 2: 129}}


@functools.lru_cache(maxsize=None)
def _dequant_min_m(device_index: int | None) -> dict:
    if device_index is None:
        return DEQUANT_MIN_M
    return DEQUANT_MIN_M_BY_GPU.get(torch.cuda.get_device_name(device_index), DEQUANT_MIN_M)


def kernel_kind(M: int, bits: int = 4, device: torch.device | None = None,
                dtype: torch.dtype = torch.float16) -> str:
    """gemv, gemm or dequant for M rows of x (`dtype`) on `device` (None: the current CUDA device, if any)."""
    if M <= GEMV_MAX_M:
        return "gemv"
    if dtype != torch.float16:
        index = None
    elif device is None:
        index = torch.cuda.current_device() if torch.cuda.is_available() else None
    elif device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
    else:
        index = None
    first = _dequant_min_m(index)
    return "dequant" if bits in first and M >= first[bits] else "gemm"
