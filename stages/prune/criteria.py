"""Local pruning criteria for one sublayer (an attention block's heads, or an MLP's channels).

A sublayer's prunable units each own a set of columns of its output projection W (o_proj for
heads, down_proj for channels; W is out x in) plus the matching rows of the input projections.
H = sum over calibration tokens of x x^T, x the input of that output projection.

    magnitude  sum of squared weights the unit owns (input rows + output columns)
    wanda      sum_r |W[r, c]| * ||X[:, c]||_2 over the unit's columns c (Wanda's |W|*||X||)
    loraprune  LoRA-gradient importance (see loraprune.py), precomputed per unit
    obs        second-order: removing columns C costs tr(W_C (Hinv_CC)^-1 W_C^T); removal in
               rounds with the Optimal Brain Surgeon update of the remaining columns

`refit` then solves the kept columns by least squares against the dense output,
W_S = W H[:, S] (H_SS + damp)^-1, as Týr-the-Pruner does after selection.
"""

from __future__ import annotations

import math

import torch


def damped(h: torch.Tensor, damp: float) -> torch.Tensor:
    """H + damp * mean(diag H) * I: keeps inverses finite for dead or collinear inputs."""
    return h + damp * h.diagonal().mean().clamp(min=1e-8) * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)


def wanda_scores(w_out: torch.Tensor, x_norm: torch.Tensor, units: list[torch.Tensor]) -> torch.Tensor:
    """Activation-weighted magnitude per unit; x_norm = ||X[:, c]||_2 per input column."""
    per_col = (w_out.abs() * x_norm[None, :]).sum(0)
    return torch.stack([per_col[c].sum() for c in units])


def magnitude_scores(unit_weights: list[list[torch.Tensor]]) -> torch.Tensor:
    """Sum of squares of every weight slice a unit owns."""
    return torch.stack([sum(t.float().pow(2).sum() for t in slices) for slices in unit_weights])


def obs_cost(w: torch.Tensor, hinv: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Output error of zeroing columns `cols` of w with the best compensation of the others."""
    wc = w[:, cols]
    return torch.einsum("rc,cd,rd->", wc, torch.linalg.inv(hinv[cols][:, cols]), wc)


def obs_remove(w: torch.Tensor, hinv: torch.Tensor, cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero columns `cols` of w, update the rest (OBS), and drop them from the inverse Hessian."""
    inv_cc = torch.linalg.inv(hinv[cols][:, cols])
    w = w - w[:, cols] @ inv_cc @ hinv[cols, :]
    hinv = hinv - hinv[:, cols] @ inv_cc @ hinv[cols, :]
    w[:, cols] = 0
    return w, hinv


def obs_select(w_out: torch.Tensor, h: torch.Tensor, units: list[torch.Tensor], keep_per_block: int,
               blocks: list[list[int]], rounds: int, damp: float) -> list[int]:
    """Kept units after removing, in `rounds` rounds, the cheapest units by OBS cost until each
    block of units (all units in one block for MLP channels and KV groups; one block per KV
    group when pruning query heads inside groups) keeps `keep_per_block`. Costs are recomputed
    after every round on the OBS-updated weights."""
    w = w_out.double().clone()
    hinv = torch.linalg.inv(damped(h.double(), damp))
    alive = [list(b) for b in blocks]
    to_remove = len(alive[0]) - keep_per_block
    per_round = max(1, math.ceil(to_remove / max(rounds, 1)))
    while len(alive[0]) > keep_per_block:
        take = min(per_round, len(alive[0]) - keep_per_block)
        for block in alive:
            costs = torch.stack([obs_cost(w, hinv, units[u]) for u in block])
            for u in [block[i] for i in costs.argsort()[:take].tolist()]:
                w, hinv = obs_remove(w, hinv, units[u])
                block.remove(u)
    return sorted(u for block in alive for u in block)


def top_units(scores: torch.Tensor, keep_per_block: int, blocks: list[list[int]]) -> list[int]:
    """The `keep_per_block` highest-scoring units of every block."""
    kept = []
    for block in blocks:
        order = scores[block].argsort(descending=True)[:keep_per_block].tolist()
        kept += [block[i] for i in order]
    return sorted(kept)


def refit(w_out: torch.Tensor, h: torch.Tensor, kept_cols: torch.Tensor, damp: float) -> torch.Tensor:
    """Least-squares weights of the kept columns reproducing the dense output: W H_:S (H_SS)^-1."""
    hd = damped(h.double(), damp)
    sol = torch.linalg.solve(hd[kept_cols][:, kept_cols], (w_out.double() @ h.double()[:, kept_cols]).T).T
    return sol.to(w_out.dtype)
