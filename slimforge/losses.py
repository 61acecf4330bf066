"""Training losses as components of the one training loop: `loss_fn(model, batch) -> (loss, logs)`.

`batch` holds input_ids, attention_mask and labels (-100 outside the response tokens); `logs` maps
names to detached scalar tensors that the loop averages into its logged metrics. New objectives
(RL's policy losses, say) are new functions here, not new arguments of the loop.
"""

from __future__ import annotations

from typing import Callable

import torch

from kernels.logsoftmax_stats import kl_divergence

LossFn = Callable[[torch.nn.Module, dict], tuple[torch.Tensor, dict]]


def causal_lm_loss(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
    """Next-token cross-entropy on the response tokens (the labels the batch carries)."""
    return model(**batch).loss, {}


def distillation_loss(teacher: torch.nn.Module, *, ce_weight: float = 1.0, kl_weight: float = 0.0,
                      hidden_weight: float = 0.0) -> LossFn:
    """ce_weight * CE(response tokens) + kl_weight * KL(teacher || model) + hidden_weight * the
    residual-stream error, the last two averaged over every non-padding position.

    The KL goes through the fused kernel, so vocabulary-wide fp32 probabilities are never
    materialised. The residual-stream term is the mean over layers of the squared error between
    the two models' hidden states after each layer, normalised by the teacher's mean square: for
    students of the same hidden size (LoRAM's alignment of a pruned model to its base)."""
    with_hidden = hidden_weight > 0

    def loss_fn(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
        out = model(**batch, output_hidden_states=with_hidden)
        with torch.no_grad():
            t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        output_hidden_states=with_hidden)
        live = batch["attention_mask"].bool()
        logs = {"ce": out.loss.detach()}
        extra = 0.0
        if kl_weight > 0:
            kl = kl_divergence(t.logits[live], out.logits[live]).mean()
            extra, logs["kl"] = kl_weight * kl, kl.detach()
        if with_hidden:
            pairs = list(zip(out.hidden_states[1:], t.hidden_states[1:]))
            total = sum(((s[live] - h[live]) ** 2).mean() / (h[live] ** 2).mean().clamp_min(1e-12)
                        for s, h in pairs)
            extra, logs["hidden"] = extra + hidden_weight * total / len(pairs), total.detach() / len(pairs)
        return ce_weight * out.loss + extra, logs

    return loss_fn
