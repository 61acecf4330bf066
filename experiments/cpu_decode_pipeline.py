"""Issue 19 probe (CPU): the pipeline's own pruned and quantized models (data/pruned, data/quantized
from `dvc repro`), eager greedy decode at batch 1, 2 threads, timed in turn; and what QuantLinear's
forward costs: the same quantized model with its forward cut to a bare F.linear on the folded weight
("raw") or with the staleness check of that weight skipped ("nocheck") -- probes, not safe paths --
and the model as the report stage and `slimforge eval` decode it on a CPU, dequantised once into
nn.Linear layers (slimforge.quantized.dequantize_for_cpu, "dense").

    python -m experiments.cpu_decode_pipeline [--reps 10] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
from torch import nn

from kernels.quant_linear import QuantLinear
from slimforge.evaluate.speed import eager_decode
from slimforge.modeling import load_model
from slimforge.quantized import dequantize_for_cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(2)
    pruned, quant = load_model("data/pruned", device="cpu")[0], load_model("data/quantized", device="cpu")[0]
    as_linears = load_model("data/quantized", device="cpu")[0]
    dequantize_for_cpu(as_linears)
    forward, dense = QuantLinear.forward, QuantLinear._dense_weight
    variants = {"quantized": (forward, dense),
                "raw": (lambda self, x: nn.functional.linear(x, self.__dict__["_dense"], self._buffers.get("bias")), dense),
                "nocheck": (forward, lambda self, folded=False: self.__dict__["_dense"])}
    tok_s = {k: [] for k in ["pruned", *variants, "dense"]}
    with torch.no_grad():
        eager_decode(pruned, 1, 16, 4)
        eager_decode(quant, 1, 16, 4)  # builds the folded weights
        eager_decode(as_linears, 1, 16, 4)
        for _ in range(args.reps):
            tok_s["pruned"].append(64 / eager_decode(pruned, 1, 16, 64)[1])
            for name, (fwd, dw) in variants.items():
                QuantLinear.forward, QuantLinear._dense_weight = fwd, dw
                tok_s[name].append(64 / eager_decode(quant, 1, 16, 64)[1])
            QuantLinear.forward, QuantLinear._dense_weight = forward, dense
            tok_s["dense"].append(64 / eager_decode(as_linears, 1, 16, 64)[1])
    out = {}
    for name, values in tok_s.items():
        ratios = sorted(a / b for a, b in zip(values, tok_s["pruned"]))
        out[name] = dict(median_tokens_per_s=statistics.median(values), paired_ratio_median=statistics.median(ratios),
                         paired_ratio_range=[ratios[0], ratios[-1]])
        print(f"{name:10s} {statistics.median(values):6.0f} tok/s, {statistics.median(ratios):.3f}x pruned "
              f"({ratios[0]:.2f}-{ratios[-1]:.2f})", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(tokens_per_s=tok_s, summary=out, torch=torch.__version__, threads=2), f, indent=1)


if __name__ == "__main__":
    main()
