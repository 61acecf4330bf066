"""Group-wise asymmetric low-bit quantization: the numbers every low-bit path agrees on.

A weight W of shape (N, K) (out_features, in_features, as nn.Linear stores it) is split along K
into groups of `group` columns. Each (row, group) gets a scale and an integer zero point:

    scale = fp16((max - min) / (2**bits - 1))        (1 where max == min, so q = zero)
    zero  = clamp(round(-min / scale), 0, 2**bits - 1)
    q     = clamp(round(W / scale) + zero, 0, 2**bits - 1)      (integers in [0, 2**bits))
    W_hat = (q - zero) * scale

The scale is rounded to fp16 *before* q is computed, so the stored fp16 scale reproduces W_hat
exactly. Zeros are stored as fp16 too (small integers, exact), so storage costs
bits + 32 / group bits per weight.

Packed layout (a file format: `packed` is stored in safetensors next to scale and zero)
---------------------------------------------------------------------------------------
`pack(q, bits)` returns int32 of shape (N, K * bits / 32), each row packed on its own; K must be a
multiple of 32 (every allowed group size is). Words are little-endian int32 (two's complement: bit
31 may be set); field i of a word is its bits [i*b, (i+1)*b), field 0 least significant.

Weights are taken in units of 32 along K (unit u = k // 32, always inside one group). A unit of
b-bit fields (b = 4, or 2) is U = b words of 32 / b fields, interleaved:

    q[n, 32u + U*i + j]  is field i of word  U*u + j  of row n      (j < U, i < 32 / U)

  bits 4: U = 4, 8 fields per word, K/8 words per row.
  bits 2: U = 2, 16 fields per word, K/16 words per row.
  bits 3: two planes, row = [K/16 low-plane words | K/32 high-plane words] (3K/32 words):
          low plane  = q & 3 exactly as bits 2 (word 2u + j, field i holds k = 32u + 2i + j);
          high plane = q >> 2, one word per unit: bit 16j + i of word K/16 + u holds the high bit
          of weight 32u + 2i + j (the same weight as field i of low word 2u + j); read as int16
          half-words, half-word K/8 + 2u + j is the high-bit mask of low word 2u + j.

Why interleaved: a GEMV thread holds the U words of a unit (one 16- or 8-byte load) and walks
field i; field i of those U words are U consecutive weights, so their activations are one vector
load in the same register layout (a natural k-order packing needs U scalar loads per field and, in
Triton, a register-layout conversion through shared memory per field). A 3-bit weight costs
exactly 3 bits (no 10-in-32 waste, no K divisible by 10); see storage_bits_per_weight.

    from kernels.lowbit_format import quantize_groups, dequantize_groups, pack, unpack
"""

from __future__ import annotations

import torch

from kernels import BITS, GROUPS  # noqa: F401  (defined torch-free, so params schemas can check them)


def check_format(bits: int, group: int, in_features: int | None = None) -> None:
    """One-line errors for unsupported formats; K must be a multiple of the group (we refuse
    rather than pad: padding would change the layer's shape that the loader rebuilds)."""
    if bits not in BITS:
        raise ValueError(f"unsupported bit width {bits}; allowed: {', '.join(map(str, BITS))}")
    if group not in GROUPS:
        raise ValueError(f"unsupported group size {group}; allowed: {', '.join(map(str, GROUPS))}")
    if in_features is not None and in_features % group:
        raise ValueError(f"in_features {in_features} is not a multiple of the group size {group}; "
                         f"choose a group size that divides it (allowed: {', '.join(map(str, GROUPS))})")


def bits_per_weight(bits: int, group: int) -> float:
    """Storage cost per weight including the fp16 scale and zero of each group."""
    return bits + 32 / group


