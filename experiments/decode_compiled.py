"""Issue 19 probe: how much of the batch-1 decode bound is Hugging Face's eager non-linear code. The
Llama-3-8B-shape decode (static cache, one CUDA graph per step, stages.quantize.bench_speed's
harness) with RMSNorm, the rotary embedding and the MLP's SiLU * up compiled by torch.compile
(inductor fuses each into one or two kernels), for bf16 and W4 alike.

    python -m experiments.decode_compiled --out compiled.json [--layers 32] [--new 256] [--scope ops|layer]

--scope layer compiles the whole decoder layer too (residual adds, cache update, attention; one
compile per layer index and shape: minutes), with the projections still eager.

experiments/decode_breakdown.py found ~1700 kernels per step, 2.5 ms of a 7.5 ms bf16 step outside
the matmuls, which caps the W4 speed-up at 2.45x even with free linears. The projections stay eager
(torch.compiler.disable: our Triton launches, and fuse_projections' slicing, are graph breaks by
design); everything else in the layer is as Hugging Face wrote it.
"""

from __future__ import annotations

import argparse
import copy
import json

import torch
from transformers.models.llama import modeling_llama

from kernels.quant_linear import QuantLinear
from slimforge.evaluate.speed import decode_tokens_per_s
from slimforge.fused_projections import ProjectionSlice, fuse_projections
from slimforge.quantized import pack_linears
from stages.quantize.bench_speed import dense_8b


def compile_non_linear(scope: str) -> None:
    """Patch the classes (every layer, every model) so the non-linear pieces run compiled."""
    torch._dynamo.config.cache_size_limit = 512
    torch._dynamo.config.accumulated_cache_size_limit = 4096
    for cls in (QuantLinear, ProjectionSlice, torch.nn.Linear):
        cls.forward = torch.compiler.disable(cls.forward)
    modeling_llama.LlamaRMSNorm.forward = torch.compile(modeling_llama.LlamaRMSNorm.forward, dynamic=False)
    modeling_llama.apply_rotary_pos_emb = torch.compile(modeling_llama.apply_rotary_pos_emb, dynamic=False)
    modeling_llama.LlamaMLP.forward = torch.compile(modeling_llama.LlamaMLP.forward, dynamic=False)
    if scope == "layer":
        layer = modeling_llama.LlamaDecoderLayer
        layer.forward = torch.compile(layer.forward, dynamic=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--scope", choices=["ops", "layer"], default="ops")
    ap.add_argument("--models", nargs="+", default=["bf16", "bf16 fused", "W4 g128 fused"])
    args = ap.parse_args()
    dense = dense_8b(args.layers)
    models = {"bf16": dense}
    if "bf16 fused" in args.models:
        models["bf16 fused"] = copy.deepcopy(dense)
        fuse_projections(models["bf16 fused"])
    models["W4 g128 fused"] = pack_linears(copy.deepcopy(dense), bits=4, group=128)
    fuse_projections(models["W4 g128 fused"])
    rows = []
    for mode in ("eager", "compiled"):
        if mode == "compiled":
            compile_non_linear(args.scope)
        tok = {}
        for label, m in models.items():
            # compiled code is guarded on the model's modules: a fresh cache per model, or the third
            # model's 32 layers x shapes pass the recompile limit and silently run eager
            torch._dynamo.reset()
            tok[label] = {b: decode_tokens_per_s(m, batch_size=b, prompt_len=128, new_tokens=args.new)[0] for b in (1, 16)}
        for label, t in tok.items():
            row = dict(mode=mode, model=label, b1=t[1], b16=t[16],
                       speedup_b1=t[1] / tok["bf16"][1], speedup_b16=t[16] / tok["bf16"][16])
            rows.append(row)
            print(json.dumps(row), flush=True)
    with open(args.out, "w") as f:
        json.dump(dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, scope=args.scope, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
