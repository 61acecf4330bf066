"""Issue 19 probe (large M): how fast can the dequantise kernel stream, and does dequantising the
weight in blocks on a side stream, overlapped with cuBLAS on the blocks already done, beat
"dequantise all of W, then one cuBLAS call" (kernels/lowbit_dequant.py today)?

    python -m experiments.lowbit_dequant_overlap --out overlap.json [--m 256 1024 2048] [--reps 20]

Per shape (Llama-8B) and format (4:128, 2:128): (1) a grid of launch configs of the dequantise
kernel (rows per program, 32-column units per program, warps), GB/s of packed bytes read plus fp16
bytes written; (2) forward y = x @ W_hat^T at each M: cuBLAS fp16 alone, today's path, and W split
into --chunks row blocks (bounded ping-pong buffers), dequantised on a side stream while cuBLAS
multiplies the previous block into its column slice of y, and the same blocks on one stream;
(3) dx = dy @ W_hat at M = 2048 the same way with W split into column blocks. Same harness as
kernels.bench_lowbit (cold L2, CUDA events, median); every path checked against fp32.
"""

from __future__ import annotations

import argparse
import json
import platform

import torch
import torch.nn.functional as F
import triton

from kernels.bench_lowbit import gpu_time_us, make_weight
from kernels.lowbit_dequant import _dequant_kernel, dequantize
from kernels.lowbit_format import dequantize_groups, unpack

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336)]
GRID = [dict(BLOCK_N=bn, UNITS=u, num_warps=w) for bn in (8, 16, 32, 64) for u in (4, 8, 16, 32) for w in (4, 8)
        if bn * u * 32 <= 64 * 1024]


