"""Policy-gradient losses of the GRPO family, and AReaL's decoupled PPO loss for stale rollouts.

GRPO (Shao et al. 2024, "DeepSeekMath", arXiv 2402.03300) samples `group_size` completions per
prompt and uses the reward minus the group mean, divided by the group std, as every token's
advantage; the policy term is PPO's clipped surrogate (Schulman et al. 2017):

    loss_t = -min(r_t A, clip(r_t, 1 - epsilon, 1 + epsilon_high) A),   r_t = pi(y_t) / pi_old(y_t)

Its variants differ in two places, named after TRL's GRPOTrainer knobs:
- aggregation (`loss_type`): "grpo" averages tokens within a sequence, then sequences, so a long
  answer's tokens weigh less; "dapo" (Yu et al. 2025, arXiv 2503.14476) averages over all tokens
  of the batch; "dr_grpo" (Liu et al. 2025, "Understanding R1-Zero-Like Training", arXiv
  2503.20783) divides the token sum by the constant N * max_completion_length, and drops the std
  division from the advantage (`group_advantages(..., scale=False)`): both remove a length or
  difficulty bias.
- clipping: DAPO's clip-higher sets epsilon_high > epsilon so unlikely tokens can still grow.
  DAPO's dynamic sampling drops groups whose rewards are all equal (`informative_groups`): their
  advantages are zero, so they only dilute the batch.

Decoupled PPO (Fu et al. 2025, "AReaL: A Large-Scale Asynchronous Reinforcement Learning System",
arXiv 2505.24298). With asynchronous rollouts a sample may come from a policy several versions
old (the behaviour policy). Clipping against that old policy would bound the step relative to a
stale point; AReaL instead clips against the proximal policy (the weights just before this update)
and corrects the sampling distribution with the importance weight w = pi_prox / pi_behav:

    loss_t = -w_t * min(r_t A, clip(r_t) A),   r_t = pi(y_t) / pi_prox(y_t)

As in AReaL's `behav_imp_weight_cap`, a token whose w exceeds the cap is dropped from the sum (its
term becomes 0) but stays in the normaliser, so the loss scale does not depend on staleness.
When proximal == behaviour, w == 1 and the loss is the synchronous one exactly.

All per-token tensors are [N, T] aligned to sequence positions; `mask` [N, T] marks the completion
tokens that count. Values outside the mask are never read (padding may hold any number, -inf too).
"""

from __future__ import annotations

import torch

from slimforge import SlimforgeError

LOSS_TYPES = ("grpo", "dapo", "dr_grpo")
STD_EPS = 1e-4  # TRL's constant in (reward - mean) / (std + eps)


def _groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    if rewards.dim() != 1:
        raise SlimforgeError(f"rewards must be 1-D [N], got shape {tuple(rewards.shape)}")
    if group_size < 2:
        raise SlimforgeError(f"group_size must be >= 2 (a group of one has no baseline), got {group_size}")
    if rewards.numel() % group_size:
        raise SlimforgeError(f"{rewards.numel()} rewards do not split into groups of {group_size}; "
                             "N must be a multiple of group_size")
    return rewards.float().view(-1, group_size)


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True) -> torch.Tensor:
    """Reward minus its group's mean; with `scale` (GRPO) divided by (group std + 1e-4), without it
    (Dr. GRPO) left unscaled. Rewards are laid out group after group. The std is the unbiased one
    (Bessel's N-1), as TRL's `torch.std` default; a group of equal rewards gets advantage 0."""
    g = _groups(rewards, group_size)
    adv = g - g.mean(dim=1, keepdim=True)
    if scale:
        adv = adv / (g.std(dim=1, keepdim=True) + STD_EPS)
    return adv.reshape(-1)


def informative_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Bool [N]: True for samples whose group's rewards are not all equal (non-zero variance)."""
    g = _groups(rewards, group_size)
    # max != min is exact where a computed variance could come out as a tiny non-zero number
    varied = g.amax(dim=1) != g.amin(dim=1)
    return varied.repeat_interleave(group_size)


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, x, 0.0).sum() / mask.sum().clamp(min=1)


