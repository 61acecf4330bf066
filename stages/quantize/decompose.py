"""LQ-LoRA decomposition W ≈ Q + up @ down: a group-quantized matrix plus a low-rank correction.

Alternating minimisation (LQ-LoRA, Guo et al. 2023, Algorithm 1), starting from L = 0:

    Q_t = quantize(W - L_{t-1})          round-to-nearest, kernels/lowbit_format.py
    L_t = best rank-r fit of (W - Q_t)   truncated SVD, optionally Fisher-weighted
    e_t = ||sqrt(r) * (W - Q_t - L_t) * sqrt(c)||_F

Iteration 1 is RTN followed by a rank-r fit of its residual, so the result is never worse than
RTN. Neither step is a descent step for the joint problem (RTN is not the best Q for a given L
on the weighted norm), so the error can rise: we stop at the first rise, at a fixed point (Q
repeats, so every later iterate would too) or after `iters`, and return the best iterate.

    from stages.quantize.decompose import lq_decompose
    res = lq_decompose(w, bits=3, group=64, rank=16)
    w_hat = res.weight()        # dequant(q, scale, zero) + up @ down
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.lowbit_format import dequantize_groups, quantize_groups


@dataclass
class LQResult:
    """The best iterate: q/scale/zero ready for packing, fp32 factors up [N, r] and down [r, K]."""
    q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor
    bits: int
    group: int
    errors: list[float]  # e_t after every iteration run (the last one may be the rise that stopped it)
    best: int            # index in `errors` of the iterate returned

    @property
    def error(self) -> float:
        return self.errors[self.best]

    def weight(self) -> torch.Tensor:
        """W_hat in fp32, as a layer computes it."""
        return dequantize_groups(self.q, self.scale, self.zero, self.group) + self.up @ self.down


def weighted_error(e: torch.Tensor, row_weight: torch.Tensor | None = None,
                   col_weight: torch.Tensor | None = None) -> float:
    """||diag(sqrt r) E diag(sqrt c)||_F; weights act on squared errors, like a diagonal Fisher."""
    if row_weight is not None:
        e = e * row_weight.sqrt()[:, None]
    if col_weight is not None:
        e = e * col_weight.sqrt()[None, :]
    return torch.linalg.matrix_norm(e).item()


def _sqrt_weight(weight: torch.Tensor | None, size: int, device) -> torch.Tensor:
    if weight is None or not weight.any():  # all-zero weights: any fit is optimal, take the plain one
        return torch.ones(size, device=device)
    weight = weight.float().to(device)
    return weight.clamp(min=1e-8 * weight.mean()).sqrt()


def low_rank(a: torch.Tensor, rank: int, row_weight: torch.Tensor | None = None,
             col_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-r (up, down) of `a` under the weighted norm above.

    With separable weights the weighted problem has a closed form (LQ-LoRA section 3.3): scale
    to A~ = D_r^1/2 A D_c^1/2, take its truncated SVD, unscale the factors. Weights are floored
    at 1e-8 of their mean so a dead row or column (zero Fisher) does not divide by zero.

    sqrt(S) goes into each factor: the balanced split is the minimum-norm factorisation of the
    product (||up||^2 + ||down||^2 = 2 * nuclear norm), and as a LoRA init it gives both factors
    gradients of the same scale, where U*S and V^T would leave one factor ~S times larger."""
    sr, sc = _sqrt_weight(row_weight, a.shape[0], a.device), _sqrt_weight(col_weight, a.shape[1], a.device)
    u, s, vh = torch.linalg.svd(sr[:, None] * a * sc[None, :], full_matrices=False)
    root = s[:rank].sqrt()
    return u[:, :rank] * root / sr[:, None], root[:, None] * vh[:rank] / sc[None, :]


def lq_decompose(w: torch.Tensor, bits: int, group: int, rank: int, iters: int = 20,
                 row_weight: torch.Tensor | None = None, col_weight: torch.Tensor | None = None) -> LQResult:
    """W ≈ dequant(Q) + up @ down, minimising the (weighted) Frobenius error; rank 0 is plain RTN.

    row_weight [N] / col_weight [K] (e.g. from fisher.rank1_fisher) weight the squared error of
    each row / column; None means 1. Only the low-rank step uses them: Q stays RTN, as in LQ-LoRA.
    Exact SVD (deterministic, so the fixed-point stop is exact); fine up to a few thousand wide."""
    if not 0 <= rank <= min(w.shape):
        raise ValueError(f"rank {rank} must be in [0, {min(w.shape)}] for a {tuple(w.shape)} weight")
    if iters < 1:
        raise ValueError(f"iters must be at least 1, got {iters}")
    for name, weight, size in (("row_weight", row_weight, w.shape[0]), ("col_weight", col_weight, w.shape[-1])):
        if weight is not None and (weight.shape != (size,) or (weight < 0).any()):
            raise ValueError(f"{name} must be {size} non-negative values, got shape {tuple(weight.shape)}")
    w = w.detach().float()
    n, k = w.shape
    up, down = w.new_zeros(n, rank), w.new_zeros(rank, k)
    errors, best, prev_q = [], None, None
    for _ in range(iters if rank else 1):
        q = quantize_groups(w - up @ down, bits, group)
        if prev_q is not None and all(torch.equal(a, b) for a, b in zip(q, prev_q)):
            break  # fixed point: L would come out the same, and so would everything after
        prev_q = q
        resid = w - dequantize_groups(*q, group)
        if rank:
            up, down = low_rank(resid, rank, row_weight, col_weight)
        errors.append(weighted_error(resid - up @ down, row_weight, col_weight))
        if best is not None and errors[-1] > best.error:
            break  # the error rose (the history so far never does): LQ-LoRA's stop rule
        best = LQResult(*q, up, down, bits, group, errors, len(errors) - 1)  # shares the growing history
    return best
