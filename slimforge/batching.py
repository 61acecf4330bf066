"""Turning (prompt, response) records into token batches for training and scoring.

Loss is taken on the response tokens only (and the EOS that ends them): the prompt is given, so
spending capacity on predicting random operands would be waste.
"""

from __future__ import annotations

import random

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase


def prompt_ids(tokenizer: PreTrainedTokenizerBase, prompts: list[str]) -> list[list[int]]:
    """Token ids of prompts as the model sees them: exactly what `tokenizer(prompt)` gives a user
    (BOS first where the tokenizer adds one, as Llama's do and Qwen2's does not). The one rule for
    training, scoring and generation, so stock `generate`/`pipeline()` score like the harness."""
    return list(tokenizer(prompts)["input_ids"])


def encode_records(records: list[dict], tokenizer: PreTrainedTokenizerBase, max_len: int | None = None,
                   eos: bool = True) -> list[tuple[list[int], int]]:
    """[(token ids, number of prompt tokens)] with BOS + prompt + response + EOS (without the EOS
    when `eos` is False). Prompt and response are tokenized separately, exactly as at generation
    time (the response starts a new token)."""
    prompts = prompt_ids(tokenizer, [r["prompt"] for r in records])
    responses = tokenizer([r["response"] for r in records], add_special_tokens=False)["input_ids"]
    out = []
    for p, r in zip(prompts, responses):
        ids = p + r + ([tokenizer.eos_token_id] if eos else [])
        if max_len is not None and len(ids) > max_len:
            ids = ids[:max_len]
        out.append((ids, len(p)))
    return out


def collate(examples: list[tuple[list[int], int]], pad_id: int, pad_multiple: int = 1
            ) -> dict[str, torch.Tensor]:
    """Right-padded input_ids, attention_mask and labels (-100 outside the response). Built in
    numpy: per-row torch.tensor calls cost ~10 ms for a 1024-row batch, as long as a GPU step.
    `pad_multiple` rounds the width up (8 suits GPU tensor cores; on a CPU it only adds work)."""
    width = max(len(ids) for ids, _ in examples)
    width = -(-width // pad_multiple) * pad_multiple
    input_ids = np.full((len(examples), width), pad_id, dtype=np.int64)
    attention = np.zeros((len(examples), width), dtype=np.int64)
    labels = np.full((len(examples), width), -100, dtype=np.int64)
    for i, (ids, n_prompt) in enumerate(examples):
        input_ids[i, :len(ids)] = ids
        attention[i, :len(ids)] = 1
        labels[i, n_prompt:len(ids)] = ids[n_prompt:]
    return {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(attention),
            "labels": torch.from_numpy(labels)}


def epoch_batches(lengths: list[int], batch_size: int, seed: int, epoch: int,
                  groups: list | None = None, width: int = 16) -> list[list[int]]:
    """Index batches for one epoch. Examples are split into classes -- by `groups` when given
    (e.g. the record format: task / verify / pairwise), else by length in `width`-token bands --
    and batched at random inside their class; then the batch order is shuffled.

    Why classes, and not sorting by length: on the embedded suite, batches sorted by exact
    length (all "a+b=" with two-digit a, say) stalled training at loss 1.5 where random batches
    reached 0.14 in the same 600 steps; random batches across classes waste compute on padding
    (judge items are 2-3x longer than task items). Grouping by format pads 11% of tokens where
    16-token bands pad 22%. Mixing every class into every step as separate micro-batches was
    tried too: 25% slower on 2 CPU cores and no more stable across seeds.

    A pure function of (seed, epoch), so a resumed run sees exactly the batches the interrupted
    one would have. Each class's last partial batch is dropped so every step has the same size.
    """
    rng = random.Random(f"{seed}:{epoch}")
    order = list(range(len(lengths)))
    rng.shuffle(order)
    classes: dict = {}
    for i in order:
        key = groups[i] if groups is not None else (lengths[i] - 1) // width
        classes.setdefault(key, []).append(i)
    batches = [members[j:j + batch_size] for _, members in sorted(classes.items(), key=lambda kv: str(kv[0]))
               for j in range(0, len(members) - batch_size + 1, batch_size)]
    rng.shuffle(batches)
    return batches


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and attention mask, so every prompt ends at the last column (for generation
    and for reading next-token distributions)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s)
        mask[i, width - len(s):] = 1
    return ids, mask


def calibration_batches(records: list[dict], tokenizer, n: int, max_len: int, batch_size: int,
                        seed: int) -> list[dict[str, torch.Tensor]]:
    """`n` random records as right-padded token batches (whole sequences: prompt and response)."""
    rng = random.Random(f"{seed}:calibration")
    chosen = rng.sample(records, min(n, len(records)))
    examples = encode_records(chosen, tokenizer, max_len=max_len)
    batches = []
    for start in range(0, len(examples), batch_size):
        b = collate(examples[start:start + batch_size], tokenizer.pad_token_id)
        batches.append({"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]})
    return batches