def policy_loss(logp: torch.Tensor, behaviour_logp: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, *, loss_type: str = "grpo", epsilon: float = 0.2,
                epsilon_high: float | None = None, proximal_logp: torch.Tensor | None = None,
                behaviour_cap: float | None = None, ref_logp: torch.Tensor | None = None,
                beta: float = 0.0, max_completion_length: int | None = None,
                normaliser: torch.Tensor | float | None = None) -> tuple[torch.Tensor, dict]:
    """Clipped policy-gradient loss (synchronous, or decoupled when `proximal_logp` is given), plus
    beta * k3 KL to `ref_logp`, aggregated by `loss_type`. Returns (scalar loss, detached logs).

    logp: current log-probs [N, T] (with grad); behaviour_logp: log-probs recorded at generation;
    advantages: [N], one per sequence; behaviour_cap: decoupled only, drop tokens whose
    pi_prox / pi_behav exceeds it (must be > 1; meaningless, so ignored, when synchronous: w == 1).
    normaliser: divide the summed terms by this instead of by this batch's own `loss_normaliser`:
    the whole batch's, when each process holds a share and gradients are summed over processes.
    """
    if loss_type not in LOSS_TYPES:
        raise SlimforgeError(f"unknown loss_type {loss_type!r}; allowed: {', '.join(LOSS_TYPES)}")
    if loss_type == "dr_grpo" and not max_completion_length:
        raise SlimforgeError("loss_type 'dr_grpo' needs max_completion_length (a positive int): "
                             "it divides the token sum by N * max_completion_length")
    if beta > 0 and ref_logp is None:
        raise SlimforgeError(f"beta={beta} > 0 needs ref_logp (the reference policy's log-probs) "
                             "for the KL term; pass ref_logp or set beta=0")
    if behaviour_cap is not None and behaviour_cap <= 1.0:
        raise SlimforgeError(f"behaviour_cap must be > 1 (an on-policy token has weight 1), got {behaviour_cap}")
    n = logp.shape[0]
    for name, t in (("behaviour_logp", behaviour_logp), ("mask", mask), ("proximal_logp", proximal_logp),
                    ("ref_logp", ref_logp)):
        if t is not None and t.shape != logp.shape:
            raise SlimforgeError(f"{name} has shape {tuple(t.shape)}, logp has {tuple(logp.shape)}; they must match")
    if advantages.shape != (n,):
        raise SlimforgeError(f"advantages must be [N]=[{n}], got shape {tuple(advantages.shape)}")

    mask = mask.bool()
    eps_high = epsilon if epsilon_high is None else epsilon_high
    adv = advantages.detach().float().to(logp.device).unsqueeze(1)
    # zero the log-differences outside the mask first: padding may hold -inf, and exp(nan) in an
    # unused branch of torch.where would still poison the gradient
    anchor = (behaviour_logp if proximal_logp is None else proximal_logp).detach()
    ratio = torch.exp(torch.where(mask, logp - anchor, 0.0))
    clipped = ratio.clamp(1.0 - epsilon, 1.0 + eps_high)
    per_token = -torch.min(ratio * adv, clipped * adv)
    # the clipped branch is taken where it is strictly smaller: ratio above 1+eps_high with A > 0,
    # or below 1-epsilon with A < 0; there the token's gradient is zero
    took_clip = (clipped * adv < ratio * adv) & mask
    logs = {"clip_fraction": _masked_mean(took_clip.float(), mask).detach(),
            "ratio_mean": _masked_mean(ratio, mask).detach()}

    if proximal_logp is not None:
        weight = torch.exp(torch.where(mask, proximal_logp - behaviour_logp, 0.0)).detach()
        logs["importance_weight_mean"] = _masked_mean(weight, mask)
        capped = (weight > behaviour_cap) & mask if behaviour_cap is not None else torch.zeros_like(mask)
        logs["capped_fraction"] = _masked_mean(capped.float(), mask)
        # capped tokens give 0 but keep their place in the normaliser (AReaL's behav_imp_weight_cap)
        per_token = per_token * torch.where(capped, 0.0, weight)

    if ref_logp is not None:
        d = torch.where(mask, ref_logp.detach() - logp, 0.0)
        k3 = torch.exp(d) - d - 1  # Schulman's unbiased, always >= 0 estimator of KL(pi || ref)
        logs["kl"] = _masked_mean(k3, mask).detach()
        if beta > 0:
            per_token = per_token + beta * k3

    per_token = torch.where(mask, per_token, 0.0)
    if normaliser is None:
        normaliser = loss_normaliser(mask, loss_type, max_completion_length)
    normaliser = torch.as_tensor(normaliser, device=per_token.device).clamp(min=1)
    if loss_type == "grpo":
        counts = mask.sum(dim=1)
        seq = per_token.sum(dim=1) / counts.clamp(min=1)
        total = torch.where(counts > 0, seq, 0.0).sum()
    else:
        total = per_token.sum()
    return total / normaliser, logs


def loss_normaliser(mask: torch.Tensor, loss_type: str, max_completion_length: int | None = None) -> torch.Tensor:
    """What `policy_loss` divides its summed terms by: "grpo" the sequences with a completion token
    (one without is left out of the mean, not averaged in as 0), "dapo" the completion tokens,
    "dr_grpo" N * max_completion_length. A sum over shares is the whole batch's (so it may be 0:
    `policy_loss` divides by at least 1)."""
    mask = mask.bool()
    if loss_type == "grpo":
        n = (mask.sum(dim=1) > 0).sum()
    elif loss_type == "dapo":
        n = mask.sum()
    else:
        n = torch.tensor(mask.shape[0] * max_completion_length, device=mask.device)
    return n
