"""Candidate launch configs per low-bit kernel kind, most promising first: what the tuner
(kernels/lowbit_tune.py) times for a shape missing from the tables. Each list says which
measurement put its tiles there.

    from kernels.lowbit_candidates import CANDIDATES
    CANDIDATES["gemm"](16, 4096, 4096, 4, 132)   # M, N, K, bits, SMs
"""

from __future__ import annotations

import math


def pow2(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


def _gemv_candidates(M, N, K, bits, sms, group=128):
    """All threads of a program lie along K (BLOCK_KW = 32 * LO * warps: one unit of LO words
    per thread and row): a narrower tile puts warps along N and costs a shared-memory layout
    conversion per tile. Fewer warps = more iterations per program. Each launch shape comes with
    and without the hand prefetch (PREFETCH): without, the program holds half the words and more
    warps fit on an SM; on an H200 that won at M=1 on 14336x4096 W4 by 24%
    (benchmarks/2026-11-30-h200-lowbit-gemv-grid.json)."""
    lo = 2 if bits == 3 else bits
    kw = K * lo // 32
    out = []
    for warps in (1, 2, 4, 8):
        bkw = 32 * lo * warps
        if bkw > max(32 * lo, kw):
            continue
        for bn in (4, 8, 16):
            for split in (1, 2, 4, 8):
                iters = kw / split / bkw
                progs = M * math.ceil(N / bn) * split
                if (split == 1 or iters >= 1) and sms <= progs <= 32 * sms:
                    out.append(dict(BLOCK_N=bn, BLOCK_KW=bkw, SPLIT_K=split, num_warps=warps, num_stages=1))
    # most promising first: ~4 programs per SM with at least 2 tiles each, little split
    def rank(c):
        progs = M * math.ceil(N / c["BLOCK_N"]) * c["SPLIT_K"]
        iters = kw / c["SPLIT_K"] / c["BLOCK_KW"]
        return abs(math.log2(progs * c["num_warps"] / (16 * sms))) + (iters < 2) + 0.25 * math.log2(c["SPLIT_K"])
    out.sort(key=rank)
    out = [dict(c, PREFETCH=p) for c in out[:12] for p in (True, False)]
    return out or [dict(BLOCK_N=4, BLOCK_KW=32 * lo, SPLIT_K=1, num_warps=1, num_stages=1, PREFETCH=True)]


def _gemm_candidates(M, N, K, bits, sms, group=128):
    """The dequantisation, not the MMA, bounds this kernel at M <= 64, so it wants many small
    programs in flight: on an H200 the best tiles at M = 8..16 were 16 x 16 (M x N) with 2 warps
    and split-K 2..16, 20-25% faster than the 16 x 128 / 4-warp tiles this list used to end at
    (benchmarks/2026-11-30-h200-lowbit-small-m-grid.json).

    Up to M = 32, 2- and 4-bit: also the per-field GEMM (FIELDS, one scale per row and MMA), whose
    packed tile crosses shared memory once; its best tiles are 64-128 rows of W and 4-8 warps
    (wgmma), split-K 1-8: on an H200 W4 M=16 0.96-1.06x cuBLAS where the plain GEMM gave 0.62-0.79x
    (benchmarks/2026-11-30-h200-lowbit-fields.json). 3-bit is left out: its high-bit plane keeps
    triton from loading into the MMA layout, and it measured no faster."""
    vpw = 16 if bits in (2, 3) else 8
    out = []
    for bm in (16, 32, 64, 128):
        if bm > max(16, pow2(M)):
            continue
        for bn in (16, 32, 64, 128):
            for bk in (64, 128, 256):
                if bk // vpw < 4:  # at least one 16-byte vector of words per row
                    continue
                for split in (1, 2, 4, 8, 16):
                    tiles = math.ceil(N / bn) * math.ceil(M / bm)
                    if split > 1 and (tiles * split > 16 * sms or K / split < 2 * bk):
                        continue
                    for warps in (2, 4, 8):
                        if (warps == 8 and bn * bm < 64 * 64) or (warps == 2 and bn * bm > 64 * 16):
                            continue
                        out.append(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split, num_warps=warps, num_stages=3))
    big = max(16, min(128, pow2(M)))
    per_sm = 8 if M <= 16 else 2  # programs per SM to aim for

    def rank(c):
        progs = math.ceil(N / c["BLOCK_N"]) * math.ceil(M / c["BLOCK_M"]) * c["SPLIT_K"]
        return (round(abs(math.log2(progs / (per_sm * sms)))), c["BLOCK_M"] != big, c["num_warps"] != (2 if M <= 16 else 4),
                -c["BLOCK_K"])
    out.sort(key=rank)
    return out[:14] + _fields_candidates(M, N, K, bits, sms, group) + _nt_candidates(M, N, K, bits, sms, group)


