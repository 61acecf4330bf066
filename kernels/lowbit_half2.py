"""Half2 dequantisation for fp16 x (config key HALF2; kernels/lowbit.py documents when it runs):
two packed fields per 32-bit op through inline PTX, for the per-field GEMM (FIELDS 1/2) and the
un-swapped one (NT). kernels/lowbit_tiles.py holds the fp32-route tiles these mirror.
"""

from __future__ import annotations

try:
    import triton
    import triton.language as tl
except ImportError:  # a machine without triton still gets the reference (kernels/lowbit.py)
    triton = None


if triton is not None:
    from kernels.lowbit_tiles import _mma

    @triton.jit
    def _half2_pair(w, z, s, MASK: tl.constexpr, ASM: tl.constexpr):
        """The two fields of each 32-bit word of w at bits 0 and 16 (under MASK, 0x000f000f or
        0x00030003) dequantised to fp16 two at a time: one LOP3 puts them in the mantissas of an
        fp16 pair 1024 + q, then q - (1024 + z) and * s run as half2 ops, ~2 instructions per weight
        where the fp32 route takes ~5. Bit-identical to it: q - z is an exact small integer and its
        product with the fp16 scale is rounded once either way. z, s: fp16, broadcast to w's shape.
        ASM off (the interpreter runs no PTX): the same values in fp32."""
        if ASM:
            zb = ((z.to(tl.float32) + 1024.0).to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF) * 65537
            sb = (s.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF) * 65537
            if MASK == 0x000F000F:
                return tl.inline_asm_elementwise(
                    asm="{ .reg .b32 t; lop3.b32 t, $2, 0x000F000F, 0x64006400, 0xEA; sub.f16x2 t, t, $3; "
                        "mul.rn.f16x2 t, t, $4; mov.b32 {$0, $1}, t; }",
                    constraints="=h,=h,r,r,r", args=[w, zb, sb], dtype=(tl.float16, tl.float16), is_pure=True, pack=1)
            else:
                return tl.inline_asm_elementwise(
                    asm="{ .reg .b32 t; lop3.b32 t, $2, 0x00030003, 0x64006400, 0xEA; sub.f16x2 t, t, $3; "
                        "mul.rn.f16x2 t, t, $4; mov.b32 {$0, $1}, t; }",
                    constraints="=h,=h,r,r,r", args=[w, zb, sb], dtype=(tl.float16, tl.float16), is_pure=True, pack=1)
        lo = ((w & MASK & 0xFFFF).to(tl.float32) - z.to(tl.float32)) * s.to(tl.float32)
        hi = (((w >> 16) & MASK & 0xFFFF).to(tl.float32) - z.to(tl.float32)) * s.to(tl.float32)
        return lo.to(tl.float16), hi.to(tl.float16)

    @triton.jit
    def _dequant_kn_half2(P, S, Z, n, kw0, N, K, stride_p, BITS: tl.constexpr, GROUP: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr, ASM: tl.constexpr):
        """_dequant_kn in fp16 by _half2_pair (2- and 4-bit, the tile inside one group): each pair op
        gives fields f and f + 8 / 2 of every word; joins stack the fields on new trailing axes in
        field order, and one permute puts them where the packing has them (k = 32u + U*i + j)."""
        U: tl.constexpr = BITS
        KW = K // (32 // BITS)
        kw = kw0 + tl.arange(0, BLOCK_KW)
        w = tl.load(P + n[None, :] * stride_p + kw[:, None], mask=(kw < KW)[:, None] & (n < N)[None, :], other=0)
        grp = n * (K // GROUP) + kw0 * (32 // BITS) // GROUP
        s = tl.load(S + grp, mask=n < N, other=0.0)[None, :]
        z = tl.load(Z + grp, mask=n < N, other=0.0)[None, :]
        if BITS == 4:  # pair f: fields f and f + 4
            l0, h0 = _half2_pair(w, z, s, 0x000F000F, ASM)
            l1, h1 = _half2_pair(w >> 4, z, s, 0x000F000F, ASM)
            l2, h2 = _half2_pair(w >> 8, z, s, 0x000F000F, ASM)
            l3, h3 = _half2_pair(w >> 12, z, s, 0x000F000F, ASM)
            # join(a, b) appends an axis of 2; nested as below, the trailing axes index the field
            # (row-major): join(tree of the even fields, tree of the odd ones), recursively
            v = tl.join(tl.join(tl.join(l0, h0), tl.join(l2, h2)), tl.join(tl.join(l1, h1), tl.join(l3, h3)))
        else:  # pair f: fields f and f + 8
            l0, h0 = _half2_pair(w, z, s, 0x00030003, ASM)
            l1, h1 = _half2_pair(w >> 2, z, s, 0x00030003, ASM)
            l2, h2 = _half2_pair(w >> 4, z, s, 0x00030003, ASM)
            l3, h3 = _half2_pair(w >> 6, z, s, 0x00030003, ASM)
            l4, h4 = _half2_pair(w >> 8, z, s, 0x00030003, ASM)
            l5, h5 = _half2_pair(w >> 10, z, s, 0x00030003, ASM)
            l6, h6 = _half2_pair(w >> 12, z, s, 0x00030003, ASM)
            l7, h7 = _half2_pair(w >> 14, z, s, 0x00030003, ASM)
            v = tl.join(tl.join(tl.join(tl.join(l0, h0), tl.join(l4, h4)), tl.join(tl.join(l2, h2), tl.join(l6, h6))),
                        tl.join(tl.join(tl.join(l1, h1), tl.join(l5, h5)), tl.join(tl.join(l3, h3), tl.join(l7, h7))))
        v = tl.permute(tl.reshape(v, (BLOCK_KW // U, U, BLOCK_N, 32 // BITS)), (0, 3, 1, 2))  # [unit, i, j, n]
        return tl.reshape(v, (BLOCK_KW * (32 // BITS), BLOCK_N))

    @triton.jit
    def _fields_tile_half2(X, XF, P, S, Z, m, n, k0, M, N, K, stride_xm, stride_p, acc, BITS: tl.constexpr,
                           GROUP: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr, FIELDS: tl.constexpr,
                           ASM: tl.constexpr):
        """lowbit_tiles._fields_tile with half2 dequantisation: same packing, same k map, the tile inside one
        group; at 4 bits one pair op gives fields f and f + 4 of each word, at 2 bits field f of two
        neighbouring units."""
        BLOCK_C: tl.constexpr = BLOCK_K // 8
        C = K // 8
        c = k0 // 8 + tl.arange(0, BLOCK_C)
        grp = n * (K // GROUP) + k0 // GROUP
        s = tl.load(S + grp, mask=n < N, other=0.0)[:, None]
        z = tl.load(Z + grp, mask=n < N, other=0.0)[:, None]
        xmask = (m < M)[None, :] & (c < C)[:, None]
        if BITS == 4:
            w = tl.load(P + n[:, None] * stride_p + c[None, :], mask=(n < N)[:, None] & (c < C)[None, :], other=0)
            kx = tl.max_contiguous(tl.multiple_of(c // 4 * 32 + c % 4, 4), 4)
            for f in tl.static_range(4):  # fields f and f + 4 of every word
                lo, hi = _half2_pair(w >> (4 * f), z, s, 0x000F000F, ASM)
                acc = _mma(lo, _x_field(X, XF, m, c, kx, f, K, C, stride_xm, xmask, 4, FIELDS), acc, UPCAST)
                acc = _mma(hi, _x_field(X, XF, m, c, kx, f + 4, K, C, stride_xm, xmask, 4, FIELDS), acc, UPCAST)
        else:  # 2 bits: 32-bit word j holds units 2j (low half) and 2j + 1
            BLOCK_N: tl.constexpr = n.shape[0]
            cw = k0 // 16 + tl.arange(0, BLOCK_C // 2)
            w = tl.load(P + n[:, None] * stride_p + cw[None, :], mask=(n < N)[:, None] & (cw < C // 2)[None, :], other=0)
            kx = c // 4 * 32 + (c % 2) * 16 + (c // 2) % 2
            for f in tl.static_range(8):
                lo, hi = _half2_pair(w >> (2 * f), z, s, 0x00030003, ASM)
                v = tl.reshape(tl.join(lo, hi), (BLOCK_N, BLOCK_C))  # unit 2j + h at column 2j + h
                acc = _mma(v, _x_field(X, XF, m, c, kx, f, K, C, stride_xm, xmask, 2, FIELDS), acc, UPCAST)
        return acc

    @triton.jit
    def _x_field(X, XF, m, c, kx, f, K, C, stride_xm, xmask, LO: tl.constexpr, FIELDS: tl.constexpr):
        """x^T rows that field f of units c multiplies: [BLOCK_C, BLOCK_M] (see _fields_tile)."""
        if FIELDS == 2:
            return tl.load(XF + m[None, :] * K + f * C + c[:, None], mask=xmask, other=0.0)
        return tl.load(X + m[None, :] * stride_xm + (kx + f * LO)[:, None], mask=xmask, other=0.0)
