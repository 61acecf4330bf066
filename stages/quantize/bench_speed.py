"""Decode speed of 4-bit and 2-bit models against bf16, on one GPU, in the same run.

    python -m stages.quantize.bench_speed [--layers 32] [--group 128] [--json out.json]

A Llama-3-8B-shaped model (random weights: speed does not depend on them) in bf16, and copies
whose decoder linears are QuantLinear on the low-bit kernels (embeddings and lm_head stay bf16,
as in the quantize stage). Decode: greedy steps from a static KV cache, each replayed as one CUDA
graph, batch 1 and 16. Also the 2-bit model with a rank-64 low-rank correction fused in, and each
model with its q|k|v and gate|up projections fused into one matmul each (slimforge/fused_projections.py;
the corrected model's projections cannot be, and bf16 gets the same fusion as a second baseline).
"""

from __future__ import annotations

import argparse
import copy
import json

import torch
from transformers import LlamaForCausalLM

from slimforge.evaluate.speed import decode_tokens_per_s, llama3_8b_shape
from slimforge.fused_projections import fuse_projections
from slimforge.quantized import pack_linears


def dense_8b(layers: int = 32) -> LlamaForCausalLM:
    """A Llama-3-8B-shaped model in bf16 on the GPU, random weights (seed 0), in eval mode."""
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            return LlamaForCausalLM(llama3_8b_shape(layers)).eval()
    finally:
        torch.set_default_dtype(torch.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--new", type=int, default=256, help="decoded tokens per measurement")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    dense = dense_8b(args.layers)
    gpu = torch.cuda.get_device_name()
    batches = (1, 16)
    results = {"gpu": gpu, "group": args.group, "rows": []}
    base = {b: decode_tokens_per_s(dense, batch_size=b, prompt_len=128, new_tokens=args.new)[0] for b in batches}
    results["rows"].append({"model": "bf16", **{f"b{b}": base[b] for b in batches}})
    print(f"{gpu}: decode tok/s, static cache + CUDA graph, prompt 128, {args.new} new tokens")
    print(f"{'model':22s} " + " ".join(f"{'b' + str(b):>16s}" for b in batches))
    print(f"{'bf16':22s} " + " ".join(f"{base[b]:9.1f} (1.00x)" for b in batches))
    for bits, rank, fuse in ((0, 0, True), (4, 0, False), (4, 0, True), (2, 0, False), (2, 0, True), (2, 64, False)):
        model = copy.deepcopy(dense)
        if bits:
            model = pack_linears(model, bits=bits, group=args.group, rank=rank)
        if fuse:
            fuse_projections(model)
        torch.cuda.empty_cache()
        tok = {b: decode_tokens_per_s(model, batch_size=b, prompt_len=128, new_tokens=args.new)[0] for b in batches}
        label = (f"W{bits} g{args.group}" if bits else "bf16") + (f" + rank {rank}" if rank else "") + \
            (" fused" if fuse else "")
        results["rows"].append({"model": label, **{f"b{b}": tok[b] for b in batches},
                                **{f"speedup_b{b}": tok[b] / base[b] for b in batches}})
        print(f"{label:22s} " + " ".join(f"{tok[b]:9.1f} ({tok[b] / base[b]:.2f}x)" for b in batches))
        del model
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
