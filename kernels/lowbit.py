"""Low-bit matmul: y = x @ W_hat^T (+ (x @ down^T) @ up^T) (+ bias) straight from the packed 2/3/4-bit
weight (kernels/lowbit_format.py), and the input gradient dx = dy @ W_hat (+ (dy @ up) @ down), for
the quantize, lora and package stages. W_hat is never materialised on the GPU.

    from kernels.lowbit import lowbit_linear
    y = lowbit_linear(x, packed, scale, zero, bits=4, group=128)   # the layer: kernels/quant_linear.py
    python -m kernels.bench_lowbit --out bench.json     # ratios vs cuBLAS fp16 on this GPU

Kernels (x: (M, K) rows of activations, W: (N, K) as nn.Linear stores it):
- GEMV, M <= GEMV_MAX_M (decode; memory-bound, the main target). A program owns BLOCK_N output
  rows of one x row and a K-slice (split-K), walked in tiles whose loads are issued one tile ahead
  (software prefetch; a config may turn it off, PREFETCH=False, to hold half the words and fit
  more warps per SM: the H200's pick on most shapes). All threads lie along K, each holding one
  32-weight unit (the packing's U words) of every row, so each activation load (a U-wide vector,
  thanks to the interleaved packing) serves BLOCK_N rows. Dequantisation is 2 ops per weight: the field is masked in place
  (one LOP3) and read as a *denormal* fp32, exactly q * 2**(POS-149), then FMA'd with the
  activation pre-scaled by 2**(100-POS) (int->float I2F runs at 1/8 of the FMA rate on H100; the
  2**23 "magic number" trick needs a third op to remove the offset). Zero point and scale are
  applied once per unit: acc += s * (sum q x - z * sum x). Loop body ~3.4-4.6 instructions per
  weight (SASS, 4- and 2-bit).
- GEMM, M > GEMV_MAX_M: tiles of the transposed product (y^T = W_hat x^T, "swap AB") so that small
  M sits in the MMA's N dimension and the dequantised tile is the register operand; the weight
  tile is dequantised to x's dtype (shift, or into 2**23, subtract 2**23 + z, times s) and fed
  to tl.dot. About 9-10 instructions per weight plus a trip through shared memory to reach the
  MMA operand layout: this path is the slow one (see the benchmark).
  Per-field variant (config key FIELDS, M <= 32, 2/4-bit, group 128: the tuner's pick there on an
  H200): one MMA per field position of the packed units (32-bit words at 4 bits, 16-bit
  half-words at 2), each against the matching rows of x; with only elementwise ops between the
  unit load and tl.dot, triton loads the packed tile into the MMA operand layout itself and the
  fp16 tile never touches shared memory (W4 M=16 1.01-1.06x cuBLAS against 0.61-0.79x).
  FIELDS=2 reads x from a copy in field order (one small permute), FIELDS=1 gathers it in place.
  Config key MMA=2 compiles it with mma.sync instead of wgmma (see _mma_version: triton serialises
  wgmmas whose A operand is in registers).
  FIELDS=3 runs on 32-bit words at any width and group (one MMA per field and group, x rows of
  the tile's other groups masked): the tuner offers it for 4-bit at groups 32 and 64.
  Un-swapped variant (config key NT, from M = 17): x's tile is the MMA's A operand and the weight
  tile, dequantised k-major (lowbit_tiles._dequant_kn), is B; both sit in shared memory, so wgmma
  need not wait for a register operand before the next tile. On an H200 it is the tuner's pick
  at M = 64 on every Llama-8B shape (W4 0.72-0.79x cuBLAS, was 0.43-0.56x) and at M = 32 on
  seven of eight; past M = 128 re-dequantising W per M tile loses to dequantise + cuBLAS
  (benchmarks/2026-12-01-h200-lowbit-nt-gemm.json).
  Half2 dequantisation (fp16 x, 2/4-bit, FIELDS 1/2 and NT; config key HALF2, on unless 0): two
  fields per 32-bit op -- one LOP3 drops them into the mantissas of an fp16 pair 1024 + q, then
  sub.f16x2 and mul.f16x2 (lowbit_half2._half2_pair, inline PTX), bit-identical to the fp32 route.
  On an H200 the median tile ran 1.01-1.12x faster at every point timed (M = 16..128, four
  shapes, W4 and W2), the best tile of each grid 0.98-1.15x (benchmarks/2026-12-01-h200-lowbit-half2.json).
- Dequantise + cuBLAS, M >= DEQUANT_MIN_M[bits] (2- and 4-bit: 128; an H200 from 129,
  DEQUANT_MIN_M_BY_GPU) (kernels/lowbit_dequant.py): W_hat in x's dtype from one coalesced Triton
  pass, then cuBLAS; dx the same way in backward (W_hat recomputed, not
  saved). The fused kernels below stay for smaller M and for 3-bit weights.
- dx: tiles of dy @ W_hat computed transposed (dx^T = W_hat^T dy^T), same dequantisation,
  reducing over N; the low-rank term is one extra tl.dot in the epilogue.
Split-K partials (fp32) go to a workspace; the last program of a tile to arrive (atomic counter)
sums them in a fixed order, so results are deterministic, and resets its counter: one launch, no
memset. The fused low-rank term x @ down^T is computed inside the same launch by the first
programs of the grid ("t-programs", each a K-slice of a few rows of `down`, fp32 partials); the
programs that write output wait for them (a spin on a counter, only in their epilogue:
t-programs have the lowest ids, so they are scheduled first and never wait) and add t @ up^T to
their tile. Counters live in a small int32 buffer per (device, stream), spread over 32 addresses
(one hot address serialised ~3600 atomics: +10 us at N=14336); one atomic per output tile tells it
both that t is complete and whether it is its word's last reader, which zeroes the word, so every
launch leaves them zeroed and CUDA-graph replays work.

Kernels: kernels/lowbit_triton.py. Configs: kernels/lowbit_tune.py (a shipped per-GPU table, a
per-user cache, tuning on first use).

Dispatch: Triton for CUDA tensors (and CPU tensors under TRITON_INTERPRET=1, which the tests use);
kernels.reference.lowbit_matmul_ref (dequantise, fp32 matmul, cast back) otherwise. On CUDA the
activations must be fp16 or bf16; accumulation is fp32; the weight tile given to tl.dot is rounded
to x's dtype (GEMM, dx), the GEMV path keeps it exact in fp32. GEMV limits: |x| < 2**28 (the
pre-scale must not overflow) and products below ~1e-23 lose precision (they land in fp32's
denormal range) -- both far outside what activations do.
"""

