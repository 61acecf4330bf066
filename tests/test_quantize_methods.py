"""quantize stage math on bare tensors: LQ decomposition, Fisher weights, ILP bit allocation."""

import itertools

import pytest
import torch
from torch import nn

from kernels.lowbit_format import bits_per_weight, fake_quantize
from stages.quantize.allocate import TIE_TOLERANCE, allocate, config_cost, error_table
from stages.quantize.decompose import low_rank, lq_decompose, weighted_error
from stages.quantize.fisher import fisher_diagonal, rank1_fisher


def _spiked(n=64, k=128, seed=1, spike=3.0):
    """Small noise plus one large rank-1 component: what a rank-r correction is for."""
    g = torch.Generator().manual_seed(seed)
    low_rank_part = torch.randn(n, 1, generator=g) @ torch.randn(1, k, generator=g)
    return 0.05 * torch.randn(n, k, generator=g) + spike * low_rank_part


def test_decomposition_error_decreases_then_stops_at_the_best_iterate():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(128, 256, generator=g) * torch.logspace(0, -1, 256)
    w += 0.3 * torch.randn(128, 8, generator=g) @ torch.randn(8, 256, generator=g)
    res = lq_decompose(w, bits=2, group=64, rank=8, iters=50)
    errs = res.errors
    assert len(errs) >= 3 and errs[1] < errs[0]  # the alternation helps beyond RTN + one fit
    assert res.best == min(range(len(errs)), key=errs.__getitem__)
    assert all(a >= b for a, b in zip(errs[:res.best + 1], errs[1:res.best + 1]))  # non-increasing up to the stop
    assert len(errs) <= res.best + 2  # stopped at the first rise (or a fixed point) after the best
    # q/scale/zero/up/down are that iterate
    assert res.error == pytest.approx((w - res.weight()).norm().item(), rel=1e-5)
    assert res.error <= (w - fake_quantize(w, 2, 64)).norm().item()
    assert res.q.dtype == torch.uint8 and res.scale.dtype == torch.float16
    assert res.up.shape == (128, 8) and res.down.shape == (8, 256)
    assert len(lq_decompose(w, 2, 64, 8, iters=2).errors) <= 2
    rtn = lq_decompose(w, 3, 64, rank=0)
    assert torch.equal(rtn.weight(), fake_quantize(w, 3, 64)) and rtn.up.shape == (128, 0)


def test_rank_correction_beats_rtn_at_equal_bits():
    w = _spiked()
    lq, rtn = lq_decompose(w, 2, 32, rank=2), (w - fake_quantize(w, 2, 32)).norm().item()
    assert lq.error < 0.5 * rtn
    # at equal storage too: 2-bit + rank 2 costs between 3-bit RTN at groups 64 and 32, and beats both
    cost = config_cost(w.shape, 2, 32, 2)
    assert config_cost(w.shape, 3, 64, 0) <= cost <= config_cost(w.shape, 3, 32, 0)
    assert lq.error < 0.5 * min((w - fake_quantize(w, 3, g)).norm().item() for g in (32, 64))


def test_factors_are_balanced_and_weighted_fit_is_scale_free():
    a = torch.randn(32, 48, generator=torch.Generator().manual_seed(2))
    up, down = low_rank(a, 5)
    assert torch.allclose(up.norm(dim=0), down.norm(dim=1), rtol=1e-4)  # sqrt(S) in each factor
    u, s, vh = torch.linalg.svd(a)
    assert torch.allclose(up @ down, (u[:, :5] * s[:5]) @ vh[:5], atol=1e-4)
    up_w, down_w = low_rank(a, 5, torch.full((32,), 7.0), torch.full((48,), 0.1))  # constant weights change nothing
    assert torch.allclose(up_w @ down_w, up @ down, atol=1e-4)


def test_fisher_weighted_beats_unweighted_on_the_weighted_error():
    w = torch.randn(128, 256, generator=torch.Generator().manual_seed(0))
    row, col = torch.ones(128), torch.ones(256)
    row[:4], col[:4] = 100.0, 100.0  # a few rows and columns the loss is very sensitive to
    weighted = lq_decompose(w, 2, 64, 8, iters=5, row_weight=row, col_weight=col)
    plain = lq_decompose(w, 2, 64, 8, iters=5)
    assert weighted.error == pytest.approx(weighted_error(w - weighted.weight(), row, col), rel=1e-5)
    assert weighted.error < 0.5 * weighted_error(w - plain.weight(), row, col)
    assert weighted.error <= weighted_error(w - fake_quantize(w, 2, 64), row, col)
    with pytest.raises(ValueError, match="row_weight must be 128 non-negative"):
        lq_decompose(w, 2, 64, 8, row_weight=torch.ones(5))


