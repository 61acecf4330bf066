"""Triton-vs-reference cases for the low-bit matmul (kernels/lowbit.py), run by tests/test_lowbit.py
under TRITON_INTERPRET=1 in a subprocess (the interpreter must be chosen before Triton compiles) and
directly on a GPU. `python -m tests.lowbit_cases cpu|cuda` prints one line per failure.

Each case: forward vs kernels.reference.lowbit_matmul_ref (fp32 math, cast back) and the gradients
of x, down, up and bias vs autograd through that reference, on shapes whose N is not a multiple of
any block. Errors are measured as max|kernel - ref| / max|ref| (per tensor). Tolerances:
  fp16 2.5e-3, bf16 2e-2 -- the output rounding (2^-11 / 2^-8 relative) plus, on the tensor-core
  paths (GEMM, dx), W_hat rounded to x's dtype before the product (the GEMV keeps it exact).
  Worst seen under the interpreter: fp16 7.6e-4 (dx), bf16 8.6e-3 (dx); GEMV fp16 forward 5e-6.
"""

from __future__ import annotations

import os
import sys

import torch

from kernels import lowbit, lowbit_tune
from kernels.lowbit import kernel_kind, lowbit_linear, use_triton
from kernels.lowbit_format import pack, quantize_groups
from kernels.reference import lowbit_matmul_ref

TOL = {torch.float16: 2.5e-3, torch.bfloat16: 2e-2}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-6)).item()


