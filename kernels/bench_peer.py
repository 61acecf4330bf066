"""PyTorch's own int4 kernel (tinygemm: torch._weight_int4pack_mm, bf16 activations) as a peer
of the low-bit kernels in kernels.bench_lowbit: same weights, same harness, same run.

    python -m kernels.bench_lowbit --out bench.json      # section "peer" (--skip peer to leave it out)

tinygemm dequantises as (q - 8) * scale + zero_f, ours as (q - zero) * scale, so the same W_hat is
zero_f = (8 - zero) * scale. Its nibble order has changed across torch versions: both are tried and
the one that reproduces W_hat is kept (its error is reported next to ours).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels import lowbit
from kernels.lowbit_format import dequantize_groups, unpack


def int4_operands(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, order: int):
    """tinygemm's packed weight and (K/group, N, 2) scale-and-zero for W_hat = (q - zero) * scale."""
    hi, lo = (q[:, ::2], q[:, 1::2]) if order == 0 else (q[:, 1::2], q[:, ::2])
    w = torch._convert_weight_to_int4pack((hi << 4 | lo).to(torch.uint8).contiguous(), 8)
    sz = torch.stack([scale.float(), (8 - zero.float()) * scale.float()], dim=-1)
    return w, sz.transpose(0, 1).contiguous().to(torch.bfloat16)


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref).abs().max() / ref.abs().max()).item()


def peer_rows(args, shapes, ms=(1, 16, 64), group: int = 128) -> list[dict]:
    from kernels.bench_lowbit import gpu_time_us, make_weight  # the harness (imports this module lazily)

    rows = []
    print(f"\nPyTorch int4 (tinygemm) vs ours, W4 g{group}, bf16 activations")
    for n, k in shapes:
        w16, packed, scale, zero = make_weight(n, k, 4, group)
        q = unpack(packed, 4, k).to(torch.int32)
        w_hat = dequantize_groups(q, scale, zero, group)
        wb = w16.to(torch.bfloat16)
        peers = [int4_operands(q, scale, zero, order) for order in (0, 1)]
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = x.float() @ w_hat.t()
            errs = [_rel_err(torch._weight_int4pack_mm(x, w, group, sz), ref) for w, sz in peers]
            w_i4, sz = peers[errs.index(min(errs))]
            ours = lambda: lowbit.lowbit_linear(x, packed, scale, zero, 4, group)  # noqa: E731
            err_ours = _rel_err(ours(), ref)
            t_cublas = gpu_time_us(lambda: F.linear(x, wb), args.reps)
            t_peer = gpu_time_us(lambda: torch._weight_int4pack_mm(x, w_i4, group, sz), args.reps)
            t_ours = gpu_time_us(ours, args.reps)
            rows.append(dict(section="peer", n=n, k=k, bits=4, group=group, m=m, dtype="bf16",
                             kernel=lowbit.kernel_kind(m, 4), cublas_us=t_cublas, torch_int4_us=t_peer,
                             lowbit_us=t_ours, torch_int4_ratio=t_cublas / t_peer, ratio=t_cublas / t_ours,
                             torch_int4_rel_err=min(errs), rel_err=err_ours))
            print(f"  {n}x{k} M={m}: cuBLAS bf16 {t_cublas:.1f} us | torch int4 {t_peer:.1f} us "
                  f"({t_cublas / t_peer:.2f}x, err {min(errs):.1e}) | ours {t_ours:.1f} us "
                  f"({t_cublas / t_ours:.2f}x, err {err_ours:.1e})", flush=True)
        del w16, packed, scale, zero, w_hat, wb, peers
        torch.cuda.empty_cache()
    return rows
