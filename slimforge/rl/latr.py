"""LATR: lookahead tree-based rollouts ("Lookahead Tree-Based Rollouts for Enhanced Trajectory-Level
Exploration in Reinforcement Learning with Verifiable Rewards", Xing et al. 2025).

Plain sampling of G completions tends to give G near-copies of one reasoning path: token-level noise
rarely changes the trajectory, so the group's rewards agree and GRPO's advantages vanish. LATR grows
the group as a tree instead, forcing splits where the model is genuinely torn between two tokens and
keeping a split only if it leads somewhere else:

1. Branch. All live branches of a prompt decode together, one token per step. A branch splits when
   its two most likely next tokens are close and the second is likely in its own right:
   p1 - p2 < branch_margin and p2 > branch_min_prob (probabilities of the temperature-scaled
   distribution). The original branch keeps its *sampled* token, so it remains an ordinary sample;
   the new branch takes the other of the top two (the second token, or the first when the second is
   what was sampled), so the two always differ.
2. Lookahead. The new branch then decodes `lookahead` ordinary sampled tokens alongside its parent.
   While in this window it may not split itself.
3. Prune. If over that window its tokens stay close to its parent's (normalised edit distance
   < prune_threshold) the split changed nothing and the branch is dropped, freeing its slot.

A prompt holds at most G = num_generations branches (pending ones included); once the cap is reached,
or when no split qualifies, decoding is ordinary sampling. A tree that ends with fewer than G branches
is topped up with ordinary samples, so every prompt has exactly G samples in the usual group layout.
Recorded log-probs are those of the tokens actually taken under the temperature-scaled distribution
(the forced token's included), so the decoupled PPO loss treats them like any other behaviour policy.

For simplicity each prompt is decoded on its own with its branches as one batch, recomputing the
whole sequence each step (no KV cache: branches split and die, which a cache would have to follow).
Quadratic in length, which is fine for the short answers RL trains on here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from slimforge import SlimforgeError
from slimforge.rl.rollout import (
    Rollouts,
    check_sampling_args,
    pick,
    sample,
    token_versions,
)


@dataclass(eq=False)  # identity: `branches.remove` must drop this branch, not an equal-looking one
class _Branch:
    tokens: list[int] = field(default_factory=list)
    logps: list[float] = field(default_factory=list)
    parent: _Branch | None = None  # set while the branch is in its lookahead window
    start: int = -1                # completion step of the token it branched with
    done: bool = False


def normalized_edit_distance(a: list[int], b: list[int]) -> float:
    """Levenshtein distance / max(len(a), len(b)); 0 for two empty lists."""
    if not a and not b:
        return 0.0
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1] / max(len(a), len(b))


def latr_share(step: int, total_steps: int, start: float, end: float) -> float:
    """Share of prompts rolled out with LATR at `step` (0-based): linear from `start` at step 0 to
    `end` at the last step, total_steps - 1 (the paper anneals LATR away as the policy learns to
    explore by itself), clamped outside that range."""
    if not (0 <= start <= 1 and 0 <= end <= 1):
        raise SlimforgeError(f"LATR share start={start} and end={end} must both lie in [0, 1]")
    if total_steps <= 1:
        return end
    frac = min(max(step / (total_steps - 1), 0.0), 1.0)
    return start + (end - start) * frac


@torch.no_grad()
def _grow(model, prompt: list[int], *, num_generations: int, max_new_tokens: int, temperature: float,
          eos_id: int, generator: torch.Generator | None, branch_margin: float, branch_min_prob: float,
          lookahead: int, prune_threshold: float, at: list[int]) -> tuple[list[_Branch], int, int]:
    """One prompt's tree: (surviving branches, created, pruned); `at[t]` counts splits at step t."""
    device = next(model.parameters()).device
    branches, created, pruned = [_Branch()], 0, 0
    for step in range(max_new_tokens):
        live = [b for b in branches if not b.done]
        ids = torch.tensor([prompt + b.tokens for b in live], device=device)
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), logits_to_keep=1).logits[:, -1]
        token, token_logp = pick(logits, temperature, 0, generator)
        logp = torch.log_softmax(logits.float() / temperature, dim=-1)
        top_p, top_i = logp.exp().topk(2, dim=-1)
        for j, b in enumerate(live):
            tok, (p1, p2), (i1, i2) = int(token[j]), top_p[j].tolist(), top_i[j].tolist()
            if (len(branches) < num_generations and b.parent is None
                    and p1 - p2 < branch_margin and p2 > branch_min_prob):
                alt = i2 if tok != i2 else i1
                branches.append(_Branch(b.tokens + [alt], b.logps + [float(logp[j, alt])], parent=b,
                                        start=step, done=alt == eos_id))
                created += 1
                at[step] += 1
            b.tokens.append(tok)
            b.logps.append(float(token_logp[j]))
            b.done = tok == eos_id
        finished = step == max_new_tokens - 1 or all(b.done for b in branches)
        for c in [b for b in branches if b.parent is not None]:
            if step - c.start < lookahead and not finished:
                continue  # window not complete (a branch that already ended waits for its parent's)
            window = slice(c.start + 1, c.start + 1 + lookahead)
            if normalized_edit_distance(c.tokens[window], c.parent.tokens[window]) < prune_threshold:
                branches.remove(c)
                pruned += 1
            else:
                c.parent = None
        if finished:
            break
    return branches, created, pruned