from __future__ import annotations

import math

import torch

from kernels import direct_launch
from kernels.dispatch import use_triton
from kernels.lowbit_dequant import dequant_linear
from kernels.lowbit_dispatch import (DEQUANT_MIN_M, DEQUANT_MIN_M_BY_GPU, GEMV_MAX_M,  # noqa: F401 (re-exported)
                                     _dequant_min_m, kernel_kind)
from kernels.lowbit_format import check_lowbit_args
from kernels.lowbit_launch import _COUNTERS, _counters, _field_order, _mma_version  # noqa: F401 (tests, experiments)
from kernels.lowbit_triton import N_SLOTS, READY, T_K, T_K_GEMM, T_ROWS, triton
from kernels.lowbit_tune import config_for, pow2
from kernels.reference import lowbit_matmul_ref

if triton is not None:
    from kernels.lowbit_triton import _dx_kernel, _gemm_kernel, _gemv_kernel

# Forward launches go through the compiled kernel's own launcher after the first (kernels/direct_launch.py):
# an eager forward of a quantized model at prefill sizes is host-bound. False: triton's JIT entry point.
DIRECT_LAUNCH = True


# --------------------------------------------------------------------------------------------
# launchers

def _upcast(dtype: torch.dtype, device: torch.device) -> bool:
    """The kernels' UPCAST: bf16 under the interpreter, which multiplies bf16 tiles as raw integers."""
    return dtype == torch.bfloat16 and device.type != "cuda"


