"""Diagonal empirical Fisher of every nn.Linear weight, and its rank-1 (row x column) summary.

F[i, j] = sum over calibration batches of (d loss / d W[i, j])^2 estimates how much the loss
rises when W[i, j] moves (loss change ≈ 1/2 sum F * dW^2), so Fisher-weighted reconstruction
errors of different matrices are comparable, which the bit allocation needs. The weighted
low-rank fit in decompose.py needs separable weights r_i * c_j, hence rank1_fisher.

    from stages.quantize.fisher import fisher_diagonal, rank1_fisher
    fisher = fisher_diagonal(model, batches, lambda m, b: m(**b, labels=b["input_ids"]).loss)
    row, col = rank1_fisher(fisher["model.layers.0.mlp.down_proj"])
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
from torch import nn

from slimforge.cli_util import progress

log = logging.getLogger(__name__)


def fisher_diagonal(model: nn.Module, batches: list[dict], loss_fn: Callable[[nn.Module, dict], torch.Tensor]
                    ) -> dict[str, torch.Tensor]:
    """{module name: sum over batches of grad(W)^2} (fp32, W's shape) for every nn.Linear.

    Each batch contributes the square of its own gradient, so batches of one sequence give the
    per-example empirical Fisher (LQ-LoRA uses batch size 1); bigger batches square a mean
    gradient and underestimate it. Gradients come from torch.autograd.grad, so .grad fields and
    requires_grad flags are left as they were; the model's train/eval mode is the caller's."""
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    weights = [m.weight for m in linears.values()]
    fisher = {name: torch.zeros(m.weight.shape, dtype=torch.float32, device=m.weight.device)
              for name, m in linears.items()}
    flags = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():  # no graph for biases, norms or embeddings we do not need
        p.requires_grad_(False)
    try:
        for w in weights:
            w.requires_grad_(True)
        for batch in progress(batches, desc="fisher", unit="batch", log=log):
            grads = torch.autograd.grad(loss_fn(model, batch), weights, allow_unused=True)
            for name, g in zip(linears, grads):
                if g is not None:  # a layer the loss never reached keeps F = 0
                    fisher[name] += g.detach().float().pow(2)
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
    return fisher


def rank1_fisher(fisher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column weights with row[i] * col[j] ≈ F[i, j].

    row = mean of F over columns, col = mean over rows / mean(F): the minimiser of the
    generalised KL divergence D(F || row col^T) (the "independence" fit of a non-negative
    matrix), exact when F is rank-1. Least squares (the top singular pair) would chase the few
    huge entries of a heavy-tailed Fisher instead. The product keeps F's scale, so weighted errors
    stay comparable across matrices. LQ-LoRA scales by sqrt(row mean) and sqrt(column mean),
    the same up to a constant factor."""
    if fisher.dim() != 2 or (fisher < 0).any():
        raise ValueError(f"expected a 2-D non-negative Fisher, got shape {tuple(fisher.shape)}")
    fisher = fisher.float()
    total = fisher.mean()
    if total == 0:  # no gradient reached this layer: its weighted error is 0 whatever we store
        return torch.zeros(fisher.shape[0], device=fisher.device), torch.zeros(fisher.shape[1], device=fisher.device)
    return fisher.mean(1), fisher.mean(0) / total