def _tree_rollouts(prompt: list[int], branches: list[_Branch], pad_id: int, version: int,
                   device: torch.device) -> Rollouts:
    """One prompt's branches as right-padded rows (the prompt is the same, so no left padding)."""
    n_prompt = len(prompt)
    width = n_prompt + max(len(b.tokens) for b in branches)
    ids = torch.full((len(branches), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    logprobs = torch.zeros(ids.shape, dtype=torch.float32)
    for r, b in enumerate(branches):
        end = n_prompt + len(b.tokens)
        ids[r, :end] = torch.tensor(prompt + b.tokens)
        mask[r, :end] = 1
        logprobs[r, n_prompt:end] = torch.tensor(b.logps)
    completion = mask.bool()
    completion[:, :n_prompt] = False
    index = torch.zeros(len(branches), dtype=torch.long)
    return Rollouts(*(t.to(device) for t in (ids, mask, completion, logprobs,
                                             token_versions(completion, version), index)), [])


def latr_sample(model, prompt_ids: list[list[int]], *, num_generations: int, max_new_tokens: int,
                temperature: float = 1.0, eos_id: int, pad_id: int,
                generator: torch.Generator | list[torch.Generator] | None = None, version: int = 0,
                branch_margin: float = 0.2, branch_min_prob: float = 0.2, lookahead: int = 4,
                prune_threshold: float = 0.3, tokenizer=None) -> tuple[Rollouts, dict]:
    """LATR rollouts of each prompt (exactly G = num_generations per prompt, layout i*G..i*G+G-1)
    and stats: branches created and pruned (totals), kept_per_prompt (mean surviving splits),
    topped_up (ordinary samples added to fill groups), branch_positions (splits per completion step).
    `generator`: one stream for all prompts, or a list with one per prompt."""
    if temperature <= 0:
        raise SlimforgeError(f"LATR needs temperature > 0 (it branches on sampling probabilities), got {temperature}")
    check_sampling_args(prompt_ids, num_generations, max_new_tokens, temperature, 0)
    if lookahead < 1:
        raise SlimforgeError(f"LATR lookahead must be >= 1 token, got {lookahead}")
    device = next(model.parameters()).device
    at = [0] * max_new_tokens
    parts, created, pruned, topped = [], 0, 0, 0
    was_training = model.training
    model.eval()
    try:
        for i, prompt in enumerate(prompt_ids):
            stream = generator[i] if isinstance(generator, list) else generator
            branches, c, p = _grow(model, prompt, num_generations=num_generations, max_new_tokens=max_new_tokens,
                                   temperature=temperature, eos_id=eos_id, generator=stream,
                                   branch_margin=branch_margin, branch_min_prob=branch_min_prob,
                                   lookahead=lookahead, prune_threshold=prune_threshold, at=at)
            created, pruned = created + c, pruned + p
            part = _tree_rollouts(prompt, branches, pad_id, version, device)
            if len(branches) < num_generations:
                extra = num_generations - len(branches)
                topped += extra
                part = Rollouts.concat([part, sample(model, [prompt], num_generations=extra,
                                                     max_new_tokens=max_new_tokens, temperature=temperature,
                                                     eos_id=eos_id, pad_id=pad_id, generator=stream,
                                                     version=version)], pad_id)
            part.prompt_index.fill_(i)
            parts.append(part)
    finally:
        model.train(was_training)
    out = Rollouts.concat(parts, pad_id)
    if tokenizer is not None:
        out.completions = out.decode(tokenizer, eos_id)
    stats = {"created": created, "pruned": pruned, "kept_per_prompt": (created - pruned) / max(len(prompt_ids), 1),
             "topped_up": topped, "branch_positions": at}
    return out, stats
