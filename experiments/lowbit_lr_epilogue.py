"""Issue 19 probe: where the fused low-rank correction's extra time goes at M = 1 and 16, against the
plain kernel on the same tile.

    python -m experiments.lowbit_lr_epilogue --out lr.json [--m 1 16] [--bits 4 2] [--rank 64]
        [--variants '[{"DIAG": 1}, {"DIAG": 2}]']

Each point runs the shipped configs (the plain key, and key|lr for the correction) in the tuner's
harness (cold L2, launch hidden; two rounds, the second in reverse order, the lower median kept),
against cuBLAS fp16 in the same run. Overhead = lr time / plain time - 1 (issue 19's target: <= 15%).
`--variants` adds config keys to the |lr config, one timing each: the keys exist only with the
patches stored in benchmarks/2026-12-01-h200-lowbit-lr-epilogue.json applied (`git apply` on commit
a23f56b's kernels, before the counter-word protocol): UP_EARLY
(where the `up` tile is loaded), T_UNROLL (t partials loaded several at a time), T_K (the GEMM
t-programs' K-slice), DIAG (1: no wait on the t-programs, 2: and no t loads, 3: and no counter
bookkeeping, 4: no low-rank term in the epilogue: timing only, wrong results). Counters are zeroed
after each timing, since DIAG 3 and 4 leave them set.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from kernels import lowbit, lowbit_tune
from kernels.bench_lowbit import gpu_time_us, make_weight

SHAPES = [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)]


def _zero_counters() -> None:
    for counters in lowbit._COUNTERS.values():
        counters.zero_()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--m", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 2])
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--reps", type=int, default=40)
    ap.add_argument("--variants", default="[{}]", help="JSON list of config keys added to the |lr config")
    args = ap.parse_args()
    gpu, variants = torch.cuda.get_device_name(), json.loads(args.variants)
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
                fns.update({"lr " + json.dumps(v, sort_keys=True): run(dict(lr_cfg, **v), True) for v in variants})
                times = {}
                for name, fn in list(fns.items()) + list(reversed(fns.items())):
                    times[name] = min(times.get(name, float("inf")), gpu_time_us(fn, args.reps))
                    _zero_counters()
                row = dict(n=n, k=k, bits=bits, m=m, kind=kind, rank=args.rank, plain_cfg=plain_cfg, lr_cfg=lr_cfg,
                           us=times, ratio_plain=times["cublas"] / times["plain"],
                           overhead={name[3:]: times[name] / times["plain"] - 1 for name in times if name.startswith("lr ")})
                rows.append(row)
                print(f"{n}x{k} W{bits} M={m} {kind}: plain {times['plain']:.2f} us ({row['ratio_plain']:.2f}x cuBLAS) | "
                      + " ".join(f"{name}:{o * 100:+.1f}%" for name, o in row["overhead"].items()), flush=True)
            del w16, packed, scale, zero
            torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        json.dump(dict(gpu=gpu, torch=torch.__version__, triton=lowbit.triton.__version__, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
