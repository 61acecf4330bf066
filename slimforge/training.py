"""A small, resumable supervised training loop for causal LMs (loss on response tokens only).

Used by the base stage to pretrain the embedded model, and by later stages for short fine-tunes.
The data order is a pure function of (seed, epoch) and the checkpoint holds model, optimizer and
loss history, so a run killed at any point and resumed ends with the same weights as one that
never stopped.
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from kernels.logsoftmax_stats import kl_divergence
from slimforge.batching import collate, epoch_batches
from slimforge.checkpoint import clear_checkpoint, load_checkpoint, save_checkpoint


def lr_at(step: int, steps: int, lr: float, warmup_steps: int, min_lr_ratio: float) -> float:
    """Linear warm-up, then cosine decay to `min_lr_ratio * lr` at the last step."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, steps - warmup_steps)
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, beta2: float = 0.98
                   ) -> torch.optim.AdamW:
    """AdamW with decay on matrices only (norm gains and biases are not decayed), as in nanoGPT."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, beta2), eps=1e-8)


def train_causal_lm(model: torch.nn.Module, examples: list[tuple[list[int], int]], *, pad_id: int,
                    steps: int, batch_size: int, lr: float, warmup_steps: int, min_lr_ratio: float,
                    weight_decay: float, grad_clip: float, seed: int, checkpoint_dir: str | Path,
                    checkpoint_every: int, fingerprint: str, amp_dtype: torch.dtype | None = None,
                    on_log: Callable[[int, dict], None] | None = None, log_every: int = 50,
                    compile: bool = False, adam_beta2: float = 0.98, groups: list | None = None,
                    progress: bool = True, teacher: torch.nn.Module | None = None, kl_weight: float = 0.0,
                    ce_weight: float = 1.0, hidden_weight: float = 0.0) -> dict:
    """Train `model` in place for `steps` optimizer steps on `examples` (from encode_records).
    `groups` (one key per example) keeps batches from mixing kinds of examples; see epoch_batches.

    Distillation: with a `teacher`, the loss is ce_weight * CE(response tokens) + kl_weight *
    KL(teacher || model) averaged over every non-padding position (the fused kernel, so the
    vocabulary-wide fp32 probabilities are never materialised); `hidden_weight` > 0 adds the mean
    over layers of the squared error between the two models' residual streams (normalised by the
    teacher's mean square), for students of the same hidden size. Only parameters with
    requires_grad train, so a frozen model with adapters trains just the adapters.

    Returns {"losses": per-step loss over the whole run, "tokens": non-padding tokens seen over
    the whole run, "run_tokens" and "seconds": tokens and wall time of the steps this process ran,
    "steady_tokens_per_s": throughput over the second half of those steps (after compilation and
    warm-up), "resumed_from": the step it resumed at (0 for a fresh run)}.
    """
    device = next(model.parameters()).device
    lengths = [len(ids) for ids, _ in examples]
    per_epoch = len(epoch_batches(lengths, batch_size, seed, 0, groups))
    if per_epoch == 0:
        raise ValueError(f"{len(examples)} examples cannot fill one batch of {batch_size}")
    optimizer = make_optimizer(model, lr, weight_decay, adam_beta2)
    losses: list[float] = []
    tokens, start_step = 0, 0
    state = load_checkpoint(checkpoint_dir, fingerprint)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        losses, tokens, start_step = list(state["losses"]), int(state["tokens"]), int(state["step"])
    model.train()
    forward = torch.compile(model) if compile else model  # checkpoints keep the plain module's keys
    autocast = (torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None
                else contextlib.nullcontext())
    epoch, batches = -1, []
    bar = tqdm(total=steps, initial=start_step, desc="train", disable=not progress, mininterval=2.0)
    started, run_tokens, pending = time.perf_counter(), 0, []
    halfway, half_mark = start_step + (steps - start_step) // 2, (started, 0)
    for step in range(start_step, steps):
        if step == halfway:
            if device.type == "cuda":
                torch.cuda.synchronize()
            half_mark = (time.perf_counter(), run_tokens)
        if step // per_epoch != epoch:
            epoch = step // per_epoch
            batches = epoch_batches(lengths, batch_size, seed, epoch, groups)
        batch = collate([examples[i] for i in batches[step % per_epoch]], pad_id,
                        pad_multiple=8 if device.type == "cuda" else 1)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup_steps, min_lr_ratio)
        inputs = {k: batch[k].to(device, non_blocking=True) for k in ("input_ids", "attention_mask", "labels")}
        with autocast:
            out = forward(**inputs, output_hidden_states=hidden_weight > 0)
            loss = out.loss
            if teacher is not None:
                loss = ce_weight * loss + _distill(teacher, out, inputs, kl_weight, hidden_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], grad_clip)
        optimizer.step()
        # Losses are read back in groups: a per-step .item() would make the CPU wait for the GPU
        # instead of collating the next batch while the GPU works.
        pending.append(loss.detach())
        seen = int(batch["attention_mask"].sum())
        tokens, run_tokens = tokens + seen, run_tokens + seen
        bar.update(1)
        log_now = (step + 1) % log_every == 0 or step + 1 == steps
        checkpoint_now = checkpoint_every > 0 and (step + 1) % checkpoint_every == 0 and step + 1 < steps
        if log_now or checkpoint_now:
            losses += torch.stack(pending).float().tolist()
            pending = []
        if log_now:
            recent = losses[-log_every:]
            bar.set_postfix(loss=f"{sum(recent) / len(recent):.4f}")
            if on_log is not None:
                on_log(step + 1, {"loss": sum(recent) / len(recent), "lr": optimizer.param_groups[0]["lr"]})
        if checkpoint_now:
            save_checkpoint(checkpoint_dir, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                             "step": step + 1, "losses": losses, "tokens": tokens,
                                             "fingerprint": fingerprint})
    if device.type == "cuda":
        torch.cuda.synchronize()
    ended = time.perf_counter()
    bar.close()
    model.eval()
    return {"losses": losses, "tokens": tokens, "run_tokens": run_tokens, "seconds": ended - started,
            "steady_tokens_per_s": (run_tokens - half_mark[1]) / max(ended - half_mark[0], 1e-9),
            "resumed_from": start_step}


def _distill(teacher: torch.nn.Module, out, inputs: dict, kl_weight: float, hidden_weight: float) -> torch.Tensor:
    """kl_weight * mean KL(teacher || student) + hidden_weight * residual-stream error, over
    non-padding positions."""
    with torch.no_grad():
        t = teacher(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                    output_hidden_states=hidden_weight > 0)
    live = inputs["attention_mask"].bool()
    loss = kl_weight * kl_divergence(t.logits[live], out.logits[live]).mean() if kl_weight > 0 else 0.0
    if hidden_weight > 0:
        pairs = list(zip(out.hidden_states[1:], t.hidden_states[1:]))
        loss = loss + hidden_weight * sum(((s[live] - h[live]) ** 2).mean() / (h[live] ** 2).mean().clamp_min(1e-12)
                                          for s, h in pairs) / len(pairs)
    return loss


def finish_training(checkpoint_dir: str | Path) -> None:
    """Drop the checkpoint once the stage's outputs are safely written."""
    clear_checkpoint(checkpoint_dir)
