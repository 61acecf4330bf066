"""Device helpers of the low-bit matmul (kernels/lowbit_triton.py holds the kernels that call them):
load a tile of the packed weight and dequantise it -- per unit for the GEMV, to an fp16/bf16 tile for
the plain GEMM and dx ([n, k]; k-major for the un-swapped NT GEMM), one field position per MMA for the
per-field GEMM (FIELDS). kernels/lowbit.py
documents the method.
"""

from __future__ import annotations

try:
    import triton
    import triton.language as tl
except ImportError:  # a machine without triton still gets the reference (kernels/lowbit.py)
    triton = None


if triton is not None:
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
    def _dequant_kn(P, P16, S, Z, n, kw0, N, K, stride_p, BITS: tl.constexpr, GROUP: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr, dtype: tl.constexpr):
        """_dequant's tile transposed, built k-major: W_hat[n, k-tile]^T as [32*BLOCK_KW/U, BLOCK_N],
        the B operand of the un-swapped GEMM (NT). Dequantising [n, k] and transposing it instead
        fails to compile in triton 3.6 (TritonGPUOptimizeDotOperands)."""
        LO: tl.constexpr = 2 if BITS == 3 else BITS
        VPW: tl.constexpr = 32 // LO
        U: tl.constexpr = LO
        KW = K // VPW
        kw = kw0 + tl.arange(0, BLOCK_KW)
        mask = (kw < KW)[:, None] & (n < N)[None, :]
        w = tl.reshape(tl.load(P + n[None, :] * stride_p + kw[:, None], mask=mask, other=0), (BLOCK_KW // U, 1, U, BLOCK_N))
        if BLOCK_KW * VPW <= GROUP:  # the tile lies in one group (kw0 is a multiple of BLOCK_KW): a scale per row
            grp = n * (K // GROUP) + kw0 * VPW // GROUP
            s = tl.load(S + grp, mask=n < N, other=0.0).to(tl.float32)[None, None, None, :]
            z = tl.load(Z + grp, mask=n < N, other=0.0).to(tl.float32)[None, None, None, :]
        else:
            grp = n[None, :] * (K // GROUP) + (kw // U * 32 // GROUP)[:, None]
            s = tl.reshape(tl.load(S + grp, mask=mask, other=0.0).to(tl.float32), (BLOCK_KW // U, 1, U, BLOCK_N))
            z = tl.reshape(tl.load(Z + grp, mask=mask, other=0.0).to(tl.float32), (BLOCK_KW // U, 1, U, BLOCK_N))
        field = tl.arange(0, VPW)[None, :, None, None]
        q = (w >> (field * LO)) & ((1 << LO) - 1)  # [unit, i, j, n] = weight 32*unit + U*i + j of row n
        if BITS == 3:
            h = tl.load(P16 + n[None, :] * (2 * stride_p) + 2 * KW + kw[:, None], mask=mask, other=0).to(tl.int32)
            q = q | (((tl.reshape(h, (BLOCK_KW // U, 1, U, BLOCK_N)) >> field) & 1) << 2)
        v = (q | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + z)
        return tl.reshape((v * s).to(dtype), (BLOCK_KW * VPW, BLOCK_N))

    @triton.jit
    def _fields_tile(X, XF, P, P16, S, Z, m, n, k0, M, N, K, stride_xm, stride_p, acc, BITS: tl.constexpr,
                     GROUP: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr, FIELDS: tl.constexpr):
        """acc += W_hat[n, k0 .. k0+BLOCK_K] @ x[m, same]^T as one MMA per field position f of the
        packed units: 32-bit words at 4 bits, 16-bit half-words at 2 and 3 bits (low plane), 8
        fields each. Field f of the unit tile [BLOCK_N, BLOCK_K/8] is a [BLOCK_N, BLOCK_K/8] slice
        of the weights (which k: the packing, below), multiplied with the matching rows of x. Every
        op from the unit load to the MMA is elementwise with constant shifts, so triton loads the
        units (staged in shared memory by the pipeliner) straight into the MMA operand layout and
        dequantises in registers: the packed tile crosses shared memory once, where _dequant's
        reshape costs a second trip for the whole fp16 tile. BLOCK_K <= GROUP keeps one scale per
        row and tile (a per-weight scale tile is correct but triton then stages the fp16 tile).

        k of field f of unit c (lowbit_format's packing, u = c // 4 the 32-weight unit):
          4-bit word c:           32u + 4f + c % 4
          2-bit half-word c:      32u + 16 (c % 2) + 2f + (c // 2) % 2   (word c // 2, half c % 2)
          3-bit: low plane as 2-bit; high bits of half-word c are byte K/4 + c of the row, bit f.
        FIELDS=2 reads x from XF, x laid out by the launcher as (M, 8, K/8) in (field, unit) order:
        contiguous rows per field, where FIELDS=1 gathers them from x (runs of 4 at 4 bits, 1 at 2).
        kernels/lowbit_half2.py has its fp16 variant (HALF2)."""
        LO: tl.constexpr = 2 if BITS == 3 else BITS
        BLOCK_C: tl.constexpr = BLOCK_K // 8
        C = K // 8  # units per row
        c = k0 // 8 + tl.arange(0, BLOCK_C)
        cmask = (n < N)[:, None] & (c < C)[None, :]
        if LO == 4:
            w = tl.load(P + n[:, None] * stride_p + c[None, :], mask=cmask, other=0)
            kx = tl.max_contiguous(tl.multiple_of(c // 4 * 32 + c % 4, 4), 4)
        else:
            w = tl.load(P16 + n[:, None] * (2 * stride_p) + c[None, :], mask=cmask, other=0).to(tl.int32)
            kx = c // 4 * 32 + (c % 2) * 16 + (c // 2) % 2
        h = w
        if BITS == 3:
            P8 = P.to(tl.pointer_type(tl.int8))
            h = tl.load(P8 + n[:, None] * (4 * stride_p) + K // 4 + c[None, :], mask=cmask, other=0).to(tl.int32)
        if BLOCK_K <= GROUP:  # the tile lies inside one group (k0 is a multiple of BLOCK_K)
            grp = n * (K // GROUP) + k0 // GROUP
            s = tl.load(S + grp, mask=n < N, other=0.0).to(tl.float32)[:, None]
            z = tl.load(Z + grp, mask=n < N, other=0.0).to(tl.float32)[:, None]
        else:  # clamped, not masked: past K the units and x are zero, so any finite scale will do
            grp = tl.minimum(n, N - 1)[:, None] * (K // GROUP) + (tl.minimum(c, C - 1) // 4 * 32 // GROUP)[None, :]
            s = tl.load(S + grp).to(tl.float32)
            z = tl.load(Z + grp).to(tl.float32)
        xmask = (m < M)[None, :] & (c < C)[:, None]
        for f in tl.static_range(8):
            q = (w >> (f * LO)) & ((1 << LO) - 1)
            if BITS == 3:
                q = q | (((h >> f) & 1) << 2)
            v = ((q | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + z)) * s
            if FIELDS == 2:
                xt = tl.load(XF + m[None, :] * K + f * C + c[:, None], mask=xmask, other=0.0)
            else:
                xt = tl.load(X + m[None, :] * stride_xm + (kx + f * LO)[:, None], mask=xmask, other=0.0)
            acc = _mma(v.to(X.dtype.element_ty), xt, acc, UPCAST)
        return acc

    @triton.jit
    def _fields_words_tile(X, P, P16, S, Z, m, n, k0, M, N, K, stride_xm, stride_p, acc, BITS: tl.constexpr,
                           GROUP: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr):
        """_fields_tile on 32-bit words at every width (FIELDS=3): a 16-word tile, 8 fields per word
        at 4 bits, 16 at 2 and 3 bits (high bits from the int16 half-word of each low word, as in
        _dequant), so BLOCK_K = 16 * fields may span several groups (2-bit g128: two). Per group the
        A operand takes that group's scale and zero per row (constant over the tile: the layout
        hoist holds) and x is loaded with the other groups' rows masked to zero, one MMA per
        (field, group); x rows come in the packing's natural runs (LO-wide), no reordering."""
        LO: tl.constexpr = 2 if BITS == 3 else BITS
        FPW: tl.constexpr = 32 // LO  # fields per word
        BLOCK_W: tl.constexpr = BLOCK_K // FPW  # words per row of the tile
        WPG: tl.constexpr = GROUP // FPW  # words per group
        NG: tl.constexpr = BLOCK_W // WPG  # groups in the tile (k0 is a multiple of BLOCK_K >= GROUP)
        KW = K // FPW
        wi = k0 // FPW + tl.arange(0, BLOCK_W)
        wmask = (n < N)[:, None] & (wi < KW)[None, :]
        w = tl.load(P + n[:, None] * stride_p + wi[None, :], mask=wmask, other=0)
        h = w
        if BITS == 3:  # high plane as int16 half-words: bit f of half-word 2*KW + wi
            h = tl.load(P16 + n[:, None] * (2 * stride_p) + 2 * KW + wi[None, :], mask=wmask, other=0).to(tl.int32)
        kx = tl.max_contiguous(tl.multiple_of(wi // LO * 32 + wi % LO, LO), LO)  # k of field 0 of each word
        col = tl.arange(0, BLOCK_W)
        for f in tl.static_range(FPW):
            q = (w >> (f * LO)) & ((1 << LO) - 1)
            if BITS == 3:
                q = q | (((h >> f) & 1) << 2)
            qf = (q | 0x4B000000).to(tl.float32, bitcast=True)
            for g in tl.static_range(NG):
                grp = n * (K // GROUP) + k0 // GROUP + g
                s = tl.load(S + grp, mask=n < N, other=0.0).to(tl.float32)[:, None]
                z = tl.load(Z + grp, mask=n < N, other=0.0).to(tl.float32)[:, None]
                v = (qf - (8388608.0 + z)) * s
                xmask = (m < M)[None, :] & ((wi < KW) & (col // WPG == g))[:, None]
                xt = tl.load(X + m[None, :] * stride_xm + (kx + f * LO)[:, None], mask=xmask, other=0.0)
                acc = _mma(v.to(X.dtype.element_ty), xt, acc, UPCAST)
        return acc
