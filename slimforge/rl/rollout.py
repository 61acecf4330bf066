"""Rollouts for RL post-training: G sampled completions per prompt, decoded step by step on the
model's KV cache, with the behaviour log-prob and policy version of every generated token.

Group layout: samples i*G .. i*G+G-1 answer prompt i, which is what group-relative advantages
(GRPO, "DeepSeekMath", Shao et al. 2024; DAPO; Dr.GRPO) normalise over. The recorded log-probs are
those of the distribution each token was actually drawn from (softmax(logits / temperature),
restricted to the top k when top_k > 0): the behaviour policy of the decoupled PPO objective in
AReaL (Fu et al. 2025), where a sample may come from an older policy version than the one trained.

Left padding needs care: a row's positions count its real tokens only (cumsum of the attention
mask), both while sampling and in `sequence_logprobs`, so the two give the same numbers (and the
same tokens as `model.generate`, which positions rows the same way).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache, PreTrainedTokenizerBase

from kernels.logsoftmax_stats import token_logprobs
from slimforge import SlimforgeError
from slimforge.batching import left_pad
from slimforge.modeling import cache_kwarg

Tensor = torch.Tensor


@dataclass
class Rollouts:
    """N samples; per-token tensors are [N, T], column t concerns token input_ids[:, t]."""
    input_ids: Tensor        # left-padded prompt + completion, right-padded with pad_id
    attention_mask: Tensor   # 1 on real tokens (prompt and completion, EOS included)
    completion_mask: Tensor  # bool, True on generated tokens (up to and including EOS)
    logprobs: Tensor         # float32 behaviour log-prob of each generated token, 0 elsewhere
    versions: Tensor         # int64 policy version that generated each token, -1 elsewhere
    prompt_index: Tensor     # [N] int64 index of the prompt each sample answers (group id)
    completions: list[str]   # decoded completions (empty list when no tokenizer was given)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, keep: Tensor) -> Rollouts:
        """The samples where `keep` ([N] bool) is True, e.g. groups kept by dynamic sampling."""
        keep = keep.to(device=self.input_ids.device, dtype=torch.bool)
        kept = keep.nonzero().flatten().tolist()
        return Rollouts(self.input_ids[keep], self.attention_mask[keep], self.completion_mask[keep],
                        self.logprobs[keep], self.versions[keep], self.prompt_index[keep.to(self.prompt_index.device)],
                        [self.completions[i] for i in kept] if self.completions else [])

    @staticmethod
    def concat(parts: list[Rollouts], pad_id: int) -> Rollouts:
        """Stack samples, right-padding every per-token tensor to the widest part (prompts stay where
        they are: positions come from the attention mask, so a row's padding never matters).
        prompt_index is kept as given: the caller offsets it when parts answer different prompt lists."""
        width = max(p.input_ids.shape[1] for p in parts)

        def cat(name: str, fill) -> Tensor:
            return torch.cat([F.pad(getattr(p, name), (0, width - p.input_ids.shape[1]), value=fill) for p in parts])

        texts = [t for p in parts for t in p.completions] if all(p.completions for p in parts) else []
        return Rollouts(cat("input_ids", pad_id), cat("attention_mask", 0), cat("completion_mask", False),
                        cat("logprobs", 0.0), cat("versions", -1),
                        torch.cat([p.prompt_index for p in parts]), texts)

    def completion_ids(self) -> list[list[int]]:
        """Generated token ids of each sample (EOS included where one was emitted)."""
        return [row[m].tolist() for row, m in zip(self.input_ids.cpu(), self.completion_mask.cpu())]

    def decode(self, tokenizer: PreTrainedTokenizerBase, eos_id: int) -> list[str]:
        """Completion texts, cut at EOS, special tokens skipped."""
        return [tokenizer.decode([t for t in ids if t != eos_id], skip_special_tokens=True)
                for ids in self.completion_ids()]


def positions(attention_mask: Tensor) -> Tensor:
    """Position ids that count real tokens only (left pads get 0, as `generate` gives them)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def token_versions(completion_mask: Tensor, version: int) -> Tensor:
    """`version` on generated tokens, -1 elsewhere."""
    return torch.where(completion_mask, version, -1).long()


Generators = torch.Generator | list[torch.Generator] | None


def _draw(probs: Tensor, generator: Generators) -> Tensor:
    """One token per row. A list holds one generator per group of rows (len(probs) / len(list)
    each): a prompt's samples then depend on its own stream only, not on which other prompts share
    the batch, so prompts split across processes draw what one process would."""
    if not isinstance(generator, list):
        if generator is not None:
            probs = probs.to(generator.device)
        return torch.multinomial(probs, 1, generator=generator).flatten()
    group = len(probs) // len(generator)
    probs = probs.to(generator[0].device)
    return torch.cat([torch.multinomial(probs[i * group:(i + 1) * group], 1, generator=g).flatten()
                      for i, g in enumerate(generator)])


def pick(logits: Tensor, temperature: float, top_k: int, generator: Generators) -> tuple[Tensor, Tensor]:
    """(next token [B], its log-prob [B] under the distribution it was drawn from). Temperature 0 is
    greedy; its log-prob is taken at temperature 1 (a point mass would record 0 and say nothing).
    `generator`: one stream, or one per equal group of rows (see `_draw`)."""
    logits = logits.float()
    if temperature > 0:
        logits = logits / temperature
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    logp = torch.log_softmax(logits, dim=-1)
    if temperature == 0:
        token = logp.argmax(-1)
    else:
        token = _draw(logp.exp(), generator).to(logp.device)
    return token, logp.gather(-1, token[:, None]).flatten()


def check_sampling_args(prompt_ids: list[list[int]], num_generations: int, max_new_tokens: int,
                        temperature: float, top_k: int) -> None:
    """One clear error before any decoding (shared with LATR)."""
    if not prompt_ids or not all(prompt_ids):
        raise SlimforgeError("rollouts need at least one prompt, and every prompt at least one token")
    if num_generations < 1 or max_new_tokens < 1:
        raise SlimforgeError(f"num_generations={num_generations} and max_new_tokens={max_new_tokens} must both be >= 1")
    if temperature < 0 or top_k < 0:
        raise SlimforgeError(f"temperature={temperature} and top_k={top_k} must be >= 0 (0 means greedy / no top-k)")


@torch.no_grad()
def _sample_chunk(model, prompts: list[list[int]], *, max_new_tokens: int, temperature: float, top_k: int,
                  eos_id: int, pad_id: int, generator: Generators) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One batch: (input_ids, attention_mask, completion_mask, logprobs), completion right-padded."""
    device = next(model.parameters()).device
    ids, mask = (t.to(device) for t in left_pad(prompts, pad_id))
    pos = positions(mask)
    cache = {cache_kwarg(model): DynamicCache()}
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                   logits_to_keep=1, **cache).logits[:, -1]
    pos = pos[:, -1:]
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    tokens, logps, alive_cols = [], [], []
    for step in range(max_new_tokens):
        token, logp = pick(logits, temperature, top_k, generator)
        alive = ~done
        tokens.append(torch.where(alive, token, pad_id))
        logps.append(torch.where(alive, logp, 0.0))
        alive_cols.append(alive)
        done = done | (token == eos_id)
        if done.all() or step == max_new_tokens - 1:
            break
        # a finished row is fed a pad, masked out for every later step; its outputs are ignored
        mask = torch.cat([mask, alive.long()[:, None]], 1)
        pos = pos + 1
        logits = model(input_ids=tokens[-1][:, None], attention_mask=mask, position_ids=pos, use_cache=True,
                       **cache).logits[:, -1]
    gen_mask = torch.stack(alive_cols, 1)
    input_ids = torch.cat([ids, torch.stack(tokens, 1)], 1)
    attention = torch.cat([mask[:, :ids.shape[1]], gen_mask.long()], 1)
    completion = torch.cat([torch.zeros_like(ids, dtype=torch.bool), gen_mask], 1)
    logprobs = torch.cat([torch.zeros(ids.shape, device=device), torch.stack(logps, 1)], 1)
    return input_ids, attention, completion, logprobs


@torch.no_grad()
def sample(model, prompt_ids: list[list[int]], *, num_generations: int, max_new_tokens: int,
           temperature: float = 1.0, top_k: int = 0, eos_id: int, pad_id: int,
           generator: Generators = None, version: int = 0, batch_size: int = 256,
           tokenizer: PreTrainedTokenizerBase | None = None) -> Rollouts:
    """`num_generations` samples of each prompt (group layout i*G..i*G+G-1), decoded on the KV
    cache in chunks of whole groups (about `batch_size` rows). Rows stop at EOS. `completions` is
    filled when `tokenizer` is given (else empty: call `Rollouts.decode`). `generator`: one stream
    for all, or a list with one per prompt (what `batch.make_batch` gives, so a prompt's samples
    do not depend on the others in its batch)."""
    check_sampling_args(prompt_ids, num_generations, max_new_tokens, temperature, top_k)
    if isinstance(generator, list) and len(generator) != len(prompt_ids):
        raise SlimforgeError(f"{len(generator)} generators for {len(prompt_ids)} prompts: give one per prompt")
    was_training = model.training
    model.eval()
    per_chunk = max(1, batch_size // num_generations)
    parts = []
    try:
        for start in range(0, len(prompt_ids), per_chunk):
            chunk = prompt_ids[start:start + per_chunk]
            rows = [p for p in chunk for _ in range(num_generations)]
            ids, attention, completion, logprobs = _sample_chunk(
                model, rows, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                eos_id=eos_id, pad_id=pad_id,
                generator=generator[start:start + per_chunk] if isinstance(generator, list) else generator)
            index = torch.arange(start, start + len(chunk), device=ids.device).repeat_interleave(num_generations)
            parts.append(Rollouts(ids, attention, completion, logprobs, token_versions(completion, version), index, []))
    finally:
        model.train(was_training)
    out = Rollouts.concat(parts, pad_id)
    if tokenizer is not None:
        out.completions = out.decode(tokenizer, eos_id)
    return out


def sequence_logprobs(model, rollouts: Rollouts, temperature: float = 1.0) -> Tensor:
    """Log-prob [N, T] of each completion token under `model` at `temperature` (0 counts as 1, as in
    `sample`), aligned to positions (column 0 is 0), 0 outside the completion. One forward pass,
    positioned as in `sample` so the numbers match; gradients flow when the model's parameters
    require them (current-policy log-probs), so the caller wraps reference passes in no_grad."""
    mask = rollouts.attention_mask
    logits = model(input_ids=rollouts.input_ids, attention_mask=mask, position_ids=positions(mask)).logits[:, :-1]
    if temperature > 0:
        logits = logits / temperature
    targets = rollouts.input_ids[:, 1:].masked_fill(~rollouts.completion_mask[:, 1:], -100)
    return F.pad(token_logprobs(logits, targets), (1, 0))
