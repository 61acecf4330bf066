"""The RL training loop: GRPO / DAPO / Dr. GRPO on verifiable rewards, synchronous or asynchronous.

Each step takes one rollout batch (`batch.make_batch`: P prompts x G samples, rewards), computes
group-normalised advantages, drops groups whose rewards are all equal (DAPO's dynamic sampling) or
whose verifier failed, and makes `num_iterations` policy updates with the clipped loss
(`losses.policy_loss`). Only the adapter trains; the reference for the KL term is the policy as RL
found it (the adapter's weights at step 0: after a supervised warm-up that is the warmed-up policy,
without one it is the model with the adapter off). Optionally (InstructGPT's PPO-ptx) each update
adds `replay_coef` x the supervised loss on a seeded batch of replay rows, so the adapter keeps
what the policy knew on other tasks.

Synchronous (max_staleness 0): the trainer generates each batch itself with the current policy.
Asynchronous (AReaL, max_staleness eta > 0): a rollout process generates batch b with whatever
policy version v it last received, as long as v >= b - eta, while the trainer updates; the loss
is then AReaL's decoupled PPO objective, with the proximal policy = the trainer's weights before
this batch's update, so staleness is corrected by the importance weight proximal/behaviour.

The checkpoint holds the adapter, optimizer, schedule and history, and batch b depends only on
(seed, b) and the weights, so a killed synchronous run resumes to the same adapter.

Under torchrun (slimforge.distributed) each process samples its contiguous share of the step's
prompts (each prompt from its own seeded stream), computes its groups' advantages (a group never
spans processes), and divides its summed loss terms by the whole batch's normaliser; the adapter's
gradients are summed over processes, so every process makes the update one process would (up to
float rounding) and the adapters stay identical. Per-step metrics are the whole batch's.
"""

from __future__ import annotations

import functools
import logging
import math
import random
import time
import warnings
from collections import Counter
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch

from slimforge import SlimforgeError, distributed
from slimforge.batching import collate
from slimforge.checkpoint import load_checkpoint, save_checkpoint
from slimforge.cli_util import progress
from slimforge.config import Schedule
from slimforge.rl.asynchronous import AsyncRollouts
from slimforge.rl.batch import RolloutSpec, make_batch
from slimforge.rl.losses import group_advantages, informative_groups, loss_normaliser, policy_loss
from slimforge.rl.rollout import sequence_logprobs
from slimforge.training import make_optimizer, make_scheduler