def test_rank1_fisher_recovers_an_exact_rank1_fisher():
    g = torch.Generator().manual_seed(3)
    r, c = torch.rand(16, generator=g) + 0.1, torch.rand(24, generator=g) ** 4 * 1e-6
    row, col = rank1_fisher(torch.outer(r, c))
    assert torch.allclose(torch.outer(row, col), torch.outer(r, c), rtol=1e-5)
    row, col = rank1_fisher(torch.zeros(3, 4))
    assert not row.any() and not col.any()


def test_fisher_diagonal_is_the_sum_of_squared_gradients():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    model[0].bias.requires_grad_(False)  # flags must come back as they were
    batches = [{"x": torch.randn(5, 3), "y": torch.randn(5, 2)} for _ in range(3)]
    fisher = fisher_diagonal(model, batches, lambda m, b: ((m(b["x"]) - b["y"]) ** 2).sum())
    w1, b1, w2, b2 = (p.detach() for p in model.parameters())
    f1, f2 = torch.zeros_like(w1), torch.zeros_like(w2)
    for b in batches:  # backprop by hand
        h = torch.tanh(b["x"] @ w1.T + b1)
        d_out = 2 * (h @ w2.T + b2 - b["y"])
        d_pre = (d_out @ w2) * (1 - h ** 2)
        f2 += (d_out.T @ h) ** 2
        f1 += (d_pre.T @ b["x"]) ** 2
    assert set(fisher) == {"0", "2"}
    assert torch.allclose(fisher["0"], f1, rtol=1e-5) and torch.allclose(fisher["2"], f2, rtol=1e-5)
    assert [p.requires_grad for p in model.parameters()] == [True, False, True, True]
    assert all(p.grad is None for p in model.parameters())


def _brute_force(errors, costs, budget):
    plans = [p for p in itertools.product(*(range(len(e)) for e in errors))
             if sum(c[i] for c, i in zip(costs, p)) <= budget]
    return min(sum(e[i] for e, i in zip(errors, p)) for p in plans)


def _greedy(errors, costs, budget):
    """Start from the cheapest configs; take the upgrade with the best error saved per extra bit."""
    plan = [min(range(len(c)), key=c.__getitem__) for c in costs]
    while True:
        spent = sum(c[i] for c, i in zip(costs, plan))
        moves = [((errors[m][plan[m]] - errors[m][j]) / (costs[m][j] - costs[m][plan[m]]), m, j)
                 for m in range(len(plan)) for j in range(len(costs[m]))
                 if costs[m][j] > costs[m][plan[m]] and errors[m][j] < errors[m][plan[m]]
                 and spent - costs[m][plan[m]] + costs[m][j] <= budget]
        if not moves:
            return plan
        _, m, j = max(moves)
        plan[m] = j


def test_allocate_finds_the_optimum_that_greedy_misses():
    # matrix 0: +1 bit saves 2 (ratio 2); matrix 1: +3 bits save 5 (ratio 1.67); slack is 3 bits
    errors = [[10.0, 8.0], [10.0, 5.0], [4.0, 3.0, 1.0]]
    costs = [[1, 2], [1, 4], [2, 5, 9]]
    budget = 7
    choice = allocate(errors, costs, budget)
    total = lambda plan, table: sum(t[i] for t, i in zip(table, plan))  # noqa: E731
    assert choice == [0, 1, 0] and total(choice, costs) <= budget
    assert total(choice, errors) == _brute_force(errors, costs, budget) == 19.0
    assert total(_greedy(errors, costs, budget), errors) == 22.0  # greedy is worse here
    with pytest.raises(ValueError, match="needs at least 4 bits"):
        allocate(errors, costs, 3)
    with pytest.raises(ValueError, match="same non-empty rows"):
        allocate(errors, costs[:2], budget)
    with pytest.raises(ValueError, match="same non-empty rows"):
        allocate([[1.0], [2.0, 3.0]], [[1], [1]], 10)


