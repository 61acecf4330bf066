"""The Triton kernels of the low-bit matmul: GEMV, GEMM and dx, with the fused low-rank
t-programs and the split-K epilogue. kernels/lowbit.py documents the method and launches them;
this file holds only device code and the t-program shapes it is compiled with; the tile loads and
dequantisation they share are in kernels/lowbit_tiles.py.
"""

from __future__ import annotations

try:
    import triton
    import triton.language as tl
except ImportError:  # a machine without triton still gets the reference (kernels/lowbit.py)
    triton = None

T_ROWS, T_K = 4, 2048  # GEMV-mode t-program, 4 warps: 4 rows of `down` x 2048 columns (16 KB, one pass)
T_K_GEMM = 1024  # GEMM-mode t-program: K-slice per program
N_SLOTS = 32  # low-rank counter words; split-K arrival counters follow them (see _epilogue)
READY = 1 << 16  # a t-program's increment of a counter word: readers count in the low 16 bits


if triton is not None:
    from kernels.lowbit_half2 import _dequant_kn_half2, _fields_tile_half2
    from kernels.lowbit_tiles import _dequant, _dequant_kn, _field, _fields_tile, _fields_words_tile, _gemv_tile, _mma

    _T_ROWS, _T_K, _T_K_GEMM = tl.constexpr(T_ROWS), tl.constexpr(T_K), tl.constexpr(T_K_GEMM)
    _SLOTS, _READY = tl.constexpr(N_SLOTS), tl.constexpr(READY)

    @triton.jit
    def _release_t(CNT, n_cons):
        """A t-program's partials are stored: count it in every counter word a reader will use."""
        tl.debug_barrier()  # every thread's store before the release below
        s = tl.arange(0, _SLOTS)
        tl.atomic_add(CNT + s, _READY, mask=s < tl.minimum(n_cons, _SLOTS), sem="release")

    @triton.jit
    def _t_gemv(pid, X, D, T, CNT, M, K, R, stride_xm, n_cons, BLOCK_M: tl.constexpr, WARPS: tl.constexpr):
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
        _release_t(CNT, n_cons)

    @triton.jit
    def _t_gemm(pid, X, D, T, CNT, M, K, R, stride_xm, n_cons, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
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
        _release_t(CNT, n_cons)

    @triton.jit
    def _epilogue(y, m, n, tile, Y, B, U, T, CNT, M, N, R, TS, stride_ym, n_tprog, n_cons,
                  HAS_BIAS: tl.constexpr, HAS_LR: tl.constexpr, BLOCK_R: tl.constexpr, LR_DOT: tl.constexpr,
                  UPCAST: tl.constexpr):
        """y[m, n] (fp32) += t @ up^T (+ bias); store in Y's dtype.

        Output tile c reads counter word c % S (S = min(tiles, 32): thousands of tiles on one address
        serialise in L2, measured +10 us at N=14336). A word holds READY times the t-programs done
        plus the readers that have arrived (low 16 bits). One atomic per reader tells both whether
        t is complete and whether this reader is the word's last; the last one zeroes the word for
        the next launch (stream order), which a reader still spinning takes as "complete" (only the
        last, which has seen every t-program, zeroes it). The separate done counters this replaced
        cost a second atomic whose return trip ended every program: dropping them took 1-6 points
        off the overhead on 13 of 16 points timed on an H200
        (benchmarks/2026-12-01-h200-lowbit-lr-counter-words.json)."""
        if HAS_LR:
            n_slots = tl.minimum(n_cons, _SLOTS)
            slot = tile % n_slots
            seen = tl.atomic_add(CNT + slot, 1, sem="acquire")
            word = seen + 1  # the word after this reader's increment: not 0 until the last reader zeroes it
            while (word // _READY < n_tprog) & (word != 0):  # t-programs run first (lowest ids): rarely spins
                word = tl.atomic_add(CNT + slot, 0, sem="acquire")
            if seen % _READY == (n_cons - slot + n_slots - 1) // n_slots - 1:  # a release: a spinning reader
                tl.atomic_xchg(CNT + slot, 0, sem="release")  # that sees 0 then sees what this one saw
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
            arrived = tl.atomic_add(CNT + _SLOTS + tile, 1)
            if arrived == SPLIT_K - 1:  # last slice in: sum all slices in a fixed order
                total = tl.zeros_like(y)
                for s in tl.static_range(SPLIT_K):
                    total += tl.load(WS + (s * M + m[:, None]) * N + n[None, :], mask=mask, other=0.0,
                                 cache_modifier=".cg")
                tl.atomic_xchg(CNT + _SLOTS + tile, 0)
                _epilogue(total, m, n, tile, Y, B, U, T, CNT, M, N, R, TS, stride_ym, n_tprog, n_cons,
                          HAS_BIAS, HAS_LR, BLOCK_R, LR_DOT, UPCAST)

    @triton.jit
    def _gemv_kernel(X, P, P16, S, Z, B, D, U, T, Y, WS, CNT, M, N, K, R, TS, stride_xm, stride_ym, stride_p, n_tprog,
                     BITS: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LR: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr,
                     SPLIT_K: tl.constexpr, BLOCK_R: tl.constexpr, UPCAST: tl.constexpr, T_WARPS: tl.constexpr,
                     PREFETCH: tl.constexpr):
        pid = tl.program_id(0)
        if pid < n_tprog:
            if HAS_LR:
                _t_gemv(pid, X, D, T, CNT, M, K, R, stride_xm, M * tl.cdiv(N, BLOCK_N), BLOCK_M, T_WARPS)
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
            # PREFETCH: software pipelining by hand, the next tile's loads are issued before this tile's
            # math (off: half the registers for the words, for programs of one or two tiles)
            if PREFETCH:
                wn, hn, sn, zn = _gemv_tile(P, P16, S, Z, n, pid_k * span, N, K, stride_p, BITS, GROUP, BLOCK_KW)
            for kw0 in range(pid_k * span, kw_end, BLOCK_KW):
                if PREFETCH:
                    w, h, s, z = wn, hn, sn, zn
                    # past the end the masks are all false: no memory traffic (K is a multiple of LO units)
                    wn, hn, sn, zn = _gemv_tile(P, P16, S, Z, n, kw0 + BLOCK_KW, tl.where(kw0 + BLOCK_KW < kw_end, N, 0),
                                                K, stride_p, BITS, GROUP, BLOCK_KW)
                else:
                    w, h, s, z = _gemv_tile(P, P16, S, Z, n, kw0, N, K, stride_p, BITS, GROUP, BLOCK_KW)
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
    def _gemm_kernel(X, XF, P, P16, S, Z, B, D, U, T, Y, WS, CNT, M, N, K, R, TS, stride_xm, stride_ym, stride_p, n_tprog,
                     BITS: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LR: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     SPLIT_K: tl.constexpr, BLOCK_R: tl.constexpr, UPCAST: tl.constexpr, FIELDS: tl.constexpr,
                     MMA: tl.constexpr, NT: tl.constexpr, HALF2: tl.constexpr, ASM: tl.constexpr):
        """MMA (2 or 3) is read by the launcher, not here: it compiles MMA=2 with wgmma disabled
        (kernels/lowbit_launch.py _mma_version), and as a constexpr it keeps the two binaries apart.
        NT: the product un-swapped, x tile as the MMA's A operand and the k-major dequantised
        weight tile as B, both in shared memory (kernels/lowbit.py says when that wins).
        HALF2 (with FIELDS 1 or 2 or NT, fp16): two weights dequantised per op (lowbit_half2._half2_pair),
        by inline PTX when ASM (on a GPU), else the same values in fp32 (the interpreter)."""
        pid = tl.program_id(0)
        if pid < n_tprog:
            if HAS_LR:
                _t_gemm(pid, X, D, T, CNT, M, K, R, stride_xm, tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N), BLOCK_M, BLOCK_R,
                        UPCAST)
        else:
            pid = pid - n_tprog
            VPW: tl.constexpr = 16 if BITS == 3 else 32 // BITS
            n_m = tl.cdiv(M, BLOCK_M)
            tile = pid // SPLIT_K  # m fastest: tiles sharing a weight slice run together (L2 reuse)
            pid_k = pid % SPLIT_K
            n = (tile // n_m) * BLOCK_N + tl.arange(0, BLOCK_N)
            m = (tile % n_m) * BLOCK_M + tl.arange(0, BLOCK_M)
            span = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
            acc = tl.zeros((BLOCK_M, BLOCK_N) if NT else (BLOCK_N, BLOCK_M), tl.float32)
            for k0 in range(pid_k * span, tl.minimum(pid_k * span + span, K), BLOCK_K):
                if NT:
                    k = k0 + tl.arange(0, BLOCK_K)
                    x = tl.load(X + m[:, None] * stride_xm + k[None, :], mask=(m < M)[:, None] & (k < K)[None, :],
                                other=0.0)
                    if HALF2:
                        w = _dequant_kn_half2(P, S, Z, n, k0 // VPW, N, K, stride_p, BITS, GROUP, BLOCK_N,
                                              BLOCK_K // VPW, ASM)
                    else:
                        w = _dequant_kn(P, P16, S, Z, n, k0 // VPW, N, K, stride_p, BITS, GROUP, BLOCK_N,
                                        BLOCK_K // VPW, X.dtype.element_ty)
                    acc = _mma(x, w, acc, UPCAST)
                elif FIELDS == 3:
                    acc = _fields_words_tile(X, P, P16, S, Z, m, n, k0, M, N, K, stride_xm, stride_p, acc, BITS, GROUP,
                                             BLOCK_K, UPCAST)
                elif FIELDS and HALF2:
                    acc = _fields_tile_half2(X, XF, P, S, Z, m, n, k0, M, N, K, stride_xm, stride_p, acc, BITS, GROUP,
                                             BLOCK_K, UPCAST, FIELDS, ASM)
                elif FIELDS:
                    acc = _fields_tile(X, XF, P, P16, S, Z, m, n, k0, M, N, K, stride_xm, stride_p, acc, BITS, GROUP,
                                       BLOCK_K, UPCAST, FIELDS)
                else:
                    w = _dequant(P, P16, S, Z, n, k0 // VPW, N, K, stride_p, BITS, GROUP, BLOCK_N, BLOCK_K // VPW,
                                 X.dtype.element_ty)
                    k = k0 + tl.arange(0, BLOCK_K)
                    xt = tl.load(X + m[None, :] * stride_xm + k[:, None], mask=(m < M)[None, :] & (k < K)[:, None],
                                 other=0.0)
                    acc = _mma(w, xt, acc, UPCAST)
            _finish(acc if NT else tl.trans(acc), m, n, tile, pid_k, Y, B, U, T, WS, CNT, M, N, R, TS, stride_ym,
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
