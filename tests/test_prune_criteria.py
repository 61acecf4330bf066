"""Local criteria on bare layers with known answers."""

import itertools

import torch

from stages.prune.criteria import (magnitude_scores, obs_cost, obs_select, refit, top_units, wanda_scores)
from stages.prune.loraprune import loraprune_importance
from tests.helpers import tiny_model


def _inputs(n=400, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(5, d, generator=g, dtype=torch.float64)


def test_obs_cost_is_the_least_squares_error_of_dropping_columns():
    x, w = _inputs()
    h = x.T @ x
    hinv = torch.linalg.inv(h)
    for cols in ([2], [0, 5], [1, 3, 7]):
        keep = [c for c in range(8) if c not in cols]
        best = torch.linalg.lstsq(x[:, keep], x @ w.T).solution  # optimal compensation
        err = ((x[:, keep] @ best - x @ w.T) ** 2).sum()
        assert torch.allclose(obs_cost(w, hinv, torch.tensor(cols)), err, rtol=1e-6)


def test_obs_removes_the_columns_that_carry_least_and_refit_is_exact():
    x, w = _inputs()
    x[:, 3] *= 1e-3  # nearly dead input
    x[:, 6] = x[:, 0] + x[:, 1]  # redundant input
    h = x.T @ x
    units = [torch.tensor([c]) for c in range(8)]
    kept = obs_select(w, h, units, 6, [list(range(8))], rounds=2, damp=1e-9)
    assert 3 not in kept and len({0, 1, 6} - set(kept)) == 1
    cols = torch.tensor(kept)
    w_s = refit(w, h, cols, damp=1e-12)
    assert ((x[:, cols] @ w_s.T - x @ w.T).abs().max() < 1e-2)
    # brute force: the pair dropped costs as little as the cheapest pair (ties are exact here)
    hinv = torch.linalg.inv(h)
    cheapest = min(obs_cost(w, hinv, torch.tensor(p)) for p in itertools.combinations(range(8), 2))
    dropped = torch.tensor(sorted(set(range(8)) - set(kept)))
    assert obs_cost(w, hinv, dropped) <= cheapest + 1e-6 * (w ** 2).sum() * h.diagonal().mean()


def test_wanda_and_magnitude_by_hand():
    w = torch.tensor([[1.0, -2.0, 0.5], [0.0, 1.0, -1.0]])
    norms = torch.tensor([2.0, 1.0, 4.0])
    # per column: |w| summed over rows times ||x||: [2, 3, 6]; units {0}, {1, 2}
    assert torch.equal(wanda_scores(w, norms, [torch.tensor([0]), torch.tensor([1, 2])]), torch.tensor([2.0, 9.0]))
    assert torch.equal(magnitude_scores([[torch.tensor([3.0, 4.0])], [torch.tensor([1.0]), torch.tensor([2.0])]]),
                       torch.tensor([25.0, 5.0]))


def test_top_units_keeps_the_same_number_per_block():
    scores = torch.tensor([5.0, 1.0, 3.0, 4.0, 0.5, 2.0])
    assert top_units(scores, 2, [[0, 1, 2], [3, 4, 5]]) == [0, 2, 3, 5]


def test_loraprune_importance(tokenizer):
    model = tiny_model("llama", tokenizer)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batch = {"input_ids": torch.randint(3, len(tokenizer), (4, 12)), "attention_mask": torch.ones(4, 12, dtype=torch.long)}
    imp = loraprune_importance(model, [batch], rank=4, steps=3, lr=1e-2, ema=0.5, seed=0)
    assert set(imp) == {f"model.layers.{i}.{m}" for i in range(2) for m in
                        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    q = imp["model.layers.0.self_attn.q_proj"]
    assert q.shape == model.model.layers[0].self_attn.q_proj.weight.shape and (q >= 0).all() and q.sum() > 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # frozen weights untouched
    again = loraprune_importance(model, [batch], rank=4, steps=3, lr=1e-2, ema=0.5, seed=0)
    assert torch.allclose(again["model.layers.1.mlp.down_proj"], imp["model.layers.1.mlp.down_proj"])
