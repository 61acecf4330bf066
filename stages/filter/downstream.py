"""Downstream check of a filter: the same LoRA recipe trained on the kept rows and on all rows
(same steps, same seed), scored by exact match on a held-out test file. (The lora stage will do
this properly; this is the measurement the filter stage reports.)"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model

from slimforge.batching import encode_records
from slimforge.evaluate.generation import exact_match
from slimforge.modeling import load_model
from slimforge.training import train_causal_lm

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora_accuracy(model_dir: str | Path, records: list[dict], tests: list[dict], *, steps: int, rank: int,
                  lr: float, batch_size: int, seed: int, checkpoint_dir: str | Path, device: str) -> float:
    """Mean exact match on `tests` of `model_dir` + a LoRA trained on `records`."""
    model, tokenizer = load_model(model_dir, device=device)
    torch.manual_seed(seed)
    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS,
                                             lora_dropout=0.0, task_type="CAUSAL_LM"))
    examples = encode_records(records, tokenizer)
    train_causal_lm(model, examples, pad_id=tokenizer.pad_token_id, steps=steps, batch_size=min(batch_size, len(examples)),
                    lr=lr, warmup_steps=min(20, steps // 10), min_lr_ratio=0.1, weight_decay=0.0, grad_clip=1.0,
                    seed=seed, checkpoint_dir=checkpoint_dir, checkpoint_every=0, fingerprint="downstream",
                    progress=False)
    accuracy = exact_match(model, tokenizer, tests)
    return sum(accuracy.values()) / len(accuracy)
