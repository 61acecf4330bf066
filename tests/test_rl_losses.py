"""GRPO / DAPO / Dr. GRPO and decoupled-PPO losses against numbers worked out by hand in each test.

Log-probs are built from probabilities chosen so that every ratio is a round number: the token
probabilities under the behaviour policy are 0.4 and the current ones 0.4 * ratio.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from slimforge import SlimforgeError
from slimforge.rl.losses import (
    LOSS_TYPES,
    group_advantages,
    informative_groups,
    policy_loss,
)

BASE = 0.4


def _logp(ratios, base=BASE):
    """Current log-probs whose ratio to a policy of probability `base` is `ratios`, with grad."""
    return (torch.tensor(ratios, dtype=torch.float32) * base).log().requires_grad_()


def _const(shape, p=BASE):
    return torch.full(shape, math.log(p))


def _mask(rows):
    return torch.tensor(rows, dtype=torch.bool)


# ---- advantages ------------------------------------------------------------------------------

def test_group_advantages_grpo_scales_by_unbiased_std_and_drgrpo_does_not():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 2.0])
    # group 1: mean 0.25, deviations (.75, -.25, -.25, -.25); unbiased var = .75 / 3 = .25, std .5
    # group 2: all equal, so every advantage is 0 (no NaN from the 0 std)
    expected = torch.tensor([0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0]) / torch.tensor([0.5001] * 4 + [1.0] * 4)
    assert_close(group_advantages(rewards, 4), expected)
    assert_close(group_advantages(rewards, 4, scale=False), torch.tensor([0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0]))
    # G=2: (3, 1) -> mean 2, unbiased std sqrt(2)
    assert_close(group_advantages(torch.tensor([3, 1]), 2), torch.tensor([1.0, -1.0]) / (math.sqrt(2) + 1e-4))


def test_group_advantages_rejects_ragged_groups():
    with pytest.raises(SlimforgeError, match="multiple of group_size"):
        group_advantages(torch.zeros(5), 2)
    with pytest.raises(SlimforgeError, match="group_size must be >= 2"):
        group_advantages(torch.zeros(4), 1)


def test_informative_groups_flags_groups_with_reward_variance():
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 3.0, 3.0])
    assert informative_groups(rewards, 2).tolist() == [False, False, True, True, False, False]
    assert informative_groups(rewards, 3).tolist() == [True, True, True, True, True, True]


# ---- aggregation -----------------------------------------------------------------------------

def test_loss_types_aggregate_differently():
    # ratio 1 everywhere (no clipping), so each masked token's loss is -A:
    # sequence 0 (A=1): three tokens of -1; sequence 1 (A=-2): one token of +2
    logp = _logp([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
    behav, adv = _const((2, 3)), torch.tensor([1.0, -2.0])
    mask = _mask([[1, 1, 1], [1, 0, 0]])
    expected = {"grpo": (-1 + 2) / 2,                # mean of per-sequence means
                "dapo": (-3 + 2) / 4,                # token sum / 4 tokens
                "dr_grpo": (-3 + 2) / (2 * 4)}       # token sum / (N * max_completion_length)
    for loss_type in LOSS_TYPES:
        loss, logs = policy_loss(logp, behav, adv, mask, loss_type=loss_type, max_completion_length=4)
        assert_close(loss, torch.tensor(expected[loss_type]))
        assert logs["clip_fraction"] == 0 and logs["ratio_mean"] == pytest.approx(1.0)


# ---- clipping --------------------------------------------------------------------------------

def test_clip_low_and_high_with_both_advantage_signs():
    ratios = [1.5, 0.5, 1.1]
    logp, behav = _logp([ratios, ratios]), _const((2, 3))
    adv, mask = torch.tensor([1.0, -1.0]), _mask([[1, 1, 1], [1, 1, 1]])
    loss, logs = policy_loss(logp, behav, adv, mask, loss_type="dapo", epsilon=0.2, epsilon_high=0.28)
    # A=+1: min(1.5, 1.28) -> clipped high at 1.28; min(0.5, 0.8) -> 0.5 (no lower clip for A>0); 1.1
    # A=-1: min(-1.5, -1.28) -> -1.5 (no upper clip for A<0); min(-0.5, -0.8) -> clipped low at 0.8; 1.1
    tokens = [-1.28, -0.5, -1.1, 1.5, 0.8, 1.1]
    assert_close(loss, torch.tensor(sum(tokens) / 6))
    assert logs["clip_fraction"].item() == pytest.approx(2 / 6)
    assert logs["ratio_mean"].item() == pytest.approx(3.1 / 3)
    # clipped tokens carry no gradient; others d(-rA)/dlogp = -rA, over 6 tokens
    (grad,) = torch.autograd.grad(loss, logp)
    assert_close(grad, torch.tensor([[0.0, -0.5, -1.1], [1.5, 0.0, 1.1]]) / 6)
    # symmetric clipping (epsilon_high defaults to epsilon) caps the first token at 1.2 instead
    sym, _ = policy_loss(logp, behav, adv, mask, loss_type="dapo", epsilon=0.2)
    assert_close(sym, torch.tensor((sum(tokens) + 0.08) / 6))


# ---- KL --------------------------------------------------------------------------------------

def test_kl_term_is_k3_to_the_reference():
    logp, behav = _logp([[1.0, 1.0]]), _const((1, 2))
    ref = logp.detach() + torch.tensor([[math.log(2.0), 0.0]])  # ref prob twice the policy's, then equal
    mask, adv = _mask([[1, 1]]), torch.tensor([0.0])  # A=0: only the KL term is left
    loss, logs = policy_loss(logp, behav, adv, mask, ref_logp=ref, beta=0.1)
    k3 = 2 - math.log(2) - 1  # exp(d) - d - 1 with d = log 2; 0 for the second token
    assert logs["kl"].item() == pytest.approx(k3 / 2)
    assert_close(loss, torch.tensor(0.1 * k3 / 2))
    # beta=0 logs the KL but leaves it out of the loss
    loss0, logs0 = policy_loss(logp, behav, adv, mask, ref_logp=ref)
    assert loss0.item() == 0 and logs0["kl"].item() == pytest.approx(k3 / 2)


def test_gradient_matches_hand_derivation():
    # one sequence, A=2, ratios (1, 1.5, 0.9), eps 0.2: the middle token is clipped at 1.2;
    # KL with beta 0.5 on the last token only: d = ref - logp = log 2, dk3/dlogp = 1 - exp(d) = -1
    logp, behav = _logp([[1.0, 1.5, 0.9]]), _const((1, 3))
    ref = logp.detach() + torch.tensor([[0.0, 0.0, math.log(2.0)]])
    loss, _ = policy_loss(logp, behav, torch.tensor([2.0]), _mask([[1, 1, 1]]), ref_logp=ref, beta=0.5)
    assert_close(loss, torch.tensor((-(2.0 + 2.4 + 1.8) + 0.5 * (1 - math.log(2))) / 3))
    (grad,) = torch.autograd.grad(loss, logp)
    assert_close(grad, torch.tensor([[-2.0, 0.0, -1.8 - 0.5]]) / 3)


# ---- decoupled PPO ---------------------------------------------------------------------------

def _stale():
    # behaviour 0.2; proximal (0.2, 0.4, 0.1) -> w = (1, 2, 0.5); current = proximal * (1.1, 1.5, 0.5)
    behav = _const((1, 3), 0.2)
    prox = torch.tensor([[0.2, 0.4, 0.1]]).log()
    logp = (prox.exp() * torch.tensor([[1.1, 1.5, 0.5]])).log().requires_grad_()
    return logp, behav, prox, torch.tensor([1.0]), _mask([[1, 1, 1]])


def test_decoupled_loss_on_stale_samples():
    logp, behav, prox, adv, mask = _stale()
    loss, logs = policy_loss(logp, behav, adv, mask, loss_type="dapo", proximal_logp=prox)
    # r = current/proximal = (1.1, 1.5 -> clipped 1.2, 0.5); terms (-1.1, -1.2, -0.5) * w (1, 2, .5)
    assert_close(loss, torch.tensor((-1.1 - 2.4 - 0.25) / 3))
    assert logs["importance_weight_mean"].item() == pytest.approx(3.5 / 3)
    assert logs["capped_fraction"].item() == 0
    assert logs["clip_fraction"].item() == pytest.approx(1 / 3)
    (grad,) = torch.autograd.grad(loss, logp)
    assert_close(grad, torch.tensor([[-1.1, 0.0, -0.25]]) / 3)
    # synchronous on the same tokens clips current/behaviour = (1.1, 3 -> 1.2, 0.25) instead
    sync, _ = policy_loss(logp, behav, adv, mask, loss_type="dapo")
    assert_close(sync, torch.tensor((-1.1 - 1.2 - 0.25) / 3))


def test_decoupled_cap_drops_heavy_tokens_but_keeps_them_in_the_normaliser():
    logp, behav, prox, adv, mask = _stale()
    loss, logs = policy_loss(logp, behav, adv, mask, loss_type="dapo", proximal_logp=prox, behaviour_cap=1.5)
    # w = 2 > 1.5: the middle token's term is dropped; the denominator is still 3 tokens
    assert_close(loss, torch.tensor((-1.1 - 0.25) / 3))
    assert logs["capped_fraction"].item() == pytest.approx(1 / 3)
    with pytest.raises(SlimforgeError, match="behaviour_cap must be > 1"):
        policy_loss(logp, behav, adv, mask, proximal_logp=prox, behaviour_cap=1.0)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_decoupled_equals_synchronous_when_proximal_is_behaviour(loss_type):
    g = torch.Generator().manual_seed(0)
    behav = -torch.rand(4, 5, generator=g) * 3
    ref = -torch.rand(4, 5, generator=g) * 3
    logp = (behav + 0.4 * torch.randn(4, 5, generator=g)).requires_grad_()
    adv = torch.randn(4, generator=g)
    mask = torch.rand(4, 5, generator=g) > 0.3
    kw = {"loss_type": loss_type, "epsilon": 0.1, "epsilon_high": 0.3, "ref_logp": ref, "beta": 0.05,
          "max_completion_length": 5}
    sync, _ = policy_loss(logp, behav, adv, mask, **kw)
    dec, logs = policy_loss(logp, behav, adv, mask, proximal_logp=behav.clone(), behaviour_cap=2.0, **kw)
    assert torch.equal(sync, dec)
    assert torch.equal(torch.autograd.grad(sync, logp)[0], torch.autograd.grad(dec, logp)[0])
    assert logs["importance_weight_mean"] == 1 and logs["capped_fraction"] == 0


# ---- empty masks and errors ------------------------------------------------------------------

def test_sequence_without_tokens_is_left_out_and_padding_is_never_read():
    logp = _logp([[1.0, 1.0], [1.0, 1.0], [1.0, 1.0]]).detach()
    logp[1] = float("-inf")  # garbage in the unmasked row must not leak NaN into loss or grad
    logp.requires_grad_()
    adv, mask = torch.tensor([1.0, 5.0, -3.0]), _mask([[1, 1], [0, 0], [1, 0]])
    loss, _ = policy_loss(logp, _const((3, 2)), adv, mask, ref_logp=_const((3, 2)), beta=0.1)
    # sequence means -1 and +3; the empty row is excluded (averaging it in as 0 would give 2/3)
    assert_close(loss, torch.tensor(1.0))
    assert torch.isfinite(torch.autograd.grad(loss, logp)[0]).all()


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_no_tokens_at_all_gives_zero_loss_with_grad(loss_type):
    logp = _logp([[1.0, 1.0], [1.0, 1.0]])
    loss, logs = policy_loss(logp, _const((2, 2)), torch.tensor([1.0, -1.0]), _mask([[0, 0], [0, 0]]),
                             loss_type=loss_type, max_completion_length=2)
    assert loss.item() == 0 and loss.requires_grad
    assert torch.equal(torch.autograd.grad(loss, logp)[0], torch.zeros(2, 2))
    assert logs["clip_fraction"] == 0


def test_errors_name_the_problem():
    logp, behav, adv, mask = _logp([[1.0]]), _const((1, 1)), torch.tensor([1.0]), _mask([[1]])
    with pytest.raises(SlimforgeError, match=r"unknown loss_type 'ppo'; allowed: grpo, dapo, dr_grpo"):
        policy_loss(logp, behav, adv, mask, loss_type="ppo")
    with pytest.raises(SlimforgeError, match="dr_grpo' needs max_completion_length"):
        policy_loss(logp, behav, adv, mask, loss_type="dr_grpo")
    with pytest.raises(SlimforgeError, match="beta=0.04 > 0 needs ref_logp"):
        policy_loss(logp, behav, adv, mask, beta=0.04)
    with pytest.raises(SlimforgeError, match=r"advantages must be \[N\]"):
        policy_loss(logp, behav, torch.tensor([1.0, 2.0]), mask)
