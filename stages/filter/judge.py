"""Reading a judge model: verdict probabilities from next-token log-probs (no sampling), batched,
through the fused log-softmax kernel; and the perplexity score of the baseline.

    p = P(first verdict) / (P(first) + P(second)) = sigmoid(logp(first) - logp(second))
"""

from __future__ import annotations

import torch

from kernels.logsoftmax_stats import token_logprobs
from slimforge.batching import left_pad, prompt_ids
from slimforge.evaluate.scoring import response_logprobs
from slimforge.tasks.judge import pairwise_prompt, verdict_ids, verify_prompt
from stages.filter.ranking import debiased_win


@torch.no_grad()
def verdict_probs(model, tokenizer, prompts: list[str], fmt: str, batch_size: int = 256) -> torch.Tensor:
    """P(first verdict: ' yes' or ' A') for each prompt, renormalised over the two verdicts.
    Prompts are sorted by length so left padding stays small; results return in input order."""
    device = next(model.parameters()).device
    pos, neg = verdict_ids(tokenizer, fmt)
    encoded = prompt_ids(tokenizer, prompts)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    out = torch.empty(len(prompts))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        ids, mask = left_pad([encoded[i] for i in idx], tokenizer.pad_token_id)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), logits_to_keep=1).logits[:, -1]
        target = lambda tok: torch.full((len(idx),), tok, device=device)  # noqa: E731
        diff = token_logprobs(logits, target(pos)) - token_logprobs(logits, target(neg))
        out[idx] = torch.sigmoid(diff.float()).cpu()
    return out


def pairwise_win_probs(model, tokenizer, targets: list[dict], refs: list[list[dict]], batch_size: int = 256
                       ) -> torch.Tensor:
    """(T, N) debiased probability that each target beats each of its references."""
    first, second = [], []
    for t, rs in zip(targets, refs):
        for r in rs:
            first.append(pairwise_prompt((t["prompt"], t["response"]), (r["prompt"], r["response"])))
            second.append(pairwise_prompt((r["prompt"], r["response"]), (t["prompt"], t["response"])))
    p = verdict_probs(model, tokenizer, first + second, "pairwise", batch_size)
    n = len(first)
    shape = (len(targets), len(refs[0]) if refs else 0)
    return debiased_win(p[:n], p[n:]).view(shape)


def direct_probs(model, tokenizer, records: list[dict], batch_size: int = 256) -> torch.Tensor:
    """The single-response baseline: P(' yes') to 'Is this correct?' per record."""
    return verdict_probs(model, tokenizer, [verify_prompt(r["prompt"], r["response"]) for r in records],
                         "verify", batch_size)


def mean_logprob(model, tokenizer, records: list[dict], batch_size: int = 256) -> torch.Tensor:
    """The perplexity baseline: mean log-prob per response token (higher = more plausible)."""
    sums, counts = response_logprobs(model, tokenizer, records, batch_size)
    return sums / counts.clamp(min=1)
