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
from slimforge.rl.losses import group_advantages, informative_groups, policy_loss
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


def worker_rollout(tokenizer_dir: str, spec: RolloutSpec, model: torch.nn.Module, batch_index: int, version: int
                   ) -> dict:
    """make_batch in the rollout process (top-level, so it pickles for a spawned process)."""
    return make_batch(model, _tokenizer(tokenizer_dir), spec, batch_index, version)


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
    if distributed.world_size() > 1:
        log.warning("rl: the policy-gradient loop is not split across processes yet: each of the %d ranks runs "
                    "all of it (the same result as one process, no speed-up); the supervised warm-up is split",
                    distributed.world_size())
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
    pool = (AsyncRollouts(build_policy, functools.partial(worker_rollout, tokenizer_dir, spec), trainable_state(policy),
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
                version, batch = step, make_batch(policy, tokenizer, spec, step, step)
            t1 = time.perf_counter()
            r, rewards = batch["rollouts"], batch["rewards"]
            staleness[step - version] += 1
            failed_now = int((~batch["valid"]).sum())
            failed += failed_now
            latr.update({k: v for k, v in batch["stats"].items()  # counts add up over steps; means do not
                         if isinstance(v, int) and "per_prompt" not in k})
            advantages = group_advantages(rewards, G, scale=scale_rewards)
            keep = _group_mask(batch["valid"], G)
            if dynamic_sampling:
                keep &= informative_groups(rewards, G)
            logs = _update(policy, trainable, optimizer, r.select(keep), advantages[keep], spec, schedule, step,
                           loss_type=loss_type, epsilon=epsilon, epsilon_high=epsilon_high, beta=beta,
                           num_iterations=num_iterations, decoupled=bool(max_staleness),
                           behaviour_cap=behaviour_cap, reference=reference,
                           replay=_replay_batch(replay, replay_batch_size, spec.seed, step, tokenizer.pad_token_id)
                           if replay and replay_coef > 0 else None, replay_coef=replay_coef) if keep.any() else {}
            with warnings.catch_warnings():  # a step whose groups were all dropped made no update: the
                warnings.simplefilter("ignore", UserWarning)  # schedule still follows the step count
                scheduler.step()
            if max_staleness:
                pool.publish(trainable_state(policy), step + 1)
            t2 = time.perf_counter()
            rollout_s, train_s = rollout_s + t1 - t0, train_s + t2 - t1
            generated = int(r.completion_mask.sum())
            rollout_tokens += generated
            train_tokens += int(r.completion_mask[keep].sum()) * num_iterations
            groups = batch["correct"].view(-1, G)
            distinct = [len(set(r.completions[i * G:(i + 1) * G])) / G for i in range(len(groups))]
            history.append({"step": step + 1, "reward": float(rewards.mean()),
                            "correct": float(batch["correct"].float().mean()),
                            "pass_at_g": float(groups.any(dim=1).float().mean()),  # a group with >= 1 right
                            "distinct": sum(distinct) / len(distinct),  # share of a group's samples that differ
                            "completion_length": generated / len(r), "kept": float(keep.float().mean()),
                            "samples": int(keep.sum()), "failed": failed_now, "staleness": step - version, **logs})
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


def _replay_batch(replay: list, batch_size: int, seed: int, step: int, pad_id: int) -> dict:
    """Step `step`'s replay rows: seeded by (seed, step), so a resumed run draws the same ones."""
    rng = random.Random(f"{seed}:ptx:{step}")
    return collate([replay[rng.randrange(len(replay))] for _ in range(batch_size)], pad_id)


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
            replay=None, replay_coef=0.0) -> dict:
    """`num_iterations` clipped-policy updates on one (filtered) rollout batch; logs of the last."""
    policy.train()
    with torch.no_grad():
        proximal = sequence_logprobs(policy, r, spec.temperature) if decoupled else None
        ref = _reference_logprobs(policy, reference, r, spec.temperature) if beta > 0 else None
    for _ in range(num_iterations):
        logp = sequence_logprobs(policy, r, spec.temperature)
        loss, logs = policy_loss(logp, r.logprobs, advantages, r.completion_mask, loss_type=loss_type, epsilon=epsilon,
                                 epsilon_high=epsilon_high, proximal_logp=proximal,
                                 behaviour_cap=behaviour_cap if decoupled else None, ref_logp=ref, beta=beta,
                                 max_completion_length=spec.max_new_tokens)
        if replay is not None:
            device = next(policy.parameters()).device
            ptx = policy(**{k: v.to(device) for k, v in replay.items()}).loss
            loss, logs = loss + replay_coef * ptx, {**logs, "replay_loss": ptx.detach()}
        if not math.isfinite(loss.item()):
            raise SlimforgeError(f"rl: the loss is {loss.item()} at step {step + 1}; the last checkpoint is kept "
                                 "(lower train.lr or raise train.grad_clip, then rerun to resume from it)")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if schedule.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(trainable, schedule.grad_clip)
        optimizer.step()
    policy.eval()
    return {"loss": loss.item(), **{k: float(v) for k, v in logs.items()}}