def check(device, bits, group, M, N, K, dtype, rank, bias, seed=0, override=None) -> list[str]:
    """One case; returns failure lines."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=gen) * 0.05
    q, scale, zero = quantize_groups(w, bits, group)
    packed, scale, zero = pack(q, bits).to(device), scale.to(device), zero.to(device)
    x = torch.randn(M, K, generator=gen).to(device, dtype)
    extra = {}
    if rank:
        extra["down"] = (torch.randn(rank, K, generator=gen) * 0.1).to(device, dtype)
        extra["up"] = (torch.randn(N, rank, generator=gen) * 0.1).to(device, dtype)
    if bias:
        extra["bias"] = torch.randn(N, generator=gen).to(device, dtype)
    dy = torch.randn(M, N, generator=gen).to(device, dtype)

    def run(fn):
        ins = {"x": x.clone().requires_grad_(), **{k: v.clone().requires_grad_() for k, v in extra.items()}}
        y = fn(ins["x"], packed, scale, zero, bits, group, **{k: v for k, v in ins.items() if k != "x"})
        grads = torch.autograd.grad(y, list(ins.values()), dy)
        return y, dict(zip(ins, grads))

    lowbit_tune.OVERRIDE.clear()
    lowbit_tune.OVERRIDE.update(override or {})
    try:
        assert use_triton(x)
        y, g = run(lowbit_linear)
    finally:
        lowbit_tune.OVERRIDE.clear()
    y_ref, g_ref = run(lambda *a, **k: lowbit_matmul_ref(*a, **k))
    stale = [str(buf.nonzero().flatten()[:4].tolist()) for buf in lowbit._COUNTERS.values() if buf.any()]
    name = (f"{device} bits={bits} g={group} M={M} N={N} K={K} {str(dtype)[6:]} rank={rank} bias={bias} "
            f"{kernel_kind(M, bits)}{' ' + str(override) if override else ''}")
    failures = [f"{name}: counters left non-zero at {stale}"] if stale else []
    tol = TOL[dtype]
    if y.dtype != dtype or y.shape != y_ref.shape:
        failures.append(f"{name}: output {y.dtype} {tuple(y.shape)}")
    elif not _rel(y, y_ref) <= tol:
        failures.append(f"{name}: forward rel err {_rel(y, y_ref):.2e}")
    for key, ref in g_ref.items():
        if g[key].dtype != ref.dtype or not _rel(g[key], ref) <= tol:
            failures.append(f"{name}: grad {key} rel err {_rel(g[key], ref):.2e} ({g[key].dtype})")
    return failures


def plan(device: str) -> list[dict]:
    """The cases as keyword arguments of check()."""
    out = []
    if device == "cpu":  # the interpreter: small shapes, every path once per bit width
        for bits, group in ((4, 64), (3, 32), (2, 128)):
            for M, K, dtype, rank, bias in [(1, 128, torch.float16, 8, True), (3, 256, torch.bfloat16, 0, False),
                                            (17, 256, torch.float16, 0, True), (70, 128, torch.bfloat16, 8, False)]:
                out.append(dict(bits=bits, group=group, M=M, N=37, K=K, dtype=dtype, rank=rank, bias=bias, seed=bits * 100 + M))
        # dequantise + matmul (M >= DEQUANT_MIN_M, 2/4-bit): K with 16-unit tiles, 8-unit tiles and K = 96
        # (1-unit tiles); 3-bit at that M stays on the fused GEMM
        for bits, group, K, dtype, rank, bias in ((2, 64, 512, torch.float16, 0, True),
                                                  (4, 32, 256, torch.float16, 8, True), (2, 32, 96, torch.bfloat16, 0, False),
                                                  (4, 32, 96, torch.bfloat16, 4, True), (3, 32, 128, torch.float16, 4, True)):
            out.append(dict(bits=bits, group=group, M=260, N=37, K=K, dtype=dtype, rank=rank, bias=bias, seed=7))
        # split-K in the GEMM path, a second GEMV tiling
        out.append(dict(bits=4, group=32, M=17, N=37, K=256, dtype=torch.float16, rank=8, bias=True, override={
            "gemm": dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=64, SPLIT_K=2, num_warps=4, num_stages=1)}))
        out.append(dict(bits=2, group=64, M=1, N=37, K=256, dtype=torch.bfloat16, rank=0, bias=True, override={
            "gemv": dict(BLOCK_N=16, BLOCK_KW=16, SPLIT_K=1, num_warps=4, num_stages=1)}))
        # the per-field GEMM (FIELDS): x gathered (1) or in field order (2); tile inside a group and
        # across groups (per-weight scales); a partial last tile (K = 384 = 3 tiles of 128)
        # (MMA=2, mma.sync on a GPU, runs the same code here: the launcher's environment switch)
        for bits, group, dtype, fields, mma in ((4, 128, torch.float16, 1, 3), (3, 64, torch.bfloat16, 2, 3),
                                                (2, 128, torch.bfloat16, 1, 2), (2, 32, torch.float16, 2, 3)):
            # rank 40 at 4 bits: a rank that is no power of two (the t-programs pad it to 64)
            out.append(dict(bits=bits, group=group, M=17, N=37, K=384, dtype=dtype, rank=40 if bits == 4 else 8, bias=True,
                            override={"gemm": dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=128, SPLIT_K=2, num_warps=4,
                                                   num_stages=1, FIELDS=fields, MMA=mma)}))
        # HALF2 (two fields per op, fp16): 4-bit gathered x, 2-bit in field order, split-K, a partial last
        # tile; bf16 with HALF2 set takes the fp32 route
        for bits, dtype, variant in ((4, torch.float16, dict(FIELDS=1)), (2, torch.float16, dict(FIELDS=2)),
                                     (2, torch.bfloat16, dict(FIELDS=2)), (4, torch.float16, dict(NT=1)),
                                     (2, torch.float16, dict(NT=1))):
            out.append(dict(bits=bits, group=128, M=17, N=37, K=384, dtype=dtype, rank=8 if bits == 4 else 0, bias=True,
                            override={"gemm": dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=128, SPLIT_K=2, num_warps=4,
                                                   num_stages=1, HALF2=1, **variant)}))
        # FIELDS=3 (32-bit words, one MMA per field and group): 2 groups per 256-wide 2-bit tile, 4 per 4-bit
        # tile at g32, and 3-bit (correct, though triton stages its tile)
        for bits, group, bk, dtype, rank in ((2, 128, 256, torch.bfloat16, 8), (4, 32, 128, torch.float16, 0),
                                             (3, 64, 256, torch.float16, 8)):
            out.append(dict(bits=bits, group=group, M=17, N=37, K=3 * bk, dtype=dtype, rank=rank, bias=rank == 0,
                            override={"gemm": dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=bk, SPLIT_K=2, num_warps=4,
                                                   num_stages=1, FIELDS=3)}))
        # the un-swapped GEMM (NT, k-major dequantised tile): every width, split-K, a partial last tile
        for bits, group, dtype, rank, M in ((4, 64, torch.float16, 8, 17), (3, 32, torch.bfloat16, 0, 70),
                                            (2, 128, torch.bfloat16, 40, 33)):
            out.append(dict(bits=bits, group=group, M=M, N=37, K=384, dtype=dtype, rank=rank, bias=bits != 3,
                            override={"gemm": dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=128, SPLIT_K=2, num_warps=4,
                                                   num_stages=1, NT=1)}))
        for bits in (4, 3):  # the GEMV without its hand prefetch, several tiles per program
            out.append(dict(bits=bits, group=32, M=2, N=37, K=256, dtype=torch.float16, rank=8, bias=True, override={
                "gemv": dict(BLOCK_N=8, BLOCK_KW=8, SPLIT_K=2, num_warps=4, num_stages=1, PREFETCH=False)}))
        return out
    for bits, group in ((4, 128), (3, 64), (2, 32)):
        for M in (1, 3, 17, 70):
            for dtype in (torch.float16, torch.bfloat16):
                rank, bias = (64, M % 2 == 1) if dtype == torch.float16 else (0, M % 2 == 0)
                out.append(dict(bits=bits, group=group, M=M, N=1037, K=2048, dtype=dtype, rank=rank, bias=bias,
                                seed=bits * 100 + M))
    for bits, group in ((4, 128), (2, 64), (3, 128)):  # dequantise + cuBLAS (3-bit: the fused GEMM) at large M
        for dtype in (torch.float16, torch.bfloat16):
            out.append(dict(bits=bits, group=group, M=300, N=1037, K=2048, dtype=dtype, rank=16 if bits == 4 else 0,
                            bias=dtype == torch.float16, seed=bits))
    for override, M in [({"gemv": dict(BLOCK_N=16, BLOCK_KW=256, SPLIT_K=4, num_warps=4, num_stages=1)}, 1),
                        ({"gemv": dict(BLOCK_N=8, BLOCK_KW=128, SPLIT_K=2, num_warps=1, num_stages=1, PREFETCH=False)}, 1),
                        ({"gemv": dict(BLOCK_N=4, BLOCK_KW=128, SPLIT_K=2, num_warps=4, num_stages=1)}, 3),
                        ({"gemm": dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, SPLIT_K=2, num_warps=8, num_stages=3)}, 70),
                        ({"gemm": dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, SPLIT_K=4, num_warps=4, num_stages=3)}, 17)]:
        out.append(dict(bits=4, group=128, M=M, N=1037, K=4096, dtype=torch.float16, rank=64, bias=True, override=override))
        out.append(dict(bits=2, group=64, M=M, N=1037, K=4096, dtype=torch.bfloat16, rank=16, bias=False, override=override))
    # the per-field GEMM: mma.sync (16 x 16, 2 warps) and wgmma (64-row, 4 warps) tiles, both x orders, every width
    for override, M in [({"gemm": dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=128, SPLIT_K=4, num_warps=2, num_stages=3, FIELDS=1)}, 17),
                        ({"gemm": dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, SPLIT_K=8, num_warps=4, num_stages=3, FIELDS=2)}, 17),
                        ({"gemm": dict(BLOCK_M=32, BLOCK_N=128, BLOCK_K=128, SPLIT_K=2, num_warps=8, num_stages=3, FIELDS=1)}, 70),
                        # mma.sync at 4 and 8 warps (MMA=2: wgmma disabled while compiling)
                        ({"gemm": dict(BLOCK_M=16, BLOCK_N=128, BLOCK_K=128, SPLIT_K=4, num_warps=8, num_stages=3, FIELDS=2,
                                       MMA=2)}, 17),
                        ({"gemm": dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=128, SPLIT_K=2, num_warps=4, num_stages=3, FIELDS=1,
                                       MMA=2)}, 30)]:
        for bits, group, dtype, rank in ((4, 128, torch.float16, 64), (3, 128, torch.bfloat16, 0), (2, 128, torch.bfloat16, 16)):
            out.append(dict(bits=bits, group=group, M=M, N=1037, K=4096 + 384, dtype=dtype, rank=rank, bias=bits == 4,
                            override=override))
    # the un-swapped GEMM (NT): wgmma 64-row tiles with split-K, mma.sync 32-row tiles, every width
    for override, M in [({"gemm": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, SPLIT_K=4, num_warps=4, num_stages=3, NT=1)}, 70),
                        ({"gemm": dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=256, SPLIT_K=2, num_warps=8, num_stages=3, NT=1)}, 64),
                        ({"gemm": dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=128, SPLIT_K=8, num_warps=4, num_stages=3, NT=1)}, 30)]:
        for bits, group, dtype, rank in ((4, 128, torch.float16, 64), (3, 64, torch.bfloat16, 0), (2, 128, torch.bfloat16, 16)):
            out.append(dict(bits=bits, group=group, M=M, N=1037, K=4096 + 384, dtype=dtype, rank=rank, bias=bits == 4,
                            override=override))
    # HALF2 (fp16): wgmma and mma.sync, both x orders, 2- and 4-bit
    for variant, mma, M in ((dict(FIELDS=1), 3, 17), (dict(FIELDS=2), 2, 30), (dict(FIELDS=1), 2, 70),
                            (dict(NT=1), 3, 70), (dict(NT=1), 2, 33)):
        for bits, rank in ((4, 64), (2, 16)):
            out.append(dict(bits=bits, group=128, M=M, N=1037, K=4096 + 384, dtype=torch.float16, rank=rank, bias=bits == 4,
                            override={"gemm": dict(BLOCK_M=16 if M < 20 else 32, BLOCK_N=128, BLOCK_K=128, SPLIT_K=4,
                                                   num_warps=4, num_stages=3, MMA=mma, HALF2=1, **variant)}))
    for bits, group, bk, dtype, rank, M in ((2, 128, 256, torch.float16, 64, 17), (4, 64, 128, torch.bfloat16, 16, 17),
                                            (3, 128, 256, torch.bfloat16, 0, 30), (2, 32, 256, torch.bfloat16, 0, 30)):
        out.append(dict(bits=bits, group=group, M=M, N=1037, K=4096 + 384, dtype=dtype, rank=rank, bias=bits == 2,
                        override={"gemm": dict(BLOCK_M=16 if M < 20 else 32, BLOCK_N=128, BLOCK_K=bk, SPLIT_K=4,
                                               num_warps=4, num_stages=3, FIELDS=3, MMA=2 if bits == 4 else 3)}))
    return out


def cases(device: str, shard: int = 0, shards: int = 1) -> list[str]:
    if device != "cpu":
        os.environ.setdefault("SLIMFORGE_LOWBIT_TUNE", "0")  # heuristic configs: no tuning in tests
    failures = []
    for kwargs in plan(device)[shard::shards]:
        failures += check(device, **kwargs)
    return failures


if __name__ == "__main__":  # python -m tests.lowbit_cases cpu|cuda [i/n: shard i of n]
    shard, shards = map(int, sys.argv[2].split("/")) if len(sys.argv) > 2 else (0, 1)
    found = cases(sys.argv[1], shard, shards)
    print("\n".join(found) if found else "all low-bit cases match the reference")
    sys.exit(1 if found else 0)
