"""Low-bit matmul: y = x @ W_hat^T (+ (x @ down^T) @ up^T) (+ bias) straight from the packed 2/3/4-bit
weight (kernels/lowbit_format.py), and the input gradient dx = dy @ W_hat (+ (dy @ up) @ down), for
the quantize, lora and package stages. W_hat is never materialised on the GPU.

    from kernels.lowbit import lowbit_linear
    y = lowbit_linear(x, packed, scale, zero, bits=4, group=128)   # the layer: kernels/quant_linear.py
    python -m kernels.bench_lowbit --out bench.json     # ratios vs cuBLAS fp16 on this GPU

Kernels (x: (M, K) rows of activations, W: (N, K) as nn.Linear stores it):
- GEMV, M <= GEMV_MAX_M (decode; memory-bound, the main target). A program owns BLOCK_N output
  rows of one x row and a K-slice (split-K), walked in tiles whose loads are issued one tile ahead
  (software prefetch). All threads lie along K, each holding one 32-weight unit (the packing's U
  words) of every row, so each activation load (a U-wide vector, thanks to the interleaved
  packing) serves BLOCK_N rows. Dequantisation is 2 ops per weight: the field is masked in place
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
- dx: tiles of dy @ W_hat computed transposed (dx^T = W_hat^T dy^T), same dequantisation,
  reducing over N; the low-rank term is one extra tl.dot in the epilogue.
Split-K partials (fp32) go to a workspace; the last program of a tile to arrive (atomic counter)
sums them in a fixed order, so results are deterministic, and resets its counter: one launch, no
memset. The fused low-rank term x @ down^T is computed inside the same launch by the first
programs of the grid ("t-programs", each a K-slice of a few rows of `down`, fp32 partials); the
programs that write output wait for them (a spin on a counter, only in their epilogue:
t-programs have the lowest ids, so they are scheduled first and never wait) and add t @ up^T to
their tile. Counters live in a small int32 buffer per (device, stream), spread over 32 addresses
(one hot address serialised ~3600 atomics: +10 us at N=14336), and every launch leaves them
zeroed, so CUDA-graph replays work.

Configs: kernels/lowbit_tune.py (a shipped per-GPU table, a per-user cache, tuning on first use).

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

from kernels.dispatch import use_triton
from kernels.lowbit_format import check_format, packed_words
from kernels.lowbit_tune import config_for, pow2
from kernels.reference import lowbit_matmul_ref

try:
    import triton
    import triton.language as tl
except ImportError:  # a machine without triton still gets the reference
    triton = None

# GEMV (grid over rows of x) up to here: H100, 4096x4096, GEMV vs GEMM: W4 M=2 15.6 vs 27.9 us,
# M=4 20.7 vs 30.4 us; W2 M=4 20.0 vs 22.2 us. Each extra row costs ~2.5 us more.
GEMV_MAX_M = 4
T_ROWS, T_K = 4, 2048  # GEMV-mode t-program, 4 warps: 4 rows of `down` x 2048 columns (16 KB, one pass)
T_K_GEMM = 1024  # GEMM-mode t-program: K-slice per program


if triton is not None:
    _T_ROWS, _T_K, _T_K_GEMM = tl.constexpr(T_ROWS), tl.constexpr(T_K), tl.constexpr(T_K_GEMM)
    _SLOTS = tl.constexpr(32)  # counter slots, see _epilogue

    @triton.jit
    def _mma(a, b, acc, UPCAST: tl.constexpr):
        """tl.dot; UPCAST (bf16 under the interpreter, which multiplies bf16 tiles as raw integers)
        hands it fp32 operands instead."""
        if UPCAST:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        return tl.dot(a, b, acc)

    @triton.jit
    def _field(w, i: tl.constexpr, WIDTH: tl.constexpr):
        """Field i of each word, masked in place at bit POS = i*WIDTH mod 16 (so below bit 23) and
        read as an fp32 bit pattern: a denormal, exactly q * 2**(POS - 149). One logic op per
        weight, no int->float convert (I2F runs at 1/8 of the FMA rate on H100) and no offset to
        subtract: FMA takes denormals at full speed and the PTX triton emits does not flush them."""
        POS: tl.constexpr = (i * WIDTH) % 16
        return ((w >> (i * WIDTH - POS)) & (((1 << WIDTH) - 1) << POS)).to(tl.float32, bitcast=True)

    @triton.jit
    def _gemv_tile(P, P16, S, Z, n, kw0, N, K, stride_p, BITS: tl.constexpr, GROUP: tl.constexpr,
                   BLOCK_KW: tl.constexpr):
        """Loads of one GEMV tile: words [n, kw0 + (0..BLOCK_KW)], 3-bit high half-words, scale
        and zero per unit. Masks are per unit of LO words, so triton can prove them constant over
        each LO-word vector."""
        LO: tl.constexpr = 2 if BITS == 3 else BITS
        KW = K // (32 // LO)
        kw = kw0 + tl.arange(0, BLOCK_KW)
        # same values as kw, but visibly contiguous only in runs of LO (one unit): the word loads
        # then take the register layout of the activation loads (LO-wide vectors) instead of
        # 16-byte vectors that would need a shared-memory shuffle per field (2- and 3-bit)
        kwu = tl.max_contiguous(tl.multiple_of(kw // LO * LO + kw % LO, LO), LO)
        wmask = (n < N)[:, None] & (kw // LO < KW // LO)[None, :]
        w = tl.load(P + n[:, None] * stride_p + kwu[None, :], mask=wmask, other=0)
        h = w
        if BITS == 3:  # high plane as int16: bit i of half-word kw is the high bit of field i of w
            h = tl.load(P16 + n[:, None] * (2 * stride_p) + 2 * KW + kwu[None, :], mask=wmask, other=0).to(tl.int32)
        # unit index derived from kw through the reshape the math uses: the scale/zero loads then
        # get that layout (triton 3.6 otherwise picks another and shuffles through shared memory)
        unit = tl.max(tl.reshape(kw // LO, (1, BLOCK_KW // LO, LO)), axis=2)
        umask = (n < N)[:, None] & (unit < KW // LO)
        grp = n[:, None] * (K // GROUP) + unit * 32 // GROUP
        s = tl.load(S + grp, mask=umask, other=0.0)
        z = tl.load(Z + grp, mask=umask, other=0.0)
        return w, h, s, z

    @triton.jit
    def _dequant(P, P16, S, Z, n, kw0, N, K, stride_p, BITS: tl.constexpr, GROUP: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr, dtype: tl.constexpr):
        """W_hat[n, 32*kw0/U + (0 .. 32*BLOCK_KW/U)] in natural k order, `dtype`, zero outside."""
        LO: tl.constexpr = 2 if BITS == 3 else BITS  # width of the (first) plane's fields
        VPW: tl.constexpr = 32 // LO  # fields per word
        U: tl.constexpr = LO  # words per unit of 32 weights
        KW = K // VPW
        kw = kw0 + tl.arange(0, BLOCK_KW)
        mask = (n < N)[:, None] & (kw < KW)[None, :]
        row = P + n[:, None] * stride_p
        w = tl.reshape(tl.load(row + kw[None, :], mask=mask, other=0), (BLOCK_N, BLOCK_KW // U, 1, U))
        grp = n[:, None] * (K // GROUP) + (kw // U * 32 // GROUP)[None, :]
        s = tl.reshape(tl.load(S + grp, mask=mask, other=0.0).to(tl.float32), (BLOCK_N, BLOCK_KW // U, 1, U))
        z = tl.reshape(tl.load(Z + grp, mask=mask, other=0.0).to(tl.float32), (BLOCK_N, BLOCK_KW // U, 1, U))
        field = tl.arange(0, VPW)[None, None, :, None]
        q = (w >> (field * LO)) & ((1 << LO) - 1)  # [n, unit, i, j] = weight 32*unit + U*i + j
        if BITS == 3:
            h = tl.load(P16 + n[:, None] * (2 * stride_p) + 2 * KW + kw[None, :], mask=mask, other=0).to(tl.int32)
            q = q | (((tl.reshape(h, (BLOCK_N, BLOCK_KW // U, 1, U)) >> field) & 1) << 2)
        v = (q | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + z)
        return tl.reshape((v * s).to(dtype), (BLOCK_N, BLOCK_KW * VPW))

    @triton.jit
    def _t_gemv(pid, X, D, T, CNT, M, K, R, stride_xm, BLOCK_M: tl.constexpr, WARPS: tl.constexpr):
        """t-program (GEMV mode): T[slice, m, r] = x[m, slice] . down[r, slice] for T_ROWS rows r,
        a slice of T_K / 4 * WARPS / BLOCK_M columns (64 products per thread)."""
        TK: tl.constexpr = _T_K // 4 * WARPS // BLOCK_M
        n_rb = tl.cdiv(R, _T_ROWS)
        ks = pid // n_rb
        m = tl.arange(0, BLOCK_M)
        r = (pid % n_rb) * _T_ROWS + tl.arange(0, _T_ROWS)
        k = ks * TK + tl.arange(0, TK)
        x = tl.load(X + m[:, None, None] * stride_xm + k[None, None, :],
                    mask=(m < M)[:, None, None] & (k < K)[None, None, :], other=0.0).to(tl.float32)
        d = tl.load(D + r[None, :, None] * K + k[None, None, :],
                    mask=(r < R)[None, :, None] & (k < K)[None, None, :], other=0.0).to(tl.float32)
        tl.store(T + (ks * M + m[:, None]) * R + r[None, :], tl.sum(x * d, axis=2),
                 mask=(m < M)[:, None] & (r < R)[None, :])
        tl.debug_barrier()  # every thread's store before the release below
        tl.atomic_add(CNT + tl.arange(0, _SLOTS), 1, sem="release")  # one per slot: see _epilogue

    @triton.jit
    def _t_gemm(pid, X, D, T, CNT, M, K, R, stride_xm, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
                UPCAST: tl.constexpr):
        """t-program (GEMM mode): T[slice, m-tile, :] = x[m-tile, slice] @ down[:, slice]^T."""
        n_mt = tl.cdiv(M, BLOCK_M)
        ks = pid // n_mt
        m = (pid % n_mt) * BLOCK_M + tl.arange(0, BLOCK_M)
        r = tl.arange(0, BLOCK_R)
        acc = tl.zeros((BLOCK_M, BLOCK_R), tl.float32)
        for k0 in range(ks * _T_K_GEMM, tl.minimum(ks * _T_K_GEMM + _T_K_GEMM, K), 64):
            k = k0 + tl.arange(0, 64)
            x = tl.load(X + m[:, None] * stride_xm + k[None, :], mask=(m < M)[:, None] & (k < K)[None, :], other=0.0)
            d = tl.load(D + r[None, :] * K + k[:, None], mask=(r < R)[None, :] & (k < K)[:, None], other=0.0)
            acc = _mma(x, d, acc, UPCAST)
        tl.store(T + (ks * M + m[:, None]) * R + r[None, :], acc, mask=(m < M)[:, None] & (r < R)[None, :])
        tl.debug_barrier()
        tl.atomic_add(CNT + tl.arange(0, _SLOTS), 1, sem="release")

    @triton.jit
    def _epilogue(y, m, n, tile, Y, B, U, T, CNT, M, N, R, TS, stride_ym, n_tprog, n_cons,
                  HAS_BIAS: tl.constexpr, HAS_LR: tl.constexpr, BLOCK_R: tl.constexpr, LR_DOT: tl.constexpr,
                  UPCAST: tl.constexpr):
        """y[m, n] (fp32) += t @ up^T (+ bias); store in Y's dtype.

        Counters (CNT[0:32] ready, CNT[32:64] done, CNT[64] slots done) are spread over 32
        addresses: thousands of output tiles hitting one address serialise in L2 (measured +10 us
        at N=14336). Tile c uses slot c % S; every t-program releases all 32 ready slots."""
        if HAS_LR:
            n_slots = tl.minimum(n_cons, _SLOTS)
            slot = tile % n_slots
            ready = tl.atomic_add(CNT + slot, 0, sem="acquire")
            while ready < n_tprog:  # t-programs run first (lowest ids): in practice no wait
                ready = tl.atomic_add(CNT + slot, 0, sem="acquire")
            r = tl.arange(0, BLOCK_R)
            tmask = (m < M)[:, None] & (r < R)[None, :]
            t = tl.zeros((y.shape[0], BLOCK_R), tl.float32)
            for s in range(TS):  # K-slice partials, in order
                t += tl.load(T + (s * M + m[:, None]) * R + r[None, :], mask=tmask, other=0.0, cache_modifier=".cg")
            up = tl.load(U + n[:, None] * R + r[None, :], mask=(n < N)[:, None] & (r < R)[None, :], other=0.0)
            if LR_DOT:  # t as a hi + lo pair in up's dtype: two tensor-core products, ~fp32 accuracy
                hi = t.to(up.dtype)
                lo = (t - hi.to(tl.float32)).to(up.dtype)
                y = _mma(lo, tl.trans(up), _mma(hi, tl.trans(up), y, UPCAST), UPCAST)
            else:
                y += tl.sum(t[:, None, :] * up.to(tl.float32)[None, :, :], axis=2)
            # the last reader leaves the counters zeroed for the next launch (stream order)
            if tl.atomic_add(CNT + _SLOTS + slot, 1) == (n_cons - slot + n_slots - 1) // n_slots - 1:
                if tl.atomic_add(CNT + 2 * _SLOTS, 1) == n_slots - 1:
                    zero = tl.arange(0, 2 * _SLOTS)
                    tl.store(CNT + zero, zero * 0)
                    tl.store(CNT + 2 * _SLOTS, 0)
        if HAS_BIAS:
            y += tl.load(B + n, mask=n < N, other=0.0).to(tl.float32)[None, :]
        tl.store(Y + m[:, None] * stride_ym + n[None, :], y.to(Y.dtype.element_ty),
                 mask=(m < M)[:, None] & (n < N)[None, :])

    @triton.jit
    def _finish(y, m, n, tile, pid_k, Y, B, U, T, WS, CNT, M, N, R, TS, stride_ym, n_tprog, n_cons,
                HAS_BIAS: tl.constexpr, HAS_LR: tl.constexpr, SPLIT_K: tl.constexpr,
                BLOCK_R: tl.constexpr, LR_DOT: tl.constexpr, UPCAST: tl.constexpr):
        """Split-K fix-up, then the epilogue, for one [BLOCK_M, BLOCK_N] output tile."""
        if SPLIT_K == 1:
            _epilogue(y, m, n, tile, Y, B, U, T, CNT, M, N, R, TS, stride_ym, n_tprog, n_cons,
                      HAS_BIAS, HAS_LR, BLOCK_R, LR_DOT, UPCAST)
        else:
            mask = (m < M)[:, None] & (n < N)[None, :]
            tl.store(WS + (pid_k * M + m[:, None]) * N + n[None, :], y, mask=mask)
            tl.debug_barrier()  # every thread's partial before the release below
            arrived = tl.atomic_add(CNT + 2 * _SLOTS + 1 + tile, 1)
            if arrived == SPLIT_K - 1:  # last slice in: sum all slices in a fixed order
                total = tl.zeros_like(y)
                for s in tl.static_range(SPLIT_K):
                    total += tl.load(WS + (s * M + m[:, None]) * N + n[None, :], mask=mask, other=0.0,
                                 cache_modifier=".cg")
                tl.atomic_xchg(CNT + 2 * _SLOTS + 1 + tile, 0)
                _epilogue(total, m, n, tile, Y, B, U, T, CNT, M, N, R, TS, stride_ym, n_tprog, n_cons,
                          HAS_BIAS, HAS_LR, BLOCK_R, LR_DOT, UPCAST)

    @triton.jit
    def _gemv_kernel(X, P, P16, S, Z, B, D, U, T, Y, WS, CNT, M, N, K, R, TS, stride_xm, stride_ym, stride_p, n_tprog,
                     BITS: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LR: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr,
                     SPLIT_K: tl.constexpr, BLOCK_R: tl.constexpr, UPCAST: tl.constexpr, T_WARPS: tl.constexpr):
        pid = tl.program_id(0)
        if pid < n_tprog:
            if HAS_LR:
                _t_gemv(pid, X, D, T, CNT, M, K, R, stride_xm, BLOCK_M, T_WARPS)
        else:
            pid = pid - n_tprog
            LO: tl.constexpr = 2 if BITS == 3 else BITS
            VPW: tl.constexpr = 32 // LO
            KW = K // VPW
            tile = pid // SPLIT_K  # (row of x, BLOCK_N rows of W)
            pid_k = pid % SPLIT_K
            n = (tile // M) * BLOCK_N + tl.arange(0, BLOCK_N)
            m = tile % M
            span = tl.cdiv(tl.cdiv(KW, SPLIT_K), BLOCK_KW) * BLOCK_KW
            kw_end = tl.minimum(pid_k * span + span, KW)
            C: tl.constexpr = BLOCK_KW // LO  # units of 32 weights (one scale, zero each) per row
            acc = tl.zeros((BLOCK_N, C), tl.float32)
            # software pipelining by hand: the next tile's loads are issued before this tile's math
            wn, hn, sn, zn = _gemv_tile(P, P16, S, Z, n, pid_k * span, N, K, stride_p, BITS, GROUP, BLOCK_KW)
            for kw0 in range(pid_k * span, kw_end, BLOCK_KW):
                w, h, s, z = wn, hn, sn, zn
                # past the end the masks are all false: no memory traffic (K is a multiple of LO units)
                wn, hn, sn, zn = _gemv_tile(P, P16, S, Z, n, kw0 + BLOCK_KW, tl.where(kw0 + BLOCK_KW < kw_end, N, 0),
                                            K, stride_p, BITS, GROUP, BLOCK_KW)
                kw = kw0 + tl.arange(0, BLOCK_KW)
                xo = tl.max_contiguous(tl.multiple_of(kw // LO * 32 + kw % LO, LO), LO)  # + LO*i: see the layout
                xmask = (kw // LO < KW // LO)[None, :]
                t = tl.zeros((BLOCK_N, BLOCK_KW), tl.float32)
                xs = tl.zeros((1, BLOCK_KW), tl.float32)
                for i in tl.static_range(VPW):
                    xi = tl.load(X + m * stride_xm + xo[None, :] + i * LO, mask=xmask, other=0.0).to(tl.float32)
                    xs += xi
                    # field * x * 2**(100 - POS) = q * x * 2**-49: |x| < 2**28 cannot overflow
                    t = tl.fma(_field(w, i, LO), xi * (2.0 ** (100 - (i * LO) % 16)), t)
                    if BITS == 3:
                        t = tl.fma(_field(h, i, 1), xi * (2.0 ** (102 - i)), t)
                # per unit (one thread's LO words, one group): acc += s * (sum q x - z * sum x)
                t = tl.sum(tl.reshape(t, (BLOCK_N, C, LO)), axis=2)
                xs = tl.sum(tl.reshape(xs, (1, C, LO)), axis=2)
                acc = tl.fma(tl.fma(-z.to(tl.float32), xs, t * 562949953421312.0), s.to(tl.float32), acc)  # 2**49
            _finish(tl.sum(acc, axis=1)[None, :], m + tl.arange(0, 1), n, tile, pid_k, Y, B, U, T, WS, CNT,
                    M, N, R, TS, stride_ym, n_tprog, M * tl.cdiv(N, BLOCK_N), HAS_BIAS, HAS_LR, SPLIT_K,
                    BLOCK_R, False, UPCAST)

    @triton.jit
    def _gemm_kernel(X, P, P16, S, Z, B, D, U, T, Y, WS, CNT, M, N, K, R, TS, stride_xm, stride_ym, stride_p, n_tprog,
                     BITS: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LR: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     SPLIT_K: tl.constexpr, BLOCK_R: tl.constexpr, UPCAST: tl.constexpr):
        pid = tl.program_id(0)
        if pid < n_tprog:
            if HAS_LR:
                _t_gemm(pid, X, D, T, CNT, M, K, R, stride_xm, BLOCK_M, BLOCK_R, UPCAST)
        else:
            pid = pid - n_tprog
            VPW: tl.constexpr = 16 if BITS == 3 else 32 // BITS
            n_m = tl.cdiv(M, BLOCK_M)
            tile = pid // SPLIT_K  # m fastest: tiles sharing a weight slice run together (L2 reuse)
            pid_k = pid % SPLIT_K
            n = (tile // n_m) * BLOCK_N + tl.arange(0, BLOCK_N)
            m = (tile % n_m) * BLOCK_M + tl.arange(0, BLOCK_M)
            span = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
            acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
            for k0 in range(pid_k * span, tl.minimum(pid_k * span + span, K), BLOCK_K):
                w = _dequant(P, P16, S, Z, n, k0 // VPW, N, K, stride_p, BITS, GROUP, BLOCK_N, BLOCK_K // VPW, X.dtype.element_ty)
                k = k0 + tl.arange(0, BLOCK_K)
                xt = tl.load(X + m[None, :] * stride_xm + k[:, None], mask=(m < M)[None, :] & (k < K)[:, None], other=0.0)
                acc = _mma(w, xt, acc, UPCAST)
            _finish(tl.trans(acc), m, n, tile, pid_k, Y, B, U, T, WS, CNT, M, N, R, TS, stride_ym,
                    n_tprog, n_m * tl.cdiv(N, BLOCK_N), HAS_BIAS, HAS_LR, SPLIT_K, BLOCK_R, True, UPCAST)

    @triton.jit
    def _dx_kernel(DY, P, P16, S, Z, D, UU, DX, M, N, K, R, stride_dym, stride_dxm, stride_p,
                   BITS: tl.constexpr, GROUP: tl.constexpr, HAS_LR: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, UPCAST: tl.constexpr):
        """dx[m-tile, k-tile] = dy @ W_hat[:, k-tile] (+ u @ down[:, k-tile], u = dy @ up in fp32),
        computed transposed (dx^T = W_hat^T dy^T) so that the dequantised tile is the MMA's register
        operand, as in the forward GEMM (as a shared-memory operand Triton 3.6 fails to compile it)."""
        VPW: tl.constexpr = 16 if BITS == 3 else 32 // BITS
        pid = tl.program_id(0)
        n_m = tl.cdiv(M, BLOCK_M)
        m = (pid % n_m) * BLOCK_M + tl.arange(0, BLOCK_M)  # m fastest: W slice reused from L2
        k = (pid // n_m) * BLOCK_K + tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_K, BLOCK_M), tl.float32)
        for n0 in range(0, N, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            w = _dequant(P, P16, S, Z, n, (pid // n_m) * (BLOCK_K // VPW), N, K, stride_p, BITS, GROUP, BLOCK_N,
                         BLOCK_K // VPW, DY.dtype.element_ty)
            dyt = tl.load(DY + m[None, :] * stride_dym + n[:, None], mask=(m < M)[None, :] & (n < N)[:, None], other=0.0)
            acc = _mma(tl.trans(w), dyt, acc, UPCAST)
        if HAS_LR:
            r = tl.arange(0, BLOCK_R)
            ut = tl.load(UU + m[None, :] * R + r[:, None], mask=(m < M)[None, :] & (r < R)[:, None], other=0.0)
            dt = tl.load(D + r[None, :] * K + k[:, None], mask=(r < R)[None, :] & (k < K)[:, None], other=0.0)
            hi = ut.to(dt.dtype)
            acc = _mma(dt, hi, acc, UPCAST)
            acc = _mma(dt, (ut - hi.to(tl.float32)).to(dt.dtype), acc, UPCAST)
        tl.store(DX + m[None, :] * stride_dxm + k[:, None], acc.to(DX.dtype.element_ty),
                 mask=(m < M)[None, :] & (k < K)[:, None])


# --------------------------------------------------------------------------------------------
# configs: tables keyed by GPU name, tuning on a miss


# --------------------------------------------------------------------------------------------
# launchers

_COUNTERS: dict[tuple, torch.Tensor] = {}


def _counters(device: torch.device, size: int) -> torch.Tensor:
    """Zeroed int32 counters [32 ready, 32 done, 1 slots done, split-K tiles...] for this device
    and stream; every launch leaves them zeroed, so they are reused without a memset."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (str(device), stream)
    buf = _COUNTERS.get(key)
    if buf is None or buf.numel() < size:
        buf = _COUNTERS[key] = torch.zeros(max(size, 1024), dtype=torch.int32, device=device)
    return buf


