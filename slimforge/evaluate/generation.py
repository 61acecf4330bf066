"""Batched greedy decoding with a KV cache, and exact-match accuracy per task family."""

from __future__ import annotations

import logging

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from slimforge.batching import left_pad, prompt_ids
from slimforge.cli_util import progress
from slimforge.tasks.families import is_correct

log = logging.getLogger(__name__)


@torch.no_grad()
def greedy_generate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str],
                    max_new_tokens: int, batch_size: int = 256) -> list[str]:
    """Greedy completions (decoded, cut at EOS). Prompts are sorted by
    length before batching so left padding stays small; results come back in input order."""
    device = next(model.parameters()).device
    encoded = prompt_ids(tokenizer, prompts)
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    outputs: list[str] = [""] * len(prompts)
    bar = progress(desc="generate", total=len(prompts), unit="prompt", log=log)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        ids, mask = left_pad([encoded[i] for i in idx], tokenizer.pad_token_id)
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                             max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        for i, row in zip(idx, out[:, ids.shape[1]:].tolist()):
            if tokenizer.eos_token_id in row:
                row = row[:row.index(tokenizer.eos_token_id)]
            outputs[i] = tokenizer.decode(row, skip_special_tokens=True)
        bar.update(len(idx))
    bar.close()
    return outputs


def exact_match(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, records: list[dict],
                batch_size: int = 256) -> dict[str, float]:
    """Exact-match accuracy per family (see exact_match_hits)."""
    return {fam: sum(h) / len(h) for fam, h in exact_match_hits(model, tokenizer, records, batch_size).items()}


def exact_match_hits(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, records: list[dict],
                     batch_size: int = 256) -> dict[str, list[bool]]:
    """Per family, whether each record was answered exactly (greedy decoding, answers compared after
    trimming; the per-problem outcomes are what an interval is bootstrapped from). For a one-line
    answer only the first line of the output counts, so a model that answers and then rambles on
    (as real chat models do) is judged on its answer."""
    longest = max(len(tokenizer(r["answer"], add_special_tokens=False)["input_ids"]) for r in records)
    outputs = greedy_generate(model, tokenizer, [r["prompt"] for r in records],
                              max_new_tokens=longest + 2, batch_size=batch_size)
    hits: dict[str, list[bool]] = {}
    for rec, out in zip(records, outputs):
        if "\n" not in rec["answer"]:
            out = out.split("\n")[0]
        hits.setdefault(rec["family"], []).append(is_correct(rec["answer"], out))
    return dict(sorted(hits.items()))
