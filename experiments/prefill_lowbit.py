"""Issue 19 probe: prefill (one forward over a prompt, batch 1) of the Llama-3-8B-shaped model, W4 and
W2 against bf16, at prompt lengths that land in each kernel's M range (32-64: the fused GEMM, 128+:
dequantise + cuBLAS), with the low-bit launches through their compiled kernels (kernels/direct_launch.py)
and through triton's JIT entry point, same run; --no-nt-ab also re-tunes the small-M buckets without
the un-swapped NT GEMM (what the dispatch ran before it).

    python -m experiments.prefill_lowbit --out prefill.json [--lens 32 64 128 512] [--layers 32] [--no-nt-ab]

Timing: eager forward under no_grad, CUDA events, median of --reps after 3 warm-ups; the lm_head
runs on the last position only (logits_to_keep=1), so the timing is the decoder.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile

import torch

from kernels import lowbit, lowbit_candidates, lowbit_dequant, lowbit_tune
from slimforge.quantized import pack_linears
from stages.quantize.bench_speed import dense_8b


@torch.no_grad()
def forward_ms(model, prompt_len: int, reps: int) -> float:
    ids = torch.randint(0, model.config.vocab_size, (1, prompt_len), device="cuda",
                        generator=torch.Generator("cuda").manual_seed(0))
    for _ in range(3):
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def without_nt(gpu: str, small_lens) -> None:
    """Drop this GPU's GEMM entries in the small-M buckets and stop offering NT: the tuner then
    picks among the candidates the dispatch had before NT existed."""
    buckets = {f"m{lowbit_tune._mbucket('gemm', m)}" for m in small_lens}
    table = lowbit_tune.tables().get(gpu, {})
    for key in [k for k in table if k.startswith("gemm|") and "m" + k.split("|")[1].rsplit("m", 1)[1] in buckets]:
        del table[key]  # key: gemm|b4g128n4096k4096m64[|lr]
    lowbit_candidates._nt_candidates = lambda *a, **k: []  # what _gemm_candidates calls


def host_rows() -> list[dict]:
    """Host microseconds per layer call, back to back on a 256 x 256 layer (GPU work of a few us, so
    the host sets the pace): nn.Linear bf16 against QuantLinear W4 with and without the direct launch."""
    from experiments.qloram_host_cost import host_us
    from kernels.quant_linear import QuantLinear

    dense = torch.nn.Linear(256, 256, bias=False, device="cuda", dtype=torch.bfloat16)
    quant = QuantLinear.from_linear(dense, bits=4, group=128)
    out = []
    with torch.no_grad():
        for m in (1, 64, 256):
            x = torch.randn(m, 256, device="cuda", dtype=torch.bfloat16)
            row = dict(m=m, linear_us=host_us(lambda: dense(x)), quant_direct_us=host_us(lambda: quant(x)))
            lowbit.DIRECT_LAUNCH = lowbit_dequant.DIRECT_LAUNCH = False
            row["quant_jit_us"] = host_us(lambda: quant(x))
            lowbit.DIRECT_LAUNCH = lowbit_dequant.DIRECT_LAUNCH = True
            print("host us per call", row, flush=True)
            out.append(row)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--lens", type=int, nargs="+", default=[32, 64, 128, 512])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--no-nt-ab", action="store_true")
    ap.add_argument("--host-only", action="store_true", help="only the host cost per layer call")
    args = ap.parse_args()
    os.environ["SLIMFORGE_CACHE"] = tempfile.mkdtemp()  # tune only what the shipped table lacks, here
    gpu = torch.cuda.get_device_name()
    host = host_rows()
    if args.host_only:
        with open(args.out, "w") as f:
            json.dump(dict(gpu=gpu, torch=torch.__version__, host=host), f, indent=1)
        return
    dense = dense_8b(args.layers)
    rows = [dict(model="bf16", **{f"len{n}_ms": forward_ms(dense, n, args.reps) for n in args.lens})]
    models = {}
    for bits in (4, 2):
        models[bits] = pack_linears(copy.deepcopy(dense), bits=bits, group=128)
        rows.append(dict(model=f"W{bits} g128", **{f"len{n}_ms": forward_ms(models[bits], n, args.reps)
                                                    for n in args.lens}))
    lowbit.DIRECT_LAUNCH = lowbit_dequant.DIRECT_LAUNCH = False
    for bits in (4, 2):
        rows.append(dict(model=f"W{bits} g128, JIT launch", **{f"len{n}_ms": forward_ms(models[bits], n, args.reps)
                                                               for n in args.lens}))
    lowbit.DIRECT_LAUNCH = lowbit_dequant.DIRECT_LAUNCH = True
    if args.no_nt_ab:
        small = [n for n in args.lens if 16 < n < 128]
        without_nt(gpu, small)
        for bits in (4, 2):
            rows.append(dict(model=f"W{bits} g128, no NT", **{f"len{n}_ms": forward_ms(models[bits], n, args.reps)
                                                              for n in small}))
    for row in rows:
        for n in args.lens:
            if f"len{n}_ms" in row:
                row[f"len{n}_speedup"] = rows[0][f"len{n}_ms"] / row[f"len{n}_ms"]
        print(row["model"].ljust(24), " ".join(f"{n}: {row[f'len{n}_ms']:.2f} ms ({row[f'len{n}_speedup']:.2f}x)"
                                              for n in args.lens if f"len{n}_ms" in row), flush=True)
    with open(args.out, "w") as f:
        json.dump(dict(gpu=gpu, torch=torch.__version__, layers=args.layers, reps=args.reps, host=host, rows=rows), f,
                  indent=1)


if __name__ == "__main__":
    main()
