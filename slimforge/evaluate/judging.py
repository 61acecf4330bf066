"""Reading a judge model: verdict probabilities from next-token logits (no sampling), batched,
and the perplexity score of the baseline (response log-probs through the fused kernel). The filter
stage judges with these, and so does any later stage or experiment that needs a judge's opinion.

    p = P(first verdict) / (P(first) + P(second)) = softmax over the two verdicts' logits
"""

from __future__ import annotations

import torch

from slimforge.evaluate.scoring import next_token_probs, response_logprobs
from slimforge.tasks.judge import VERDICTS, pairwise_prompt, verdict_ids, verify_prompt


def debiased_win(p_a_target_first: torch.Tensor, p_a_target_second: torch.Tensor) -> torch.Tensor:
    """P(target wins), averaged over the two orders (cancels the judge's position bias)."""
    return 0.5 * (p_a_target_first + (1.0 - p_a_target_second))


def verdict_probs(model, tokenizer, prompts: list[str], fmt: str, batch_size: int = 256) -> torch.Tensor:
    """P(first verdict: ' yes' or ' A') for each prompt, renormalised over the two verdicts.

    Where each verdict is one token (the embedded tokenizer guarantees it) the two are read from
    the next-token distribution, one forward pass per prompt. A tokenizer that splits a verdict
    into several tokens gets the log-probability of each verdict's whole token sequence after the
    prompt (teacher-forced, batched; no EOS), and the softmax over the two."""
    try:
        ids = verdict_ids(tokenizer, fmt)
    except ValueError:
        first, second = VERDICTS[fmt]
        rows = [{"prompt": p, "response": v} for v in (first, second) for p in prompts]
        sums, _ = response_logprobs(model, tokenizer, rows, max(1, batch_size // 2), eos=False)
        return torch.softmax(sums.view(2, len(prompts)).T, dim=-1)[:, 0]
    return next_token_probs(model, tokenizer, prompts, ids, batch_size)[:, 0]


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
