"""Launch helpers of the low-bit kernels (kernels/lowbit.py): the split-K / low-rank counters, x in the
per-field GEMM's field order, and the MMA instruction switch. No kernels here.
"""

from __future__ import annotations

import contextlib
import os

import torch


_COUNTERS: dict[tuple, torch.Tensor] = {}


def _counters(device: torch.device, size: int) -> torch.Tensor:
    """Zeroed int32 counters [32 low-rank words, split-K tiles...] for this device and stream
    (kernels/lowbit_triton.py _epilogue); every launch leaves them zeroed, so they are reused
    without a memset."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (str(device), stream)
    buf = _COUNTERS.get(key)
    if buf is None or buf.numel() < size:
        buf = _COUNTERS[key] = torch.zeros(max(size, 1024), dtype=torch.int32, device=device)
    return buf


def _field_order(x2d: torch.Tensor, bits: int) -> torch.Tensor:
    """x (M, K) as (M, 8, K/8): row f holds, for every packed unit c, the activation that field f of
    unit c multiplies (the k map in lowbit_tiles._fields_tile)."""
    M, K = x2d.shape
    if bits == 4:  # k = 32u + 4f + j, unit c = 4u + j
        return x2d.view(M, K // 32, 8, 4).transpose(1, 2).reshape(M, 8, K // 8)
    # k = 32u + 16h + 2f + j, unit c = 4u + 2j + h
    return x2d.view(M, K // 32, 2, 8, 2).permute(0, 3, 1, 4, 2).reshape(M, 8, K // 8)


@contextlib.contextmanager
def _mma_version(version: int):
    """Compile inside with Hopper's wgmma (3) or with mma.sync (2: triton's DISABLE_MMA_V3, a
    cache-invalidating variable, so the on-disk cache keeps the two apart; in memory the kernel's
    MMA constexpr does). Triton 3.6 waits for each wgmma whose A operand sits in registers before
    the next is issued: the per-field GEMM's eight MMAs per tile then run one at a time, where
    mma.sync lets the hardware overlap them with the next field's dequantisation (H200, FIELDS at
    M=16: W2 0.99-1.07x cuBLAS vs 0.83-0.97x, benchmarks/2026-11-30-h200-lowbit-mma-v2.json).
    Read at compile time only; restored after every launch."""
    if version == 3:
        yield
        return
    old = os.environ.get("DISABLE_MMA_V3")
    os.environ["DISABLE_MMA_V3"] = "1"
    try:
        yield
    finally:
        if old is None:
            del os.environ["DISABLE_MMA_V3"]
        else:
            os.environ["DISABLE_MMA_V3"] = old
