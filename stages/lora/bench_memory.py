"""Training memory and speed of LoRA on the full model vs LoRAM (pruned) vs QLoRAM (pruned + packed
low-bit), on one GPU, in the same run.

    python -m stages.lora.bench_memory [--shape 1b|8b] [--sparsity 0.5] [--json out.json]

A Llama-3.2-1B-shaped model (or Llama-3-8B) with random bf16 weights: memory and speed do not
depend on the values. LoRAM's model is the same one cut by a uniform plan at `--sparsity` of the
attention (whole KV groups) and MLP channels; QLoRAM's is that pruned model with every decoder
linear packed to 4 or 2 bits (group 128) on the low-bit kernels. The same PEFT LoRA (rank 16 on all
seven projections), AdamW, batch and sequence length for every row; peak = the most GPU memory
allocated during the steps (weights included); only the row's own model is on the GPU then (the
full model a pruned row is cut from is freed before its window, and `held_before_gib`, what earlier
rows left allocated, is reported to show it). Rows with and without activation checkpointing.
Each row also lists its timed steps (ms) and what the allocator (cudaMalloc, retries) and Python's
collector did during them (`--gc-freeze`: the collector kept off the model's objects while timing).
The loss runs the LM head in chunks under checkpointing (fp32 logits of a 128k vocabulary would
otherwise dominate every row equally and hide what pruning saves).
"""

from __future__ import annotations

import argparse
import gc
import json
import time

import torch
from torch.utils.checkpoint import checkpoint
from transformers import LlamaConfig, LlamaForCausalLM

from kernels.logsoftmax_stats import token_logprobs
from slimforge.adapters import add_lora
from slimforge.config import PROJECTIONS
from slimforge.evaluate.speed import llama3_8b_shape
from slimforge.pruning import PrunePlan, prune_model
from slimforge.quantized import pack_linears


def llama32_1b_shape() -> LlamaConfig:
    return LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                       num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096,
                       rope_theta=500000.0, tie_word_embeddings=True)


def uniform_plan(config, sparsity: float) -> PrunePlan:
    plan = PrunePlan.identity(config)
    group = plan.group
    for lp in plan.layers:
        kv = max(1, round(plan.num_kv_heads * (1 - sparsity)))
        lp.kv_heads = list(range(kv))
        lp.q_heads = list(range(kv * group))
        lp.channels = list(range(int(plan.intermediate_size * (1 - sparsity)) // 128 * 128))
    return plan


def chunked_lm_loss(model, input_ids: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Mean next-token NLL; the LM head and log-softmax run per chunk of positions and are recomputed
    in the backward pass, so at most one chunk of logits is alive."""
    hidden = model.model(input_ids=input_ids, use_cache=False).last_hidden_state[:, :-1].reshape(-1, model.config.hidden_size)
    targets = input_ids[:, 1:].reshape(-1)
    head = model.lm_head

    def nll(h, t):
        return -token_logprobs(head(h), t).float().sum()

    total = sum(checkpoint(nll, hidden[i:i + chunk], targets[i:i + chunk], use_reentrant=False)
                for i in range(0, len(targets), chunk))
    return total / len(targets)


def train_step(peft_model, optimizer, ids: torch.Tensor) -> torch.Tensor:
    """One bf16-autocast step of the LM loss on `ids`; returns the loss."""
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = chunked_lm_loss(peft_model.base_model.model, ids)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def measure(model, batch: int, seq: int, steps: int, rank: int, ckpt: bool, gc_freeze: bool = False) -> dict:
    peft_model = add_lora(model, rank=rank, alpha=2 * rank, targets=list(PROJECTIONS))
    if ckpt:
        peft_model.base_model.model.gradient_checkpointing_enable({"use_reentrant": False})
    peft_model.train()
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    resident = torch.cuda.memory_allocated()
    times, warmup = [], 3  # untimed first steps: autotune, allocator
    for i in range(warmup + steps):
        if i == warmup:  # allocator activity in the timed steps: cudaMalloc/cudaFree (they synchronise) and retries
            before = torch.cuda.memory_stats()
            collections = [g["collections"] for g in gc.get_stats()]
            if gc_freeze:  # the model's objects out of the collector's reach: no full-heap pauses while timing
                gc.collect()
                gc.freeze()
        start = time.perf_counter()
        loss = train_step(peft_model, optimizer, ids)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    after = torch.cuda.memory_stats()
    gc.unfreeze()
    timed = times[warmup:]
    step = sorted(timed)[len(timed) // 2]  # median
    return {"peak_gib": torch.cuda.max_memory_allocated() / 2**30, "resident_gib": resident / 2**30,
            "tokens_per_s": batch * seq / step, "loss": loss.item(), "step_ms": [round(t * 1e3, 1) for t in timed],
            **{k: after.get(k, 0) - before.get(k, 0) for k in ("num_alloc_retries", "num_device_alloc", "num_device_free")},
            "gc_collections": [g["collections"] - c for g, c in zip(gc.get_stats(), collections)]}


def build(config, kind: str, sparsity: float) -> torch.nn.Module:
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    model.requires_grad_(False)
    if kind != "full":
        model = prune_model(model, uniform_plan(config, sparsity))
        model.requires_grad_(False)
    if kind.startswith("qloram"):
        model = pack_linears(model, bits=int(kind[-1]), group=128)
    gc.collect()
    torch.cuda.empty_cache()
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=("1b", "8b"), default="1b")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--gc-freeze", action="store_true", help="gc.freeze() before the timed steps (see measure)")
    args = ap.parse_args()
    config = llama32_1b_shape() if args.shape == "1b" else llama3_8b_shape()
    gpu = torch.cuda.get_device_name()
    print(f"{gpu}: LoRA training, {args.shape} shape, batch {args.batch} x {args.seq}, rank {args.rank}, "
          f"sparsity {args.sparsity}")
    rows = []
    for ckpt in (False, True):
        full = None
        for kind in ("full", "loram", "qloram4", "qloram2"):
            before = torch.cuda.memory_allocated()  # what earlier rows left: 0, or the peaks are not each row's own
            model = build(config, kind=kind, sparsity=args.sparsity)
            params = sum(p.numel() for p in model.parameters()) / 1e9
            row = {"model": kind, "checkpointing": ckpt, "dense_params_b": params, "held_before_gib": before / 2**30,
                   **measure(model, batch=args.batch, seq=args.seq, steps=args.steps, rank=args.rank, ckpt=ckpt,
                               gc_freeze=args.gc_freeze)}
            full = full or row
            row["memory_ratio"] = row["peak_gib"] / full["peak_gib"]
            row["speed_ratio"] = row["tokens_per_s"] / full["tokens_per_s"]
            rows.append(row)
            print(f"ckpt={ckpt!s:5s} {kind:8s} dense params {params:5.2f}B  peak {row['peak_gib']:6.2f} GiB "
                  f"({row['memory_ratio']:.2f}x)  {row['tokens_per_s']:9.0f} tok/s ({row['speed_ratio']:.2f}x)  "
                  f"steps {min(row['step_ms']):.0f}-{max(row['step_ms']):.0f} ms, cudaMalloc {row['num_device_alloc']}, "
                  f"retries {row['num_alloc_retries']}, gc runs {row['gc_collections']}",
                  flush=True)
            if args.json:  # after every row: a later row that fails keeps the earlier ones
                with open(args.json, "w") as f:
                    json.dump({"gpu": gpu, **vars(args), "rows": rows}, f, indent=2)
            del model
            gc.collect()
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
