"""One RL step's rollout batch: which prompts, G samples each (plain sampling or LATR), rewards.

The same function runs in the trainer (synchronous mode) and in the rollout process (AReaL's
asynchronous mode), so both modes see exactly the same prompts and random streams for a step:
batch b's prompts and sampling seed depend only on (seed, b), never on timing, which is what lets
a killed run resume to the same result.

Under torchrun each process makes its contiguous share of the step's prompts (`part`). Every
prompt samples from its own stream, seeded by (seed, step, its slot in the step), so the shares
concatenated are the batch one process would make (the same draws; only the batched forward's
float rounding may differ with the batch's make-up).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from functools import lru_cache

import torch

from slimforge.distributed import even_parts
from slimforge.rl.latr import latr_sample, latr_share
from slimforge.rl.rewards import format_bonus, load_reward, score
from slimforge.rl.rollout import Rollouts, sample


@dataclass(frozen=True)
class RolloutSpec:
    """Everything that decides a step's rollouts (plain data: it crosses to the rollout process)."""

    prompts: tuple[tuple[str, str], ...]  # (prompt, answer) pairs to draw from
    prompts_per_step: int
    num_generations: int
    max_new_tokens: int
    temperature: float
    seed: int
    reward: str                            # module:function
    format_reward: float = 0.0
    total_steps: int = 1
    latr_share: tuple[float, float] = (0.0, 0.0)  # share of prompts with LATR at the first / last step
    latr: dict = field(default_factory=dict)      # branch_margin, branch_min_prob, lookahead, prune_threshold


def step_prompts(n: int, per_step: int, seed: int, step: int) -> list[int]:
    """Indices of step `step`'s prompts: a fresh seeded shuffle per epoch, consecutive slices."""
    per_epoch = max(1, n // per_step)
    epoch, slot = divmod(step, per_epoch)
    order = list(range(n))
    random.Random(f"{seed}:rl:{epoch}").shuffle(order)
    return order[slot * per_step:(slot + 1) * per_step]


@lru_cache(maxsize=4)
def _reward_fn(spec: str):
    return load_reward(spec)


def prompt_streams(seed: int, step: int, slots: list[int]) -> list[torch.Generator]:
    """One sampling stream per prompt slot of a step."""
    return [torch.Generator().manual_seed((seed * 1_000_003 + step) * 4099 + slot) for slot in slots]


@torch.no_grad()
def make_batch(model: torch.nn.Module, tokenizer, spec: RolloutSpec, step: int, version: int,
               part: tuple[int, int] = (0, 1)) -> dict:
    """Rollouts for step `step` with the policy of `version`: {"rollouts", "rewards" [N],
    "valid" [N] bool, "correct" [N] bool (reward function > 0), "stats"}. `part` = (rank, world):
    only this process's contiguous share of the step's prompts (the whole step by default)."""
    model.eval()
    idx = step_prompts(len(spec.prompts), spec.prompts_per_step, spec.seed, step)
    slots = even_parts(list(range(len(idx))), part[1])[part[0]]
    prompts = [spec.prompts[idx[s]][0] for s in slots]
    answers = [spec.prompts[idx[s]][1] for s in slots]
    ids = [tokenizer(p)["input_ids"] for p in prompts]
    streams = prompt_streams(spec.seed, step, slots)
    share = latr_share(step, spec.total_steps, *spec.latr_share)
    # the step's first round(share * P) prompts take LATR: this share's part of them
    n_latr = sum(s < round(share * len(idx)) for s in slots)
    common = dict(num_generations=spec.num_generations, max_new_tokens=spec.max_new_tokens,
                  temperature=spec.temperature, eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id,
                  version=version, tokenizer=tokenizer)
    parts, stats = [], {"latr_prompts": n_latr}
    if n_latr:
        tree, tree_stats = latr_sample(model, ids[:n_latr], generator=streams[:n_latr], **common, **spec.latr)
        parts.append(tree)
        stats.update({f"latr_{k}": v for k, v in tree_stats.items()})
    if n_latr < len(slots):
        plain = sample(model, ids[n_latr:], generator=streams[n_latr:], **common)
        plain.prompt_index += n_latr
        parts.append(plain)
    rollouts = parts[0] if len(parts) == 1 else Rollouts.concat(parts, tokenizer.pad_token_id)
    expanded = [a for a in answers for _ in range(spec.num_generations)]
    verified, valid = score(_reward_fn(spec.reward), expanded, rollouts.completions)
    rewards = [r + b for r, b in zip(verified, format_bonus(rollouts.completions, spec.format_reward))]
    return {"rollouts": rollouts, "rewards": torch.tensor(rewards), "valid": torch.tensor(valid),
            "correct": torch.tensor(verified) > 0, "stats": stats}