def _nt_candidates(M, N, K, bits, sms, group):
    """From M = 17: the un-swapped GEMM (NT: x the MMA's A operand, the k-major dequantised tile B,
    both in shared memory, so wgmma need not wait on a register operand). On an H200 at M = 64 its
    best tiles were 64 x 64-128 (M x N), BLOCK_K 128, split-K 1-4, ~2 programs per SM: W4 0.72-0.79x
    cuBLAS where the swapped GEMM gave 0.46-0.56x; at M = 128 it tied dequantise + cuBLAS (0.48-0.55x
    vs 0.48-0.63x), at 256 and 1024 it loses (0.3-0.5x): benchmarks/2026-12-01-h200-lowbit-nt-gemm.json.
    With half2 dequantisation (fp16, BLOCK_K <= group) it wins at M = 128 on an H200, where the GEMM
    kind now runs up to 128 (kernels.lowbit_dispatch.DEQUANT_MIN_M_BY_GPU; benchmarks/2026-12-01-h200-lowbit-half2.json)."""
    if pow2(M) < 32:
        return []
    out = []
    for bm in sorted({min(64, pow2(M)), min(128, pow2(M))}):
        for bn in (32, 64, 128):
            for bk in (128, 256):
                for split in (1, 2, 4, 8):
                    if sms // 2 <= math.ceil(N / bn) * math.ceil(M / bm) * split <= 4 * sms and K / split >= 2 * bk:
                        out += [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split, num_warps=warps, num_stages=3, NT=1)
                                for warps in (4, 8)]
    progs = lambda c: math.ceil(N / c["BLOCK_N"]) * math.ceil(M / c["BLOCK_M"]) * c["SPLIT_K"]
    # tiles inside one group first: only they take the half2 dequantisation (kernels/lowbit.py _plan)
    out.sort(key=lambda c: (c["BLOCK_K"] > group, abs(math.log2(progs(c) / (2 * sms))), c["BLOCK_K"],
                            c["BLOCK_M"] != min(64, pow2(M))))
    # 2 stages: -5-7% on two 8B shapes, W4 M=64; 4-5 stages (half2): the best tile of a wider grid at M=64 on
    # an H200 1-4% faster than the shipped pick on the 8B shapes, 6-10% on 1024 x 4096
    # (benchmarks/2026-12-01-h200-lowbit-nt-stages.json)
    return out[:16] + [dict(c, num_stages=s) for s in (2, 4, 5) for c in out[:8]]


def _fields_candidates(M, N, K, bits, sms, group):
    """FIELDS 1 and 2 (units of 8 fields, one group per 128-wide tile) need group 128; FIELDS 3
    (32-bit words, one MMA per field and group) takes 4-bit at groups 32 and 64, where on an H200 it
    beat every plain candidate (W4 g64 M=16 0.67-0.80x cuBLAS). At 2 bits it never won at g128
    and was not timed at smaller groups, so it is left out there (it runs when a config names it).
    benchmarks/2026-11-30-h200-lowbit-fields3.json.

    Each comes with wgmma (MMA 3) and with mma.sync (MMA 2, kernels/lowbit_launch.py _mma_version): at
    M=16 on an H200 the best mma.sync tile beat the best wgmma one by 3-20% at W2 and -2% to +7% at W4
    (benchmarks/2026-11-30-h200-lowbit-mma-v2.json)."""
    if bits == 3 or pow2(M) > 32:
        return []
    variants = [(3, 128)] if bits == 4 and group < 128 else []
    if group == 128:
        variants += [(1, 128)] + ([(2, 128)] if bits == 2 else [])  # 2-bit half-words: x gathered, or reordered
    out = []
    for fields, bk in variants:
        for bm in sorted({16, max(16, pow2(M))}):
            for bn, warps in ((64, 4), (128, 4), (128, 8)):
                for split in (1, 2, 4, 8):
                    if math.ceil(N / bn) * math.ceil(M / bm) * split > 16 * sms or K / split < 2 * bk:
                        continue
                    for mma in (3, 2):
                        out.append(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split, num_warps=warps, num_stages=3,
                                        FIELDS=fields, MMA=mma))
    return out


def _dx_candidates(M, N, K, bits, sms, group=128):
    out = []
    for bm in (128, 64, 32):
        if bm > max(32, pow2(M)):
            continue
        for bk in (64, 128):
            for bn in (32, 64):
                out.append(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=4 if bm * bk <= 64 * 64 else 8, num_stages=3))
    return out[:8]


CANDIDATES = {"gemv": _gemv_candidates, "gemm": _gemm_candidates, "dx": _dx_candidates}
