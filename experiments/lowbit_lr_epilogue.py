"""Issue 19 probe: where the fused low-rank correction's extra time goes at M = 1 and 16, and whether
loading its `up` tile earlier, loading the t-programs' partials several at a time, or another
GEMM t-program K-slice recovers it.

    python -m experiments.lowbit_lr_epilogue --out lr.json [--m 1 16] [--bits 4 2] [--rank 64]

Each point runs the shipped configs (the plain key, and key|lr for the correction) in the tuner's
harness (cold L2, launch hidden; two interleaved rounds, median of each, the lower kept), against
cuBLAS fp16 in the same run. Variants of the correction on the |lr tile: UP_EARLY 0 (up tile loaded
after the wait on the t-programs), 1 (before the wait and the split-K sums), 2 (at the program's
start); T_UNROLL, how many K-slice partials of t an output tile loads at once (1: one L2 round trip
each, 4, 8); for the GEMM also the t-programs' K-slice T_K (1024 default, 512, 2048).
A first run (UP_EARLY 0/1/2 only, T_K 256/512/1024) found no consistent UP_EARLY winner and smaller
T_K slower in proportion to the partials it adds: what led to T_UNROLL.
Overhead = lr time / plain time - 1; the target is <= 15%.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from kernels import lowbit, lowbit_tune
from kernels.bench_lowbit import gpu_time_us, make_weight

SHAPES = [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)]


def variants(kind: str) -> list[dict]:
    out = [dict(UP_EARLY=0, T_UNROLL=1)] + [dict(UP_EARLY=e, T_UNROLL=u) for e in (0, 1) for u in (4, 8)]
    if kind == "gemm":
        out += [dict(UP_EARLY=0, T_UNROLL=8, T_K=t) for t in (512, 2048)]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--m", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 2])
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--reps", type=int, default=40)
    args = ap.parse_args()
    gpu = torch.cuda.get_device_name()
    rows = []
    for n, k in SHAPES:
        for bits in args.bits:
            w16, packed, scale, zero = make_weight(n, k, bits, 128)
            gen = torch.Generator(device="cuda").manual_seed(1)
            down = torch.randn(args.rank, k, device="cuda", generator=gen).half() * 0.01
            up = torch.randn(n, args.rank, device="cuda", generator=gen).half() * 0.01
            for m in args.m:
                x = torch.randn(m, k, device="cuda", dtype=torch.float16)
                kind = lowbit.kernel_kind(m, bits, x.device, x.dtype)
                lowbit.lowbit_linear(x, packed, scale, zero, bits, 128)  # tunes what the table lacks
                lowbit.lowbit_linear(x, packed, scale, zero, bits, 128, down=down, up=up)
                key = lowbit_tune.config_key(kind, m, n, k, bits, 128)
                table = lowbit_tune.tables()[gpu]
                plain_cfg, lr_cfg = table[key], table.get(key + "|lr", table[key])
                run = lambda c, lr: lambda: lowbit._forward(x, packed, scale, zero, bits, 128,  # noqa: E731
                                                            down if lr else None, up if lr else None, None, cfg=c, kind=kind)
                fns = {"cublas": lambda: F.linear(x, w16), "plain": run(plain_cfg, False)}
                fns.update({"lr " + json.dumps(v, sort_keys=True): run(dict(lr_cfg, **v), True) for v in variants(kind)})
                outs = {name: fn().float() for name, fn in fns.items() if name.startswith("lr ")}
                first = next(iter(outs.values()))
                times = {name: gpu_time_us(fn, args.reps) for name, fn in fns.items()}
                for name, fn in reversed(list(fns.items())):  # second round, reverse order
                    times[name] = min(times[name], gpu_time_us(fn, args.reps))
                row = dict(n=n, k=k, bits=bits, m=m, kind=kind, rank=args.rank, plain_cfg=plain_cfg, lr_cfg=lr_cfg,
                           us=times, ratio_plain=times["cublas"] / times["plain"],
                           overhead={name[3:]: times[name] / times["plain"] - 1 for name in times if name.startswith("lr ")},
                           max_diff_vs_first={name[3:]: (o - first).abs().max().item() for name, o in outs.items()})
                rows.append(row)
                best = min(row["overhead"], key=row["overhead"].get)
                print(f"{n}x{k} W{bits} M={m} {kind}: plain {times['plain']:.2f} us ({row['ratio_plain']:.2f}x cuBLAS) | "
                      + " ".join(f"{name}:{o * 100:+.1f}%" for name, o in row["overhead"].items())
                      + f" | best {best}", flush=True)
            del w16, packed, scale, zero
            torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        json.dump(dict(gpu=gpu, torch=torch.__version__, triton=lowbit.triton.__version__, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
