"""Teacher-forced scoring: response log-likelihood (perplexity) and judge verdict probabilities."""

from __future__ import annotations

import logging
import math

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kernels.logsoftmax_stats import token_logprobs
from slimforge.batching import collate, encode_records, left_pad, prompt_ids
from slimforge.cli_util import progress

log = logging.getLogger(__name__)


@torch.no_grad()
def response_logprobs(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, records: list[dict],
                      batch_size: int = 64, eos: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Per record: the summed log-prob of its response tokens (and the EOS, unless `eos` is False)
    given the prompt, and how many tokens that is (fp32 CPU tensors, input order)."""
    device = next(model.parameters()).device
    examples = encode_records(records, tokenizer, eos=eos)
    sums, counts = [], []
    for start in progress(range(0, len(examples), batch_size), desc="log-likelihood", unit="batch", log=log):
        batch = collate(examples[start:start + batch_size], tokenizer.pad_token_id)
        logits = model(input_ids=batch["input_ids"].to(device),
                       attention_mask=batch["attention_mask"].to(device)).logits[:, :-1]
        labels = batch["labels"][:, 1:].to(device)
        keep = labels != -100
        sums.append((token_logprobs(logits, labels) * keep).sum(1).float().cpu())  # fused kernel on GPU
        counts.append(keep.sum(1).float().cpu())
    return torch.cat(sums), torch.cat(counts)


def response_nll(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, records: list[dict],
                 batch_size: int = 64) -> tuple[float, int]:
    """Summed negative log-likelihood of the responses (and their EOS) given the prompts, and the
    number of tokens scored. Perplexity is exp(nll / tokens)."""
    sums, counts = response_logprobs(model, tokenizer, records, batch_size)
    return -sums.double().sum().item(), int(counts.sum())


def perplexity(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, records: list[dict],
               batch_size: int = 64) -> float:
    """Perplexity of responses given prompts (prompt tokens are conditioning, not scored)."""
    nll, count = response_nll(model, tokenizer, records, batch_size)
    return math.exp(nll / max(count, 1))


@torch.no_grad()
def next_token_probs(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str],
                     candidates: list[int], batch_size: int = 128) -> torch.Tensor:
    """(len(prompts), len(candidates)) probabilities of each candidate token right after each
    prompt, renormalised over the candidates: how a judge's verdict is read without sampling.
    (The renormalisation cancels the full-vocabulary log-sum-exp, so only the candidates' logits
    are read.) Prompts are batched by length so left padding stays small; rows return in order."""
    device = next(model.parameters()).device
    encoded = prompt_ids(tokenizer, prompts)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    out = torch.empty(len(prompts), len(candidates))
    for start in progress(range(0, len(order), batch_size), desc="next-token probs", unit="batch", log=log):
        idx = order[start:start + batch_size]
        ids, mask = left_pad([encoded[i] for i in idx], tokenizer.pad_token_id)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), logits_to_keep=1).logits[:, -1]
        out[idx] = torch.softmax(logits.float()[:, candidates], dim=-1).cpu()
    return out
