"""Downstream check of a filter: the same LoRA recipe trained on the kept rows and on all rows
(same steps, same seed), scored by exact match on a held-out test file. (The lora stage will do
this properly; this is the measurement the filter stage reports.)"""

from __future__ import annotations

from pathlib import Path

from slimforge.adapters import PROJECTIONS, add_lora
from slimforge.batching import encode_records
from slimforge.evaluate.generation import exact_match
from slimforge.modeling import load_model
from slimforge.training import train_causal_lm

def lora_accuracy(model_dir: str | Path, records: list[dict], tests: list[dict], *, steps: int, rank: int,
                  lr: float, batch_size: int, seed: int, checkpoint_dir: str | Path, device: str) -> float:
    """Mean exact match on `tests` of `model_dir` + a LoRA trained on `records`."""
    model, tokenizer = load_model(model_dir, device=device)
    model = add_lora(model, rank, 2 * rank, list(PROJECTIONS), seed=seed)
    examples = encode_records(records, tokenizer)
    train_causal_lm(model, examples, pad_id=tokenizer.pad_token_id, steps=steps, batch_size=min(batch_size, len(examples)),
                    lr=lr, warmup_steps=min(20, steps // 10), min_lr_ratio=0.1, weight_decay=0.0, grad_clip=1.0,
                    seed=seed, checkpoint_dir=checkpoint_dir, checkpoint_every=0, fingerprint="downstream",
                    progress=False)
    accuracy = exact_match(model, tokenizer, tests)
    return sum(accuracy.values()) / len(accuracy)
