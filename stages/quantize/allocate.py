"""Memory-budget bit allocation: one quantization configuration per matrix, chosen exactly.

Matrix m stored in configuration c costs costs[m][c] bits and leaves errors[m][c], its squared
(optionally Fisher-weighted) reconstruction error. With binary x[m, c]:

    minimise  sum e[m, c] x[m, c]   s.t.  sum_c x[m, c] = 1 for each m,  sum cost[m, c] x[m, c] <= budget

a multiple-choice knapsack, solved as an integer linear program (LQ-LoRA section 3.2) with
scipy's milp (HiGHS), no commercial solver. Greedy upgrades by error saved per bit are not
optimal: a cheap upgrade with a good ratio can eat the slack a bigger, better one needed.
Squared errors are used because they add across matrices (and Fisher-weighted ones estimate the
loss increase, which adds too).

Near-ties are settled without the error table's last digits. Matrices of one shape (every layer's
q_proj, ...) have exactly equal costs, so two plans can differ only by which of two matrices gets
an upgrade whose error savings are nearly equal; the least-error plan then flips on float noise
(a Fisher summed in another order on another CPU). So the solve is lexicographic, in three
passes: (1) the least error E*; (2) among plans within TIE_TOLERANCE of E*, the fewest bits;
(3) among those, a fixed preference that depends on positions only, never on the errors. Only a
plan whose error lies within the noise of exactly E* * (1 + TIE_TOLERANCE) can still flip.

    from stages.quantize.allocate import allocate, config_cost, error_table
    configs = [(2, 64), (3, 64), (4, 128)]
    errors = [error_table(w, configs, rank=16) for w in weights]
    costs = [[config_cost(w.shape, b, g, 16) for b, g in configs] for w in weights]
    choice = allocate(errors, costs, budget=3.25 * sum(w.numel() for w in weights))
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import Bounds, LinearConstraint, milp

from kernels.lowbit_format import check_format
from stages.quantize.decompose import lq_decompose


def config_cost(shape: tuple[int, int], bits: int, group: int, rank: int) -> int:
    """Bits to store an (N, K) matrix: packed codes, an fp16 scale and zero per group of `group`
    columns (= numel * bits_per_weight), and fp16 factors up [N, r] and down [r, K]."""
    n, k = shape
    check_format(bits, group, k)
    return n * k * bits + n * (k // group) * 32 + 16 * rank * (n + k)


def error_table(w: torch.Tensor, configs: list[tuple[int, int]], rank: int, row_weight: torch.Tensor | None = None,
                col_weight: torch.Tensor | None = None, iters: int = 20) -> list[float]:
    """Squared (weighted) error ||W - Q - up down||^2 of lq_decompose for each (bits, group) in
    `configs`. Every group must divide K (check_format says so otherwise): leave those out."""
    return [lq_decompose(w, bits, group, rank, iters, row_weight, col_weight).error ** 2 for bits, group in configs]


TIE_TOLERANCE = 1e-4  # relative: plans within 0.01% of the least error count as equally good


def allocate(errors: list[list[float]], costs: list[list[float]], budget: float,
             tolerance: float = TIE_TOLERANCE) -> list[int]:
    """Index of the chosen configuration for every matrix: least total error within `budget` bits,
    near-ties (within `tolerance` of the least error, relative) to the fewest bits, then to a fixed
    position order (the module docstring says why). Matrices may offer different numbers of
    configurations (errors[m] and costs[m] must match)."""
    if len(errors) != len(costs) or any(len(e) != len(c) or not e for e, c in zip(errors, costs)):
        raise ValueError(f"errors and costs must have the same non-empty rows: got lengths "
                         f"{[len(e) for e in errors]} and {[len(c) for c in costs]}")
    e, c = np.concatenate([np.asarray(x, float) for x in errors]), np.concatenate([np.asarray(x, float) for x in costs])
    if not (np.isfinite(e).all() and np.isfinite(c).all()):
        raise ValueError("errors and costs must be finite")
    cheapest = sum(min(x) for x in costs)
    if cheapest > budget:
        raise ValueError(f"budget {budget:g} bits is infeasible: the cheapest configuration of every matrix "
                         f"needs at least {cheapest:g} bits")
    sizes = [len(x) for x in errors]
    one_hot = np.zeros((len(sizes), len(e)))
    for m, start in enumerate(np.cumsum([0] + sizes[:-1])):
        one_hot[m, start:start + sizes[m]] = 1
    # Errors are rescaled to at most 1: HiGHS's absolute gap and tolerances (~1e-6) would make
    # Fisher-weighted errors of 1e-9 all look equal. Costs stay in bits: integers, exact in float64.
    e = e / (np.abs(e).max() or 1.0)
    constraints = [LinearConstraint(one_hot, 1, 1), LinearConstraint(c[None, :], -np.inf, budget)]
    x = _solve(e, constraints)
    # (2) fewest bits among plans within the tolerance; a floor of 1e-9 (HiGHS's own precision on
    # these scaled errors) keeps pass 1's plan feasible at tolerance 0
    constraints.append(LinearConstraint(e[None, :], -np.inf, e @ x * (1 + tolerance) + 1e-9))
    x = _solve(c, constraints)
    # (3) then a fixed order: a pseudo-random weight per (matrix, configuration) slot, the same on
    # every machine, so sums of different plans (almost surely) differ and the solver has one optimum
    constraints.append(LinearConstraint(c[None, :], -np.inf, c @ x))
    x = _solve(np.random.default_rng(0).random(len(e)), constraints)
    choice = [int(np.flatnonzero(x[one_hot[m] > 0])[0]) for m in range(len(sizes))]
    spent = sum(costs[m][i] for m, i in enumerate(choice))
    if spent > budget:  # tolerances are absolute (1e-7 bits here); never hand back an over-budget plan
        raise RuntimeError(f"milp returned a plan of {spent:g} bits over the budget {budget:g}")
    return choice


def _solve(objective: np.ndarray, constraints: list) -> np.ndarray:
    """The 0/1 vector minimising `objective` under `constraints`, exactly (no relative gap)."""
    res = milp(objective, integrality=np.ones_like(objective), bounds=Bounds(0, 1), constraints=constraints,
               options={"mip_rel_gap": 0.0})
    if not res.success:
        raise RuntimeError(f"milp failed: {res.message}")
    return (res.x > 0.5).astype(float)