def test_allocate_matches_brute_force_on_random_instances_at_any_error_scale():
    g = torch.Generator().manual_seed(4)
    for trial in range(6):
        costs = torch.randint(1, 20, (4, 3), generator=g).tolist()
        errors = (torch.rand(4, 3, generator=g) * (1e-12 if trial % 2 else 1.0)).tolist()
        budget = sum(min(c) for c in costs) + int(torch.randint(0, 20, (), generator=g))
        choice = allocate(errors, costs, budget)
        spent = sum(c[i] for c, i in zip(costs, choice))
        best = _brute_force(errors, costs, budget)
        assert spent <= budget and sum(e[i] for e, i in zip(errors, choice)) <= best * (1 + TIE_TOLERANCE) + 1e-300
        # and no plan as good (within the tolerance) is cheaper
        assert spent == min(sum(c[i] for c, i in zip(costs, p)) for p in itertools.product(range(3), repeat=4)
                            if sum(c[i] for c, i in zip(costs, p)) <= budget
                            and sum(e[i] for e, i in zip(errors, p)) <= best * (1 + TIE_TOLERANCE))


def _tied_instance(n=12, seed=0):
    """n matrices of one shape (equal costs), each 2-bit or 3-bit; the budget upgrades half of them.
    The upgrades' error savings are pairwise equal (two copies of each matrix), as in a model whose
    layers look alike: which copy gets the bits is a tie, and float noise must not decide it."""
    g = torch.Generator().manual_seed(seed)
    half = torch.rand(n // 2, generator=g)
    errors = [[1.0 + 2 * s, 1.0] for s in torch.cat([half, half]).tolist()]
    costs = [[2 * 1024, 3 * 1024]] * n
    return errors, costs, (2 * n + n // 4) * 1024  # room for a quarter of the upgrades: ties at the margin


def test_allocation_does_not_flip_on_float_noise_but_follows_a_real_difference():
    errors, costs, budget = _tied_instance()
    reference = allocate(errors, costs, budget)
    g = torch.Generator().manual_seed(1)
    noisy = lambda table, rel: [[x * (1 + rel * float(torch.randn((), generator=g))) for x in row]  # noqa: E731
                                for row in table]
    flips_without_tolerance = set()
    for _ in range(8):
        table = noisy(errors, 1e-6)  # e.g. the Fisher summed in another order on another CPU
        assert allocate(table, costs, budget) == reference
        flips_without_tolerance.add(tuple(allocate(table, costs, budget, tolerance=0.0)))
    assert len(flips_without_tolerance) > 1  # the exact least-error plan does flip: the ties are real
    # a real difference (1% larger saving) moves the upgrade to that matrix, in either copy
    upgraded = [m for m, c in enumerate(reference) if c == 1]
    worst_kept = min(upgraded, key=lambda m: errors[m][0])
    twin = (worst_kept + 6) % 12
    assert reference[twin] == 0
    errors[twin][0] *= 1.01
    moved = allocate(errors, costs, budget)
    assert moved[twin] == 1 and moved[worst_kept] == 0


def test_near_ties_go_to_the_cheaper_plan():
    # 4-bit saves 2e-5 of the total error more than 3-bit: not worth the bits at the default tolerance
    errors, costs = [[5.0, 1.0, 1.0 - 6e-5], [5.0, 2.0, 2.0]], [[2, 3, 4], [2, 3, 4]]
    assert allocate(errors, costs, 8) == [1, 1]
    assert allocate(errors, costs, 8, tolerance=0.0) == [2, 1]


def test_error_table_and_costs_feed_the_allocation():
    w = _spiked(32, 128)
    configs = [(2, 64), (3, 64), (4, 128)]
    errs = error_table(w, configs, rank=0)
    assert errs == pytest.approx([(w - fake_quantize(w, b, g)).norm().item() ** 2 for b, g in configs], rel=1e-5)
    assert errs[0] > errs[1]
    assert config_cost(w.shape, 3, 64, 4) == w.numel() * bits_per_weight(3, 64) + 16 * 4 * (32 + 128)
    weights = [w, 0.1 * w, _spiked(32, 128, seed=5)]
    costs = [[config_cost(x.shape, b, g, 0) for b, g in configs] for x in weights]
    budget = 3.0 * bits_per_weight(3, 64) * w.numel()  # on average 3-bit, group 64
    choice = allocate([error_table(x, configs, 0) for x in weights], costs, budget)
    assert sum(c[i] for c, i in zip(costs, choice)) <= budget
    assert choice[1] <= choice[0]  # the matrix with 100x smaller errors never gets more bits