def dequant_into(out, packed, scale, zero, bits, group, cfg):
    """out (n, kc) = W_hat of the (n, kc) block that packed/scale/zero views start at."""
    n, kc = out.shape
    grid = (triton.cdiv(n, cfg["BLOCK_N"]), kc // (32 * cfg["UNITS"]))
    _dequant_kernel[grid](packed, scale, zero, out, n, packed.stride(0), scale.stride(0), out.stride(0),
                          BITS=bits, GROUP=group, BLOCK_N=cfg["BLOCK_N"], UNITS=cfg["UNITS"],
                          num_warps=cfg["num_warps"])
    return out


_SIDE: dict = {}


def blocked(a, packed, scale, zero, bits, group, cfg, chunks, overlap, dx=False):
    """forward: a = x (M, K), y = x @ W_hat^T over row blocks of W; dx: a = dy (M, N), dx = dy @ W_hat
    over column blocks of W. Ping-pong buffers; with `overlap` the dequantisation runs on a side stream."""
    n, k = packed.shape[0], packed.shape[1] * 32 // bits
    total = k if dx else n
    step = -(-total // chunks)
    step = -(-step // max(group, 32 * cfg["UNITS"])) * max(group, 32 * cfg["UNITS"]) if dx else -(-step // 16) * 16
    out = torch.empty(a.shape[0], total, device=a.device, dtype=a.dtype)
    bufs = [torch.empty((n, step) if dx else (step, k), device=a.device, dtype=a.dtype) for _ in range(2)]
    main = torch.cuda.current_stream()
    side = _SIDE.setdefault(a.device, torch.cuda.Stream(a.device)) if overlap else main
    ready = [torch.cuda.Event() for _ in range(2)]
    free = [torch.cuda.Event() for _ in range(2)]
    side.wait_stream(main)
    for i, s0 in enumerate(range(0, total, step)):
        s1, b = min(s0 + step, total), i % 2
        with torch.cuda.stream(side):
            if i >= 2:
                side.wait_event(free[b])
            if dx:
                w = bufs[b][:, : s1 - s0]
                dequant_into(w, packed[:, s0 * bits // 32:], scale[:, s0 // group:], zero[:, s0 // group:], bits, group, cfg)
            else:
                w = bufs[b][: s1 - s0]
                dequant_into(w, packed[s0:s1], scale[s0:s1], zero[s0:s1], bits, group, cfg)
            ready[b].record(side)
        main.wait_event(ready[b])
        if dx:
            torch.mm(a, w, out=out[:, s0:s1])
        else:
            torch.mm(a, w.t(), out=out[:, s0:s1])
        free[b].record(main)
    return out


def rel_err(y, ref):
    return ((y.float() - ref).abs().max() / ref.abs().max()).item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--m", type=int, nargs="+", default=[256, 1024, 2048])
    ap.add_argument("--chunks", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    rows = []
    for n, k in SHAPES:
        for bits, group in ((4, 128), (2, 128)):
            w16, packed, scale, zero = make_weight(n, k, bits, group)
            w_hat = dequantize_groups(unpack(packed, bits, k), scale, zero, group)
            ref16 = w_hat.half()
            buf = torch.empty(n, k, device="cuda", dtype=torch.float16)
            grid = []
            for cfg in GRID:
                dequant_into(buf, packed, scale, zero, bits, group, cfg)
                assert torch.equal(buf, ref16), cfg
                t = gpu_time_us(lambda: dequant_into(buf, packed, scale, zero, bits, group, cfg), args.reps)
                grid.append((t, cfg))
            grid.sort(key=lambda tc: tc[0])
            t_now = gpu_time_us(lambda: dequantize(packed, scale, zero, bits, group, k, torch.float16), args.reps)
            nbytes = packed.numel() * 4 + scale.numel() * 4 + n * k * 2
            best_t, best = grid[0]
            print(f"{n}x{k} W{bits}: dequantise today {t_now:.1f} us ({nbytes / t_now / 1e3:.0f} GB/s), best "
                  f"{best} {best_t:.1f} us ({nbytes / best_t / 1e3:.0f} GB/s)", flush=True)
            rows.append(dict(section="dequant", n=n, k=k, bits=bits, today_us=t_now, best_us=best_t, best=best,
                             top5=[dict(us=t, **c) for t, c in grid[:5]]))
            for section, ms in (("forward", args.m), ("dx", [2048])):
                for m in ms:
                    a = torch.randn(m, n if section == "dx" else k, device="cuda", dtype=torch.float16)
                    ref = a.float() @ (w_hat if section == "dx" else w_hat.t())
                    if section == "dx":
                        paths = {"cublas": lambda: a @ w16, "today": lambda: a @ dequantize(packed, scale, zero, bits, group, k, a.dtype)}
                    else:
                        paths = {"cublas": lambda: F.linear(a, w16),
                                 "today": lambda: F.linear(a, dequantize(packed, scale, zero, bits, group, k, a.dtype))}
                    for c in args.chunks:
                        for ov in (False, True):
                            paths[f"{'overlap' if ov else 'serial'}{c}"] = (
                                lambda c=c, ov=ov: blocked(a, packed, scale, zero, bits, group, best, c, ov, section == "dx"))
                    row = dict(section=section, n=n, k=k, bits=bits, m=m)
                    for name, fn in paths.items():
                        if name != "cublas":
                            row[f"{name}_err"] = rel_err(fn(), ref)
                        row[f"{name}_us"] = gpu_time_us(fn, args.reps)
                    row["ratios"] = {p: row["cublas_us"] / row[f"{p}_us"] for p in paths if p != "cublas"}
                    rows.append(row)
                    bestp = max(row["ratios"], key=row["ratios"].get)
                    print(f"  {section} M={m}: cuBLAS {row['cublas_us']:.1f} us, today {row['ratios']['today']:.2f}x, "
                          f"best {bestp} {row['ratios'][bestp]:.2f}x (err {row[f'{bestp}_err']:.1e}) | "
                          + " ".join(f"{p} {r:.2f}" for p, r in row["ratios"].items()), flush=True)
            del w16, packed, scale, zero, w_hat, buf
            torch.cuda.empty_cache()
    meta = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                python=platform.python_version())
    with open(args.out, "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