def _forward(x2d, packed, scale, zero, bits, group, down, up, bias, cfg: dict | None = None,
             kind: str | None = None) -> torch.Tensor:
    """y (M, N) for x2d (M, K); `cfg` and `kind` force a config / kernel (the benchmark uses them)."""
    M, K = x2d.shape
    x2d = x2d if x2d.stride(1) == 1 else x2d.contiguous()
    kind = kind or kernel_kind(M, bits, x2d.device, x2d.dtype)
    has_lr = down is not None
    shape = (kind, M, packed.shape[0], K, down.shape[0] if has_lr else 0, bits, group, bias is not None, x2d.dtype,
             x2d.device, x2d.stride(0), packed.stride(0))
    tensors = (x2d, packed, scale, zero, bias, down, up)
    if cfg is None:
        tune_run = lambda c: _launch(_plan(c, *shape), *tensors)  # noqa: E731 -- the tuner times candidates
        variant = ("|lr" if has_lr else "") + ("|bf16" if kind == "gemm" and x2d.dtype == torch.bfloat16 else "")
        cfg = config_for(kind, M, shape[2], K, bits, group, x2d.device, tune_run, variant)
    plan = _PLANS.get(shape)
    if plan is None or plan[0] is not cfg:  # a new shape, or its config changed (tuned, table edited)
        plan = _plan(cfg, *shape)
        if len(_PLANS) < 4096:
            _PLANS[shape] = plan
    return _launch(plan, *tensors)


# Launch plans by call shape: everything about a launch but the tensors, worked out once. Eager
# prefill and QLoRAM-style training call these layers from the host hundreds of times per forward,
# and building the ~35 kernel arguments per call cost more host time than the launch itself.
_PLANS: dict[tuple, tuple] = {}
_TENSOR_ARGS = ("X", "XF", "P", "P16", "S", "Z", "B", "D", "U", "T", "Y", "WS", "CNT")


