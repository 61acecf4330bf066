"""A small, resumable supervised training loop for causal LMs (loss on response tokens only).

Used by the base stage to pretrain the embedded model, and by later stages for short fine-tunes,
alignment, error correction and LoRA: the loss is a component (slimforge/losses.py), the optimiser
and schedule one shared schema (slimforge.config.Schedule).
The data order is a pure function of (seed, epoch) and the checkpoint holds model, optimizer and
loss history, so a run killed at any point and resumed ends with the same weights as one that
never stopped.

Under torchrun (slimforge.distributed) each global batch is cut into the ranks' contiguous shares
and each share into micro-batches (`Schedule.micro_batch_size`), every micro-batch's loss weighted
by its share of the batch's response tokens: the same steps as one process with the whole batch,
up to float summation order, at any number of processes. The checkpoint is always the whole state
in one process's form, so a run resumes on a different number of processes.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Callable

import torch
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from slimforge import SlimforgeError, distributed
from slimforge.batching import collate, epoch_batches
from slimforge.checkpoint import load_checkpoint, save_checkpoint
from slimforge.cli_util import progress as progress_bar
from slimforge.config import Schedule
from slimforge.losses import LossFn, causal_lm_loss

log = logging.getLogger(__name__)


def make_scheduler(optimizer: torch.optim.Optimizer, steps: int, warmup_steps: int, min_lr_ratio: float
                   ) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then cosine decay to `min_lr_ratio * lr` at the last step (transformers'
    schedule; its state goes into the checkpoint, so a resumed run continues the same curve)."""
    return get_cosine_with_min_lr_schedule_with_warmup(optimizer, warmup_steps, steps, min_lr_rate=min_lr_ratio)


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, beta2: float = 0.98
                   ) -> torch.optim.AdamW:
    """AdamW with decay on matrices only (norm gains and biases are not decayed), as in nanoGPT."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, beta2), eps=1e-8)


def train_causal_lm(model: torch.nn.Module, examples: list[tuple[list[int], int]], schedule: Schedule, *,
                    pad_id: int, seed: int, checkpoint_dir: str | Path, fingerprint: str,
                    loss_fn: LossFn = causal_lm_loss, amp_dtype: torch.dtype | None = None,
                    on_log: Callable[[int, dict], None] | None = None, log_every: int = 50,
                    compile: bool = False, adam_beta2: float = 0.98, groups: list | None = None,
                    progress: bool = True, desc: str = "train") -> dict:
    """Train `model` in place for `schedule.steps` optimizer steps on `examples` (from
    encode_records), minimising `loss_fn(model, batch)` (slimforge.losses: response CE by default,
    distillation, ...). Only parameters with requires_grad train, so a frozen model with adapters
    trains just the adapters. `groups` (one key per example) keeps batches from mixing kinds of
    examples; see epoch_batches. The batch is at most the number of examples. `progress`: a bar
    named `desc` (slimforge.cli_util.progress: log lines when stderr is not a terminal).

    Returns {"losses": per-step loss over the whole run, "tokens": non-padding tokens seen over
    the whole run, "run_tokens" and "seconds": tokens and wall time of the steps this process ran,
    "steady_tokens_per_s": throughput over the second half of those steps (after compilation and
    warm-up), "resumed_from": the step it resumed at (0 for a fresh run), "world_size": the
    processes that trained (slimforge.distributed)}. Tokens count the whole global batch.
    """
    steps, batch_size = schedule.steps, min(schedule.batch_size, len(examples))
    warmup = min(schedule.warmup_steps, steps)
    device = next(model.parameters()).device
    world, rank, main = distributed.world_size(), distributed.rank(), distributed.is_main()
    if not examples:
        raise SlimforgeError("no training examples")
    lengths = [len(ids) for ids, _ in examples]
    targets = [label_tokens(ids, n_prompt) for ids, n_prompt in examples]
    per_epoch = len(epoch_batches(lengths, batch_size, seed, 0, groups))
    if per_epoch == 0:  # a small or length-skewed set: no class fills a batch, so batch across classes
        groups = ["all"] * len(examples)
        per_epoch = len(epoch_batches(lengths, batch_size, seed, 0, groups))
    distributed.rank_slice(list(range(batch_size)), world, rank)  # too small a batch for the ranks fails now
    losses: list[float] = []
    tokens, start_step = 0, 0
    state = load_checkpoint(checkpoint_dir, fingerprint)
    if state is not None:
        model.load_state_dict(state["model"])
        losses, tokens, start_step = list(state["losses"]), int(state["tokens"]), int(state["step"])
    distributed.enforce_budget(device, schedule.memory_budget_gb)
    strategy = distributed.choose_strategy(model, schedule.shard, schedule.memory_budget_gb)
    trained = distributed.wrap(model, strategy)  # `model` itself in a single process
    optimizer = make_optimizer(distributed.unwrap(trained), schedule.lr, schedule.weight_decay, adam_beta2)
    scheduler = make_scheduler(optimizer, steps, warmup, schedule.min_lr_ratio)
    if state is not None:
        distributed.load_optimizer_state(trained, optimizer, state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    trained.train()
    if compile and world > 1:
        # One graph with the all-reduce after the backward, instead of graphs split at DDP's buckets
        # to overlap it: 1.67x vs 1.18x the tokens/s of one GPU on 2 H200s for the base gpu preset
        # (benchmarks/2026-11-30-h200x2-scaling.json); the all-reduce takes ~1 ms over NVLink.
        torch._dynamo.config.optimize_ddp = False
    forward = torch.compile(trained) if compile else trained  # checkpoints keep the plain module's keys
    pinned = device.type == "cuda"
    autocast = (torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None
                else contextlib.nullcontext())
    epoch, batches = -1, []
    bar = progress_bar(desc=desc, total=steps, initial=start_step, unit="step", enabled=progress and main, log=log)
    started, run_tokens, pending, pending_logs = time.perf_counter(), 0, [], []
    halfway, half_mark = start_step + (steps - start_step) // 2, (started, 0)
    for step in range(start_step, steps):
        if step == halfway:
            if device.type == "cuda":
                torch.cuda.synchronize()
            half_mark = (time.perf_counter(), run_tokens)
        if step // per_epoch != epoch:
            epoch = step // per_epoch
            batches = epoch_batches(lengths, batch_size, seed, epoch, groups)
        everyone = batches[step % per_epoch]  # the global batch: the same on every rank
        mine = distributed.rank_slice(everyone, world, rank)
        # Every rank makes the same number of forward/backward passes (FSDP2 gathers weights in
        # each), enough for the largest share at micro_batch_size; a rank whose share is one short
        # of that many passes repeats a row with weight 0 (only with micro_batch_size 1).
        largest = -(-len(everyone) // world)
        chunks = distributed.even_parts(mine, -(-largest // (schedule.micro_batch_size or largest)))
        total = max(sum(targets[i] for i in everyone), 1)
        optimizer.zero_grad(set_to_none=True)
        step_loss, step_logs = torch.zeros((), device=device), {}
        for j, chunk in enumerate(chunks):
            rows = chunk or mine[:1]
            batch = collate([examples[i] for i in rows], pad_id, pad_multiple=8 if device.type == "cuda" else 1)
            # Pinned, so the copy is asynchronous: from pageable memory it would wait for the GPU to
            # finish the previous step, and the CPU's collation could never overlap the GPU's work.
            inputs = {k: (batch[k].pin_memory() if pinned else batch[k]).to(device, non_blocking=True)
                      for k in ("input_ids", "attention_mask", "labels")}
            # The loss is a mean over this chunk's response tokens; weighted by the chunk's share of
            # the global batch's (times the ranks, which the gradient reduction averages over) the
            # summed gradient is the whole batch's mean, however the batch was cut.
            share = sum(targets[i] for i in chunk) / total  # 0 for a repeated row
            with distributed.no_sync(trained, sync=j == len(chunks) - 1):
                with autocast:
                    loss, logs = loss_fn(forward, inputs)
                (loss * (share * world)).backward()
            step_loss += share * loss.detach().float()
            for k, v in logs.items():
                step_logs[k] = step_logs.get(k, 0.0) + share * v.detach().float()
        if schedule.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_([p for p in trained.parameters() if p.requires_grad], schedule.grad_clip)
        step_lr = optimizer.param_groups[0]["lr"]  # this step's rate, before the schedule moves on
        optimizer.step()
        scheduler.step()
        # Losses are read back in groups: a per-step .item() would make the CPU wait for the GPU
        # instead of collating the next batch while the GPU works.
        pending.append(step_loss)
        pending_logs.append(step_logs)
        seen = sum(lengths[i] for i in everyone)
        tokens, run_tokens = tokens + seen, run_tokens + seen
        bar.update(1)
        log_now = (step + 1) % log_every == 0 or step + 1 == steps
        checkpoint_now = (schedule.checkpoint_every > 0 and (step + 1) % schedule.checkpoint_every == 0
                          and step + 1 < steps)
        if log_now or checkpoint_now:
            losses += distributed.all_sum(torch.stack(pending)).tolist()
            pending = []
        if log_now:
            recent = losses[-log_every:]
            bar.set_postfix(loss=f"{sum(recent) / len(recent):.4f}")
            parts = {k: float(distributed.all_sum(torch.stack([lg[k] for lg in pending_logs])).mean())
                     for k in pending_logs[-1]}
            if on_log is not None and main:
                on_log(step + 1, {"loss": sum(recent) / len(recent), "lr": step_lr, **parts})
            pending_logs = []
        if checkpoint_now:  # gathering is collective under FSDP2: every rank takes part, rank 0 writes
            whole = {"model": distributed.full_model_state(trained),
                     "optimizer": distributed.optimizer_state(trained, optimizer)}
            if main:
                save_checkpoint(checkpoint_dir, {**whole, "scheduler": scheduler.state_dict(), "step": step + 1,
                                                 "losses": losses, "tokens": tokens, "fingerprint": fingerprint})
    if device.type == "cuda":
        torch.cuda.synchronize()
    ended = time.perf_counter()
    bar.close()
    if distributed.is_sharded(trained):
        del optimizer, forward
        distributed.gather_into(trained, model, device)
    model.eval()
    return {"losses": losses, "tokens": tokens, "run_tokens": run_tokens, "seconds": ended - started,
            "steady_tokens_per_s": (run_tokens - half_mark[1]) / max(ended - half_mark[0], 1e-9),
            "resumed_from": start_step, "world_size": world}


def label_tokens(ids: list[int], n_prompt: int) -> int:
    """Tokens a causal LM's loss averages over for one (ids, n_prompt) example: the response and EOS,
    less the first position when the prompt is empty (labels are shifted by one)."""
    return max(len(ids) - max(n_prompt, 1), 0)
