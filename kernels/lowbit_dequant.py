"""The low-bit matmul at large M (prefill, training, the input gradient): dequantise the packed
weight to x's dtype with one Triton kernel, then hand the product to cuBLAS, the way QLoRA-style
trainers do. The packed weight stays the only copy at rest; the dequantised one is transient (one
layer's N x K in x's dtype, taken from and returned to the caching allocator) and is rebuilt in the
backward pass rather than saved for it -- except under activation checkpointing, where the
recompute's copy is handed to the backward that follows it (one checkpointed segment's weights).

    from kernels.lowbit_dequant import dequantize, dequant_linear
    w = dequantize(packed, scale, zero, bits=4, group=128, in_features=4096, dtype=torch.float16)

Why: the fused GEMM (kernels/lowbit_triton.py) dequantises every weight tile once per M-tile and
routes it through shared memory to the MMA operand; at M = 2048 it ran at 0.17-0.34x cuBLAS on an
H200, dequantise + cuBLAS at 0.87-0.94x (benchmarks/2026-11-29-h200-lowbit-large-m.json). 2- and
4-bit only (3-bit's two-plane layout stays on the fused path).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.direct_launch import launch

try:
    import triton
    import triton.language as tl
except ImportError:  # no triton: lowbit_linear never dispatches here
    triton = None

DEQUANT_BITS = (2, 4)

if triton is not None:
    @triton.jit
    def _dequant_kernel(packed, scale, zero, out, N, stride_p, stride_s, stride_o,
                        BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, UNITS: tl.constexpr):
        """W_hat = (q - z) * s for the interleaved layout (kernels/lowbit_format.py): field i of word
        U*u + j (U = BITS) is column 32u + U*i + j. UNITS 32-column units per row are loaded once
        (coalesced), expanded in registers to (row, unit, field, j) -- which is column order -- and
        stored as one contiguous (BLOCK_N, 32 * UNITS) block."""
        FIELDS: tl.constexpr = 32 // BITS
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        units = tl.program_id(1) * UNITS + tl.arange(0, UNITS)
        words = units[:, None] * BITS + tl.arange(0, BITS)[None, :]
        row_ok = rows < N
        w = tl.load(packed + rows[:, None, None] * stride_p + words[None, :, :], mask=row_ok[:, None, None], other=0)
        shifts = tl.arange(0, FIELDS) * BITS
        q = ((w[:, :, None, :] >> shifts[None, None, :, None]) & ((1 << BITS) - 1)).to(tl.float32)
        g = units * 32 // GROUP
        s = tl.load(scale + rows[:, None] * stride_s + g[None, :], mask=row_ok[:, None], other=1.0).to(tl.float32)
        z = tl.load(zero + rows[:, None] * stride_s + g[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
        val = tl.reshape((q - z[:, :, None, None]) * s[:, :, None, None], (BLOCK_N, UNITS * 32))
        cols = tl.program_id(1) * UNITS * 32 + tl.arange(0, UNITS * 32)
        tl.store(out + rows[:, None] * stride_o + cols[None, :], val.to(out.dtype.element_ty), mask=row_ok[:, None])


def dequantize(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group: int,
               in_features: int, dtype: torch.dtype) -> torch.Tensor:
    """W_hat (N, in_features) in `dtype`: (q - zero) * scale in fp32, rounded once to `dtype`."""
    if bits not in DEQUANT_BITS:
        raise ValueError(f"the dequantise kernel takes {DEQUANT_BITS}-bit weights, got {bits}")
    n = packed.shape[0]
    out = torch.empty(n, in_features, device=packed.device, dtype=dtype)
    # 8 rows x 512 columns per program: in a grid of 32 launch shapes on an H200 this one was within
    # 2% of the best on all six Llama-8B shape/width cases and 3-7% faster than the 16 x 256 it replaces
    # (benchmarks/2026-11-30-h200-lowbit-dequant-overlap.json). in_features is a multiple of 32.
    units = next(u for u in (16, 8, 1) if in_features % (32 * u) == 0)
    grid = (triton.cdiv(n, 8), in_features // (32 * units))
    args = (packed, scale, zero, out, n, packed.stride(0), scale.stride(0), out.stride(0), bits, group, 8, units)
    launch(_dequant_kernel, grid, args, out.device, direct=DIRECT_LAUNCH, num_warps=4)
    return out


# Training launches this kernel twice per layer per step and QLoRAM's 8B-shape step is host-bound
# (benchmarks/2026-11-30-h200-qloram-host-bound.json): after a specialisation's first launch the compiled
# kernel is called directly (kernels/direct_launch.py). DIRECT_LAUNCH = False: always through triton's
# entry point.
DIRECT_LAUNCH = True


# W_hat dequantised by an activation-checkpointing recompute, by packed weight, for the backward of
# the same layer that follows it: the recompute runs inside the backward pass, so without this each
# checkpointed layer dequantised twice there (recompute, then dx). Entries live from a segment's
# recompute to its layers' backward (one decoder layer's weights at a time) and are popped on use.
_RECOMPUTED: dict[int, torch.Tensor] = {}


class _DequantMatmul(torch.autograd.Function):
    """x @ W_hat^T with dx = dy @ W_hat; W_hat is dequantised again in backward, never saved in
    the graph (a checkpoint recompute's copy is handed over through _RECOMPUTED)."""

    @staticmethod
    def forward(ctx, x2d, packed, scale, zero, bits, group):
        ctx.save_for_backward(packed, scale, zero)
        ctx.bits, ctx.group = bits, group
        w = dequantize(packed, scale, zero, bits, group, x2d.shape[1], x2d.dtype)
        if torch._C._current_graph_task_id() != -1:  # inside a backward pass: a checkpoint recompute
            _RECOMPUTED[packed.data_ptr()] = w
        return x2d @ w.t()

    @staticmethod
    def backward(ctx, dy):
        packed, scale, zero = ctx.saved_tensors
        w = _RECOMPUTED.pop(packed.data_ptr(), None)
        dx = None
        if ctx.needs_input_grad[0]:
            if w is None or w.dtype != dy.dtype:
                w = dequantize(packed, scale, zero, ctx.bits, ctx.group, packed.shape[1] * 32 // ctx.bits, dy.dtype)
            dx = dy @ w
        return dx, None, None, None, None, None


def dequant_linear(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                   group: int, down: torch.Tensor | None, up: torch.Tensor | None,
                   bias: torch.Tensor | None) -> torch.Tensor:
    """lowbit_linear's large-M path (arguments checked there): cuBLAS on the dequantised weight, the
    low-rank term as two small matmuls, autograd for x, down, up and bias."""
    x2d = x.reshape(-1, x.shape[-1])
    if torch.is_grad_enabled() and x2d.requires_grad:
        y = _DequantMatmul.apply(x2d, packed, scale, zero, bits, group)
    else:
        y = x2d @ dequantize(packed, scale, zero, bits, group, x2d.shape[1], x2d.dtype).t()
    if down is not None:
        y = y + F.linear(F.linear(x2d, down), up)
    if bias is not None:
        y = y + bias
    return y.view(*x.shape[:-1], packed.shape[0])