def _plan(cfg, kind, M, N, K, R, bits, group, has_bias, dtype, device, stride_xm, stride_p) -> tuple:
    """(cfg, kernel, grid, non-tensor arguments in order, options, counters needed, bits if x goes in field
    order (FIELDS=2) else 0, MMA, shape of the low-rank partials t, split-K, GEMM?) for one launch shape."""
    has_lr = R > 0
    bm = pow2(M) if kind == "gemv" else cfg["BLOCK_M"]  # GEMV: rows of x the t-programs take
    split = cfg["SPLIT_K"]
    tiles = math.ceil(N / cfg["BLOCK_N"]) * (M if kind == "gemv" else math.ceil(M / bm))
    ts = n_tprog = 0
    if has_lr:
        ts = math.ceil(K / (T_K // 4 * cfg["num_warps"] // bm)) if kind == "gemv" else math.ceil(K / T_K_GEMM)
        n_tprog = math.ceil(R / T_ROWS) * ts if kind == "gemv" else math.ceil(M / bm) * ts
        if n_tprog * READY >= 2**31 or math.ceil(tiles / N_SLOTS) >= READY:  # fields of the counter word
            raise ValueError(f"low-rank correction: {n_tprog} t-programs and {tiles} output tiles exceed the "
                             f"counter word (allowed: < {2**31 // READY} and < {N_SLOTS * READY})")
    fields = cfg.get("FIELDS", 0) if kind == "gemm" else 0
    mma = cfg.get("MMA", 3) if kind == "gemm" else 3
    # half2 dequantisation unless the config says HALF2: 0 (faster on every tile timed, same bits): fp16
    # only (bf16 keeps the fp32 route), per-row scale tiles of 2/4-bit
    half2 = int(bool(cfg.get("HALF2", 1)) and (fields in (1, 2) or bool(cfg.get("NT"))) and dtype == torch.float16
                and bits in (2, 4) and kind == "gemm" and cfg["BLOCK_K"] <= group)
    kernel, extra = ((_gemv_kernel, dict(T_WARPS=cfg["num_warps"], PREFETCH=cfg.get("PREFETCH", True)))
                     if kind == "gemv" else (_gemm_kernel, dict(FIELDS=fields, MMA=mma, NT=cfg.get("NT", 0),
                                              HALF2=half2, ASM=device.type == "cuda")))
    named = dict(M=M, N=N, K=K, R=R, TS=ts, stride_xm=stride_xm, stride_ym=N, stride_p=stride_p, n_tprog=n_tprog,
                 BITS=bits, GROUP=group, HAS_BIAS=has_bias, HAS_LR=has_lr, BLOCK_M=bm, SPLIT_K=split,
                 BLOCK_R=max(16, pow2(R)), UPCAST=_upcast(dtype, device),
                 **{k: v for k, v in cfg.items() if k.startswith("BLOCK") and k != "BLOCK_M"}, **extra)
    names = list(kernel.arg_names)
    first = len([a for a in names if a in _TENSOR_ARGS])
    assert tuple(names[:first]) == tuple(a for a in _TENSOR_ARGS if a in names), names  # tensors lead
    options = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
                   **({"maxnreg": cfg["maxnreg"]} if cfg.get("maxnreg") else {}))
    return (cfg, kernel, (n_tprog + tiles * split,), tuple(named[a] for a in names[first:]), options, N_SLOTS + tiles,
            bits if fields == 2 else 0, mma, (ts, M, R), split, kind == "gemm")


def _launch(plan, x2d, packed, scale, zero, bias, down, up) -> torch.Tensor:
    _, kernel, grid, static, options, n_counters, field_bits, mma, t_shape, split, gemm = plan
    M, N = x2d.shape[0], packed.shape[0]
    y = torch.empty(M, N, device=x2d.device, dtype=x2d.dtype)
    t = torch.empty(t_shape, device=x2d.device, dtype=torch.float32) if down is not None else y
    ws = torch.empty(split, M, N, device=x2d.device, dtype=torch.float32) if split > 1 else y
    xs = (x2d, _field_order(x2d, field_bits) if field_bits else x2d) if gemm else (x2d,)  # GEMM: X and XF
    tensors = (*xs, packed, packed.view(torch.int16), scale, zero, y if bias is None else bias, y if down is None else down,
               y if up is None else up, t, y, ws, _counters(x2d.device, n_counters))
    with _mma_version(mma):
        direct_launch.launch(kernel, grid, tensors + static, x2d.device, direct=DIRECT_LAUNCH, n_tensors=len(tensors),
                             **options)
    return y


def _input_grad(dy2d, packed, scale, zero, bits, group, K, down, u, cfg: dict | None = None) -> torch.Tensor:
    M, N = dy2d.shape
    dx = torch.empty(M, K, device=dy2d.device, dtype=dy2d.dtype)
    dy2d = dy2d if dy2d.stride(1) == 1 else dy2d.contiguous()
    R = down.shape[0] if down is not None else 0

    def launch(cfg):
        grid = (math.ceil(M / cfg["BLOCK_M"]) * math.ceil(K / cfg["BLOCK_K"]),)
        _dx_kernel[grid](dy2d, packed, packed.view(torch.int16), scale, zero, down if R else dx, u if R else dx, dx, M, N, K, R,
                         dy2d.stride(0), dx.stride(0), packed.stride(0), BITS=bits, GROUP=group, HAS_LR=R > 0,
                         BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
                         BLOCK_R=max(16, pow2(R)), UPCAST=_upcast(dy2d.dtype, dy2d.device),
                         num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])

    launch(cfg or config_for("dx", M, N, K, bits, group, dy2d.device, launch))
    return dx