def _upcast(x: torch.Tensor) -> bool:
    return x.dtype == torch.bfloat16 and not x.is_cuda


def kernel_kind(M: int) -> str:
    return "gemv" if M <= GEMV_MAX_M else "gemm"


def _forward(x2d, packed, scale, zero, bits, group, down, up, bias, cfg: dict | None = None,
             kind: str | None = None) -> torch.Tensor:
    """y (M, N) for x2d (M, K); `cfg` and `kind` force a config / kernel (the benchmark uses them)."""
    M, K = x2d.shape
    N = packed.shape[0]
    y = torch.empty(M, N, device=x2d.device, dtype=x2d.dtype)
    has_lr = down is not None
    R = down.shape[0] if has_lr else 0
    kind = kind or kernel_kind(M)
    x2d = x2d if x2d.stride(1) == 1 else x2d.contiguous()

    def launch(cfg):
        bm = pow2(M) if kind == "gemv" else cfg["BLOCK_M"]  # GEMV: rows of x the t-programs take
        split = cfg["SPLIT_K"]
        tiles = math.ceil(N / cfg["BLOCK_N"]) * (M if kind == "gemv" else math.ceil(M / bm))
        if has_lr:
            if kind == "gemv":
                ts = math.ceil(K / (T_K // 4 * cfg["num_warps"] // bm))
                n_tprog = math.ceil(R / T_ROWS) * ts
            else:
                ts = math.ceil(K / T_K_GEMM)
                n_tprog = math.ceil(M / bm) * ts
            t = torch.empty(ts, M, R, device=x2d.device, dtype=torch.float32)
        else:
            ts, n_tprog, t = 0, 0, y
        ws = torch.empty(split, M, N, device=x2d.device, dtype=torch.float32) if split > 1 else y
        cnt = _counters(x2d.device, 65 + tiles)
        blocks = {k: v for k, v in cfg.items() if k.startswith("BLOCK") and k != "BLOCK_M"}
        kernel, extra = (_gemv_kernel, dict(T_WARPS=cfg["num_warps"])) if kind == "gemv" else (_gemm_kernel, {})
        kernel[(n_tprog + tiles * split,)](
            x2d, packed, packed.view(torch.int16), scale, zero, bias if bias is not None else y, down if has_lr else y,
            up if has_lr else y, t, y, ws, cnt, M, N, K, R, ts, x2d.stride(0), y.stride(0), packed.stride(0), n_tprog,
            BITS=bits, GROUP=group, HAS_BIAS=bias is not None, HAS_LR=has_lr, BLOCK_M=bm, SPLIT_K=split,
            BLOCK_R=max(16, pow2(R)), UPCAST=_upcast(x2d), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
            **blocks, **extra)

    launch(cfg or config_for(kind, M, N, K, bits, group, x2d.device, launch))
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
                         BLOCK_R=max(16, pow2(R)), UPCAST=_upcast(dy2d), num_warps=cfg["num_warps"],
                         num_stages=cfg["num_stages"])

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


def lowbit_linear(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                  group: int, out_features: int | None = None, down: torch.Tensor | None = None,
                  up: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W_hat^T (+ (x @ down^T) @ up^T) (+ bias), W_hat the dequantised packed weight.

    x (..., K) fp16/bf16 (fp32 too off CUDA); packed int32 (N, K*bits/32); scale, zero fp16 (N, K/group);
    down (r, K), up (N, r): PEFT lora_A / lora_B with the LoRA scaling already folded in; bias (N,).
    Returns (..., N) in x's dtype. Differentiable in x, down, up, bias."""
    check_format(bits, group)
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (..., in_features)")
    K = x.shape[-1]
    check_format(bits, group, K)
    if K % 32:
        raise ValueError(f"in_features {K} must be a multiple of 32")
    N = packed.shape[0] if packed.dim() == 2 else -1
    if packed.dtype != torch.int32 or packed.dim() != 2 or packed.shape[1] != packed_words(bits, K):
        raise ValueError(f"packed must be int32 of shape (out_features, {packed_words(bits, K)}) for {bits}-bit "
                         f"in_features={K}, got {packed.dtype} {tuple(packed.shape)}")
    if out_features is not None and out_features != N:
        raise ValueError(f"out_features {out_features} does not match packed rows {N}")
    for name, t in (("scale", scale), ("zero", zero)):
        if t.dtype != torch.float16 or tuple(t.shape) != (N, K // group):
            raise ValueError(f"{name} must be fp16 of shape ({N}, {K // group}), got {t.dtype} {tuple(t.shape)}")
    if (down is None) != (up is None):
        raise ValueError("down and up must be given together (or neither)")
    if down is not None:
        if down.dim() != 2 or down.shape[1] != K or up.dim() != 2 or up.shape[0] != N or up.shape[1] != down.shape[0]:
            raise ValueError(f"low-rank factors must be down (r, {K}) and up ({N}, r), got "
                             f"{tuple(down.shape)} and {tuple(up.shape)}")
    if bias is not None and tuple(bias.shape) != (N,):
        raise ValueError(f"bias must have shape ({N},), got {tuple(bias.shape)}")
    others = [t for t in (packed, scale, zero, down, up, bias) if t is not None]
    if any(t.device != x.device for t in others):
        raise ValueError(f"all tensors must be on x's device {x.device}")
    if not use_triton(x):
        if not x.is_floating_point():
            raise ValueError(f"x must be a floating-point tensor, got {x.dtype}")
        return lowbit_matmul_ref(x, packed, scale, zero, bits, group, down, up, bias)
    if x.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"the low-bit kernels take fp16 or bf16 activations, got {x.dtype}")
    if down is not None:  # the kernels read the factors in x's dtype; autograd undoes the cast
        down, up = down.to(x.dtype).contiguous(), up.to(x.dtype).contiguous()
    grads = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, down, up, bias))
    if not grads:  # inference: skip autograd.Function's overhead (it matters at decode sizes)
        y = _forward(x.reshape(-1, K), packed, scale, zero, bits, group, down, up, bias)
        return y.view(*x.shape[:-1], N)
    return _LowbitLinear.apply(x, packed, scale, zero, bias, down, up, bits, group)
