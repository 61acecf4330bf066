"""Evolutionary search: finds a planted distribution, holds the budget, resumes exactly."""

import random

import pytest

from stages.prune.search import evolve, mutate

KINDS = ["attn", "mlp"] * 4
LEVELS = [3] * 8  # keep-level indices 0 (dense) .. 2 (sparsest)
# weights removed per level: an attention step removes 6 units, an MLP step 4
COSTS = [[0, 6, 12] if k == "attn" else [0, 4, 8] for k in KINDS]


def removed(g):
    return sum(c[i] for c, i in zip(COSTS, g))


def test_same_type_moves_keep_every_kind_total():
    rng = random.Random(0)
    start = [1] * 8
    for _ in range(200):
        g = mutate(start, KINDS, LEVELS, rng, moves=3)
        for kind in ("attn", "mlp"):
            assert sum(x for x, k in zip(g, KINDS) if k == kind) == 4


def test_cross_type_moves_hold_the_budget_within_one_step():
    rng = random.Random(0)
    start, budget = [1] * 8, removed([1] * 8)
    seen_trade = False
    for _ in range(300):
        g = mutate(start, KINDS, LEVELS, rng, moves=3, costs=COSTS, budget=budget)
        assert budget <= removed(g) < budget + 6
        seen_trade |= sum(x for x, k in zip(g, KINDS) if k == "attn") != 4
    assert seen_trade  # sparsity does move between attention and MLP


def _toy(planted):
    return lambda g, frac: sum((a - b) ** 2 for a, b in zip(g, planted)) + (0.0 if frac == 1.0 else 0.3 * frac)


@pytest.mark.parametrize("cross", [False, True])
def test_finds_a_planted_better_distribution(cross):
    # cross: attention kept in two layers, paid for by MLP steps elsewhere (same removed total)
    planted = [0, 2, 1, 1, 2, 0, 1, 1] if not cross else [0, 2, 0, 2, 1, 2, 1, 1]
    assert removed(planted) == removed([1] * 8)
    best, fit, history = evolve([1] * 8, KINDS, LEVELS, _toy(planted), generations=25, population=8,
                                offspring=16, stages=[0.25, 0.5, 1.0], survive=0.5, max_moves=3, seed=0,
                                costs=COSTS if cross else None, budget=removed([1] * 8) if cross else None)
    assert best == planted and fit == 0.0
    assert history == sorted(history, reverse=True)  # elitism: the best never gets worse


def test_resume_after_interruption_gives_the_same_result(tmp_path):
    planted = [0, 2, 1, 1, 2, 0, 1, 1]
    kw = dict(kinds=KINDS, n_levels=LEVELS, fitness=_toy(planted), population=6, offspring=6, stages=[1.0],
              survive=1.0, max_moves=2, seed=3)
    straight = evolve([1] * 8, generations=8, checkpoint=tmp_path / "a.json", **kw)
    evolve([1] * 8, generations=3, checkpoint=tmp_path / "b.json", **kw)  # "killed" after 3
    resumed = evolve([1] * 8, generations=8, checkpoint=tmp_path / "b.json", **kw)
    assert resumed == straight


def _space(hidden=32, inter=64, heads=4, kv=2, layers=2, sparsity=0.5, round_to=16):
    from stages.prune.space import search_space
    dims = {"hidden_size": hidden, "num_heads": heads, "num_kv_heads": kv, "head_dim": hidden // heads,
            "intermediate_size": inter}
    return search_space(dims, layers, sparsity, "group", round_to, delta=0.125, levels=2)


def test_attention_kept_control_matches_the_budget_exactly_when_the_units_allow():
    # tests.helpers.tiny_model's shape: one key/value group (2 query + 1 k + 1 v head, 8 wide, of a
    # 32-wide model: 1536 weights) is exactly 16 MLP channels (3 * 32 weights each), one rounding unit
    space = _space()
    keeps = space.attention_kept(space.budget)
    assert keeps == [2, 16, 2, 16] and space.removed(keeps) == space.budget == 9216


@pytest.mark.parametrize("hidden, heads, kv, layers, inter", [(120, 6, 3, 3, 200), (96, 4, 2, 5, 384),
                                                          (128, 4, 2, 6, 100)])
def test_attention_kept_control_is_within_half_a_rounding_step(hidden, heads, kv, layers, inter):
    space = _space(hidden=hidden, heads=heads, kv=kv, inter=inter, layers=layers, sparsity=0.3)
    misses = set()
    for budget in range(0, 3 * hidden * (inter - 16) * layers, 997):  # 997: prime, off every grid
        keeps = space.attention_kept(budget)
        attn, mlp = keeps[0::2], keeps[1::2]
        assert attn == [space.layouts["attn"].per_block] * layers  # no head removed
        assert max(mlp) - min(mlp) <= 16 and all(k % 16 == 0 or k == inter for k in mlp)
        misses.add(space.removed(keeps) - budget)
        assert abs(space.removed(keeps) - budget) <= 3 * hidden * 16 // 2
    assert len(misses) > 10  # the rounding is exercised, not only exact hits


def test_attention_kept_control_refuses_what_the_mlps_cannot_carry():
    # attention is two thirds of this model (MLP 64 wide): half its weights are more than its MLPs hold
    space = _space(hidden=128, inter=64)
    assert space.attention_kept(space.budget) is None