class _LowbitLinear(torch.autograd.Function):
    """Gradients for x, down, up and bias; never for the packed weight, scale or zero."""

    @staticmethod
    def forward(ctx, x, packed, scale, zero, bias, down, up, bits, group):
        x2d = x.reshape(-1, x.shape[-1])
        y = _forward(x2d, packed, scale, zero, bits, group, down, up, bias)
        lr_grad = down is not None and (down.requires_grad or up.requires_grad)
        ctx.save_for_backward(x2d if lr_grad else None, packed, scale, zero, down, up)
        ctx.bits, ctx.group, ctx.x_shape = bits, group, x.shape
        return y.view(*x.shape[:-1], packed.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x2d, packed, scale, zero, down, up = ctx.saved_tensors
        need_x, _, _, _, need_b, need_d, need_u, _, _ = ctx.needs_input_grad
        dy2d = dy.reshape(-1, dy.shape[-1])
        u = dy2d.float() @ up.float() if down is not None and (need_x or need_d) else None
        dx = grad_down = grad_up = grad_b = None
        if need_x:
            dx = _input_grad(dy2d, packed, scale, zero, ctx.bits, ctx.group, ctx.x_shape[-1], down, u)
            dx = dx.view(ctx.x_shape)
        if need_d:
            grad_down = (u.t() @ x2d.float()).to(down.dtype)
        if need_u:
            grad_up = (dy2d.float().t() @ (x2d.float() @ down.float().t())).to(up.dtype)
        if need_b:
            grad_b = dy2d.float().sum(0).to(dy.dtype)
        return dx, None, None, None, grad_b, grad_down, grad_up, None, None


def needs_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def lowbit_linear(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                  group: int, out_features: int | None = None, down: torch.Tensor | None = None,
                  up: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W_hat^T (+ (x @ down^T) @ up^T) (+ bias), W_hat the dequantised packed weight.

    x (..., K) fp16/bf16 (fp32 too off CUDA); packed int32 (N, K*bits/32); scale, zero fp16 (N, K/group);
    down (r, K), up (N, r): PEFT lora_A / lora_B with the LoRA scaling already folded in; bias (N,).
    Returns (..., N) in x's dtype. Differentiable in x, down, up, bias."""
    check_lowbit_args(x, packed, scale, zero, bits, group, out_features, down, up, bias)
    return lowbit_linear_checked(x, packed, scale, zero, bits, group, down, up, bias)


def lowbit_linear_checked(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                          group: int, down: torch.Tensor | None = None, up: torch.Tensor | None = None,
                          bias: torch.Tensor | None = None) -> torch.Tensor:
    """lowbit_linear for arguments check_lowbit_args has passed (QuantLinear checks its own once per set of
    tensors: on the GPU host the checks cost about what the dequantise launch does, per layer call)."""
    K = x.shape[-1]
    if not use_triton(x):
        return lowbit_matmul_ref(x, packed, scale, zero, bits, group, down, up, bias)
    if down is not None:  # the kernels read the factors in x's dtype; autograd undoes the cast
        down, up = down.to(x.dtype).contiguous(), up.to(x.dtype).contiguous()
    kind = kernel_kind(x.numel() // K, bits, x.device, x.dtype)
    if kind == "dequant":
        return dequant_linear(x, packed, scale, zero, bits, group, down, up, bias)
    N = packed.shape[0]
    if not needs_grad(x, down, up, bias):  # inference: skip autograd.Function's overhead (it matters at decode sizes)
        y = _forward(x.reshape(-1, K), packed, scale, zero, bits, group, down, up, bias, kind=kind)
        return y.view(*x.shape[:-1], N)
    return _LowbitLinear.apply(x, packed, scale, zero, bias, down, up, bits, group)