def quantize_groups(w: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest group quantization of a 2-D weight.

    Returns q (uint8, N x K), scale and zero (fp16, N x K/group)."""
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(w.shape)}")
    check_format(bits, group, w.shape[1])
    n, k = w.shape
    levels = 2 ** bits - 1
    wg = w.detach().float().reshape(n, k // group, group)
    lo, hi = wg.amin(-1), wg.amax(-1)
    scale = ((hi - lo) / levels).half()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # flat group (or fp16 underflow)
    s = scale.float()
    zero = torch.round(-lo / s).clamp(0, levels)
    q = (torch.round(wg / s.unsqueeze(-1)) + zero.unsqueeze(-1)).clamp(0, levels)
    return q.reshape(n, k).to(torch.uint8), scale, zero.half()


def dequantize_groups(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W_hat = (q - zero) * scale, broadcast over each group; returns (N, K) in `dtype`."""
    n, k = q.shape
    wg = (q.float().reshape(n, k // group, group) - zero.float().unsqueeze(-1)) * scale.float().unsqueeze(-1)
    return wg.reshape(n, k).to(dtype)


def fake_quantize(w: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """quantize then dequantize: the weight a low-bit layer actually computes with (fp32)."""
    return dequantize_groups(*quantize_groups(w, bits, group), group)


def packed_words(bits: int, in_features: int) -> int:
    """int32 words per packed row: K * bits / 32 (3-bit: K/16 low-plane + K/32 high-plane)."""
    return in_features * bits // 32


def storage_bits_per_weight(bits: int, group: int) -> float:
    """True storage per weight of the packed format: packed words (exactly `bits` per weight, 3-bit
    included) plus the fp16 scale and fp16 zero of each group. 4-bit g128: 4.25; 2-bit g64: 2.5."""
    check_format(bits, group)
    return packed_words(bits, 32 * group) * 32 / (32 * group) + 32 / group


def _check_pack_width(bits: int, in_features: int) -> None:
    if bits not in BITS:
        raise ValueError(f"unsupported bit width {bits}; allowed: {', '.join(map(str, BITS))}")
    if in_features % 32:
        raise ValueError(f"in_features {in_features} must be a multiple of 32 to pack")


def _pack_plane(q: torch.Tensor, width: int, unit_words: int) -> torch.Tensor:
    """Fields of `width` bits; weight 32u + U*i + j goes to the (j*32/U + i)-th field of unit u."""
    n, k = q.shape
    u = unit_words
    fields = q.to(torch.int64).reshape(n, k // 32, 32 // u, u).transpose(2, 3).reshape(n, -1, 32 // width)
    shifts = torch.arange(32 // width, device=q.device, dtype=torch.int64) * width
    words = (fields << shifts).sum(-1)  # disjoint fields: sum == or
    return (words - ((words >> 31) << 32)).to(torch.int32)  # reinterpret as two's complement


def _unpack_plane(words: torch.Tensor, width: int, unit_words: int) -> torch.Tensor:
    n, w = words.shape
    u = unit_words
    shifts = torch.arange(32 // width, device=words.device, dtype=torch.int64) * width
    fields = (words.to(torch.int64).unsqueeze(-1) >> shifts) & (2 ** width - 1)
    k = w * 32 // width
    return fields.reshape(n, k // 32, u, 32 // u).transpose(2, 3).reshape(n, k)


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """q (integers in [0, 2**bits), shape (N, K)) -> packed int32 (N, K * bits / 32); layout in
    the module docstring."""
    if q.dim() != 2:
        raise ValueError(f"expected q of shape (N, K), got {tuple(q.shape)}")
    _check_pack_width(bits, q.shape[1])
    if q.numel() and (int(q.min()) < 0 or int(q.max()) >= 2 ** bits):
        raise ValueError(f"q holds values outside [0, {2 ** bits}) for {bits}-bit packing")
    if bits == 3:
        return torch.cat([_pack_plane(q & 3, 2, 2), _pack_plane(q >> 2, 1, 2)], dim=1)
    return _pack_plane(q, bits, bits)


def unpack(packed: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Inverse of pack: packed int32 (N, K * bits / 32) -> q uint8 (N, K), bit-exact."""
    _check_pack_width(bits, in_features)
    if packed.dim() != 2 or packed.dtype != torch.int32 or packed.shape[1] != packed_words(bits, in_features):
        raise ValueError(f"packed must be int32 of shape (N, {packed_words(bits, in_features)}) for "
                         f"{bits}-bit K={in_features}, got {packed.dtype} {tuple(packed.shape)}")
    if bits == 3:
        lo = _unpack_plane(packed[:, : in_features // 16], 2, 2)
        hi = _unpack_plane(packed[:, in_features // 16:], 1, 2)
        return (lo | (hi << 2)).to(torch.uint8)
    return _unpack_plane(packed, bits, bits).to(torch.uint8)


def check_lowbit_args(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                      group: int, out_features: int | None = None, down: torch.Tensor | None = None,
                      up: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> None:
    """kernels.lowbit.lowbit_linear's argument checks: one-line errors naming what is wrong and what is allowed."""
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
    from kernels.dispatch import use_triton  # torch-only here otherwise; dispatch imports triton

    if not use_triton(x):
        if not x.is_floating_point():
            raise ValueError(f"x must be a floating-point tensor, got {x.dtype}")
    elif x.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"the low-bit kernels take fp16 or bf16 activations, got {x.dtype}")