log = logging.getLogger(__name__)


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights that train (the adapter), detached CPU copies: what a rollout process needs."""
    return {k: p.detach().cpu().clone() for k, p in model.named_parameters() if p.requires_grad}


@functools.lru_cache(maxsize=2)
def _tokenizer(folder: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def worker_rollout(tokenizer_dir: str, spec: RolloutSpec, model: torch.nn.Module, batch_index: int, version: int,
                   part: tuple[int, int] = (0, 1)) -> dict:
    """make_batch in the rollout process (top-level, so it pickles for a spawned process)."""
    return make_batch(model, _tokenizer(tokenizer_dir), spec, batch_index, version, part)


def _group_mask(per_sample: torch.Tensor, group_size: int) -> torch.Tensor:
    """True for every sample of a group whose samples are all True."""
    return per_sample.view(-1, group_size).all(dim=1).repeat_interleave(group_size)


def train_rl(policy: torch.nn.Module, tokenizer, spec: RolloutSpec, schedule: Schedule, *, checkpoint_dir: str | Path,
             fingerprint: str, loss_type: str = "dapo", epsilon: float = 0.2, epsilon_high: float | None = None,
             beta: float = 0.0, num_iterations: int = 1, scale_rewards: bool = True, dynamic_sampling: bool = True,
             max_staleness: int = 0, behaviour_cap: float | None = 5.0,
             build_policy: Callable[[], torch.nn.Module] | None = None, tokenizer_dir: str | None = None,
             replay: list[tuple[list[int], int]] | None = None, replay_coef: float = 0.0, replay_batch_size: int = 32,
             on_log: Callable[[int, dict], None] | None = None, desc: str = "rl") -> dict:
    """Train `policy`'s adapter (its requires_grad parameters) for `schedule.steps` steps of
    `spec.prompts_per_step` prompts. Asynchronous mode (max_staleness > 0) needs `build_policy`
    (a picklable callable that builds the same model in the rollout process) and `tokenizer_dir`.
    Returns {"history": per-step metrics, "staleness": {k: batches}, "failed_rewards", "seconds",
    "samples_per_s" (samples in updates per second), "rollout_tokens_per_s", "train_tokens_per_s",
    "latr": summed LATR statistics, "resumed_from"}. `replay`: encoded (ids, n_prompt) rows for the
    PPO-ptx term (`replay_coef` > 0), `replay_batch_size` of them per update."""
    if max_staleness and (build_policy is None or tokenizer_dir is None):
        raise SlimforgeError("max_staleness > 0 runs rollouts in another process: give build_policy and tokenizer_dir")
    G, steps = spec.num_generations, schedule.steps
    part = (distributed.rank(), distributed.world_size())
    if spec.prompts_per_step < part[1]:
        raise SlimforgeError(f"{spec.prompts_per_step} prompts per step cannot feed {part[1]} processes: "
                             f"use train.batch_size >= {part[1]}")
    optimizer = make_optimizer(policy, schedule.lr, schedule.weight_decay)
    scheduler = make_scheduler(optimizer, steps, min(schedule.warmup_steps, steps), schedule.min_lr_ratio)
    history, start, reference = [], 0, trainable_state(policy)
    state = load_checkpoint(checkpoint_dir, fingerprint)
    if state is not None:
        reference = state["reference"]
        policy.load_state_dict(state["adapter"], strict=False)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        history, start = list(state["history"]), int(state["step"])
    trainable = [p for p in policy.parameters() if p.requires_grad]
    pool = (AsyncRollouts(build_policy, functools.partial(worker_rollout, tokenizer_dir, spec, part=part),
                          trainable_state(policy),
                          max_staleness=max_staleness, total_batches=steps, start_batch=start, start_version=start)
            if max_staleness else nullcontext())
    bar = progress(desc=desc, total=steps, initial=start, unit="step", log=log)
    started, rollout_s, train_s, rollout_tokens, train_tokens = time.perf_counter(), 0.0, 0.0, 0, 0
    staleness, failed, latr = Counter(), 0, Counter()
    with pool:
        for step in range(start, steps):
            t0 = time.perf_counter()
            if max_staleness:
                b, version, batch = pool.next_batch()
                assert b == step, f"rollout batch {b} arrived for step {step}"
            else:
                version, batch = step, make_batch(policy, tokenizer, spec, step, step, part)
            t1 = time.perf_counter()
            r, rewards = batch["rollouts"], batch["rewards"]
            staleness[step - version] += 1
            advantages = group_advantages(rewards, G, scale=scale_rewards)
            keep = _group_mask(batch["valid"], G)
            if dynamic_sampling:
                keep &= informative_groups(rewards, G)
            kept = r.select(keep)
            ptx = (_replay_batch(replay, replay_batch_size, spec.seed, step, tokenizer.pad_token_id, part)
                   if replay and replay_coef > 0 else None)
            whole = _whole_batch(batch, keep, G, loss_normaliser(kept.completion_mask, loss_type, spec.max_new_tokens),
                                 0 if ptx is None else int((ptx["labels"][:, 1:] != -100).sum()))
            failed += whole["failed"]
            latr.update(whole["latr"])
            logs = _update(policy, trainable, optimizer, kept, advantages[keep], spec, schedule, step,
                           loss_type=loss_type, epsilon=epsilon, epsilon_high=epsilon_high, beta=beta,
                           num_iterations=num_iterations, decoupled=bool(max_staleness),
                           behaviour_cap=behaviour_cap, reference=reference, normaliser=whole["normaliser"],
                           replay=ptx, replay_coef=replay_coef, replay_share=whole["replay_share"]
                           ) if whole["kept"] else {}
            with warnings.catch_warnings():  # a step whose groups were all dropped made no update: the
                warnings.simplefilter("ignore", UserWarning)  # schedule still follows the step count
                scheduler.step()
            if max_staleness:
                pool.publish(trainable_state(policy), step + 1)
            t2 = time.perf_counter()
            rollout_s, train_s = rollout_s + t1 - t0, train_s + t2 - t1
            rollout_tokens += whole["generated"]
            train_tokens += whole["trained"] * num_iterations
            groups = whole["correct"].view(-1, G)
            history.append({"step": step + 1, "reward": float(whole["rewards"].mean()),
                            "correct": float(whole["correct"].float().mean()),
                            "pass_at_g": float(groups.any(dim=1).float().mean()),  # a group with >= 1 right
                            "distinct": sum(whole["distinct"]) / len(whole["distinct"]),  # share of a group's
                            "completion_length": whole["generated"] / len(whole["rewards"]),  # samples that differ
                            "kept": whole["kept"] / len(whole["rewards"]), "samples": whole["kept"],
                            "failed": whole["failed"], "staleness": step - version,
                            "rollout_seconds": t1 - t0, "update_seconds": t2 - t1, **logs})
            bar.update(1)
            bar.set_postfix(correct=f"{history[-1]['correct']:.2f}")
            if on_log is not None:
                on_log(step + 1, {k: v for k, v in history[-1].items() if k != "step"})
            if schedule.checkpoint_every and (step + 1) % schedule.checkpoint_every == 0 and step + 1 < steps:
                save_checkpoint(checkpoint_dir, {"adapter": trainable_state(policy), "optimizer": optimizer.state_dict(),
                                                 "scheduler": scheduler.state_dict(), "step": step + 1, "reference": reference,
                                                 "history": history, "fingerprint": fingerprint})
    bar.close()
    seconds = time.perf_counter() - started
    run_history = history[start:]
    return {"history": history, "staleness": dict(sorted(staleness.items())), "failed_rewards": failed,
            "seconds": seconds, "rollout_seconds": rollout_s, "train_seconds": train_s,
            "samples_per_s": sum(h["samples"] for h in run_history) / max(seconds, 1e-9),
            "rollout_tokens_per_s": rollout_tokens / max(rollout_s, 1e-9),
            "train_tokens_per_s": train_tokens / max(train_s, 1e-9), "latr": dict(latr), "resumed_from": start}


def _whole_batch(batch: dict, keep: torch.Tensor, group_size: int, normaliser: torch.Tensor, replay_tokens: int
                 ) -> dict:
    """This step's numbers over every process's share (one all-gather; this share's own in a single
    process): rewards and correct [N] in prompt order, kept / generated / trained / failed counts,
    distinct share per group, summed LATR counts, the loss normaliser, and this share's part of the
    replay tokens (the weight of its replay loss, a mean over its own tokens)."""
    r = batch["rollouts"]
    mine = {"rewards": batch["rewards"].float(), "correct": batch["correct"].cpu(), "kept": int(keep.sum()),
            "generated": int(r.completion_mask.sum()), "trained": int(r.completion_mask[keep].sum()),
            "failed": int((~batch["valid"]).sum()), "normaliser": float(normaliser), "replay_tokens": replay_tokens,
            "distinct": [len(set(r.completions[i:i + group_size])) / group_size
                         for i in range(0, len(r), group_size)],
            # counts add up over steps and processes; means do not
            "latr": {k: v for k, v in batch["stats"].items() if isinstance(v, int) and "per_prompt" not in k}}
    parts = distributed.gather_objects(mine)
    latr = Counter()
    for p in parts:
        latr.update(p["latr"])
    return {"rewards": torch.cat([p["rewards"] for p in parts]), "correct": torch.cat([p["correct"] for p in parts]),
            **{k: sum(p[k] for p in parts) for k in ("kept", "generated", "trained", "failed", "normaliser")},
            "distinct": [d for p in parts for d in p["distinct"]], "latr": latr,
            "replay_share": replay_tokens / max(1, sum(p["replay_tokens"] for p in parts))}


def _replay_batch(replay: list, batch_size: int, seed: int, step: int, pad_id: int, part: tuple[int, int] = (0, 1)
                  ) -> dict:
    """Step `step`'s replay rows (this process's share of them): seeded by (seed, step), so a
    resumed run draws the same ones."""
    rng = random.Random(f"{seed}:ptx:{step}")
    rows = [replay[rng.randrange(len(replay))] for _ in range(batch_size)]
    return collate(distributed.rank_slice(rows, part[1], part[0]), pad_id)


def _reference_logprobs(policy, reference: dict, r, temperature: float) -> torch.Tensor:
    """Log-probs of the rollouts under the reference: the adapter's step-0 weights swapped in for
    one forward pass (a second model copy would double the memory for a few adapter weights)."""
    current = trainable_state(policy)
    policy.load_state_dict(reference, strict=False)
    try:
        return sequence_logprobs(policy, r, temperature)
    finally:
        policy.load_state_dict(current, strict=False)


def _update(policy, trainable, optimizer, r, advantages, spec: RolloutSpec, schedule: Schedule, step: int, *,
            loss_type, epsilon, epsilon_high, beta, num_iterations, decoupled, behaviour_cap, reference,
            normaliser=None, replay=None, replay_coef=0.0, replay_share=1.0) -> dict:
    """`num_iterations` clipped-policy updates on one (filtered) rollout batch, this process's share
    of it (possibly empty); logs of the last, over the whole batch. `normaliser`: the whole batch's
    `loss_normaliser` (None: this share's own); `replay_share`: this share's part of the replay tokens (the replay loss is a
    mean over this share's tokens, so weighted by it the shares add up to the whole batch's mean)."""
    policy.train()
    with torch.no_grad():
        proximal = sequence_logprobs(policy, r, spec.temperature) if decoupled and len(r) else None
        ref = _reference_logprobs(policy, reference, r, spec.temperature) if beta > 0 and len(r) else None
    tokens = int(r.completion_mask.sum())
    for _ in range(num_iterations):
        optimizer.zero_grad(set_to_none=True)
        loss, logs = torch.zeros(()), {}
        if len(r):
            logp = sequence_logprobs(policy, r, spec.temperature)
            loss, logs = policy_loss(logp, r.logprobs, advantages, r.completion_mask, loss_type=loss_type,
                                     epsilon=epsilon, epsilon_high=epsilon_high, proximal_logp=proximal,
                                     behaviour_cap=behaviour_cap if decoupled else None, ref_logp=ref, beta=beta,
                                     max_completion_length=spec.max_new_tokens, normaliser=normaliser)
        if replay is not None:
            device = next(policy.parameters()).device
            ptx = policy(**{k: v.to(device) for k, v in replay.items()}).loss * replay_share
            loss = loss.to(device) + replay_coef * ptx
        if loss.requires_grad:
            loss.backward()
        # the whole batch's loss, and its token-weighted logs; every process sees the same and
        # raises together (one raising alone would leave the others waiting in the next collective)
        reports = distributed.gather_objects((loss.item(), tokens, {k: float(v) for k, v in logs.items()},
                                              ptx.item() if replay is not None else 0.0))
        total = sum(rep[0] for rep in reports)
        if not math.isfinite(total):
            raise SlimforgeError(f"rl: the loss is {total} at step {step + 1}; the last checkpoint is kept "
                                 "(lower train.lr or raise train.grad_clip, then rerun to resume from it)")
        distributed.sum_grads(trainable)
        if schedule.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(trainable, schedule.grad_clip)
        optimizer.step()
    policy.eval()
    all_tokens = max(1, sum(rep[1] for rep in reports))
    names = {k for rep in reports for k in rep[2]}
    logs = {k: sum(rep[1] * rep[2].get(k, 0.0) for rep in reports) / all_tokens for k in sorted(names)}
    if replay is not None:
        logs["replay_loss"] = sum(rep[3] for rep in reports)
    return {"loss": total, **logs}
