"""Issue 19 probe (CPU): does a QuantLinear model decode as fast as the fp32 model it came from when
there is no GPU? A tiny Llama (the embedded default's shape: 128 wide, 6 layers) against the same
model with every projection packed to 4 bits (group 32) plus a rank-8 correction, greedy decode
with a KV cache on the CPU, the two timed in turn `--reps` times (2 threads).

    python -m experiments.cpu_decode_quant [--reps 7] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from slimforge.evaluate.speed import decode_tokens_per_s
from slimforge.quantized import pack_linears


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    config = LlamaConfig(vocab_size=320, hidden_size=128, intermediate_size=384, num_hidden_layers=6,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    dense = LlamaForCausalLM(config).eval()
    quant = pack_linears(copy.deepcopy(dense), bits=4, group=32, rank=8)
    with torch.no_grad():
        for m in quant.modules():
            if getattr(m, "up", None) is not None:
                m.up.normal_(0, 0.02)  # a non-zero correction, as after training
    tok_s = {"dense": [], "quantized": []}
    for _ in range(args.reps):
        for name, model in (("dense", dense), ("quantized", quant)):
            tok_s[name].append(decode_tokens_per_s(model, batch_size=1, prompt_len=16, new_tokens=64, cuda_graph=False)[0])
    ratio = statistics.median(tok_s["quantized"]) / statistics.median(tok_s["dense"])
    print({k: [round(v) for v in vs] for k, vs in tok_s.items()}, f"median ratio {ratio:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"tokens_per_s": tok_s, "median_ratio": ratio, "torch": torch.__version__,
                       "cpu": platform.processor() or platform.machine(), "threads": 2}, f, indent=1)


if __name__ == "__main__":
    main()
