"""Schema of params/rl.yaml. Knobs shared with TRL's GRPOTrainer keep its names (loss_type,
num_generations, epsilon, epsilon_high, beta, num_iterations, temperature, max_completion_length),
AReaL's its own (max_staleness, behaviour_cap)."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from slimforge.config import PROJECTIONS, Schedule, Schema, check_projections

LOSS_TYPES = ("grpo", "dapo", "dr_grpo")  # the same tuple as slimforge.rl.losses (which imports torch)


class Warmup(Schedule):
    """Supervised warm-up of the RL adapter on `rows` rl_train rows, so the start policy knows the
    answer format (pass@1 well above zero, far from one); `replay` rows of the base families and the
    LoRA family are mixed in so it does not forget them."""

    rows: int = Field(2000, ge=0, description="rl_train rows with their responses (0: no warm-up)")
    replay: float = Field(2.0, ge=0, description="replay rows per warm-up row (train.jsonl and lora_train.jsonl, equal shares)")
    max_len: int = Field(64, ge=8, description="tokens per training sequence at most")


class Ptx(Schema):
    """InstructGPT's PPO-ptx: each RL update adds coef x the supervised loss on a batch of replay
    rows (base families and the LoRA family, equal shares), so RL does not erode them."""

    coef: float = Field(1.0, ge=0, description="weight of the replay loss (0: off)")
    rows: int = Field(4000, ge=1, description="replay rows to draw from (train.jsonl + lora_train.jsonl)")
    batch_size: int = Field(32, ge=1, description="replay rows per update")


class Latr(Schema):
    """Lookahead tree-based rollouts for a share of the prompts (linear from share_start to share_end)."""

    share_start: float = Field(0.0, ge=0, le=1, description="share of prompts rolled out with LATR at step 0")
    share_end: float = Field(0.0, ge=0, le=1, description="share at the last step (0 and 0: LATR off)")
    branch_margin: float = Field(0.2, gt=0, le=1, description="branch where top-1 minus top-2 probability < this")
    branch_min_prob: float = Field(0.2, gt=0, le=1, description="... and the top-2 probability > this")
    lookahead: int = Field(3, ge=1, description="tokens each new branch is simulated ahead")
    prune_threshold: float = Field(0.3, ge=0, le=1, description="prune a branch whose lookahead is closer than "
                                   "this (normalised edit distance) to its parent's")


class RlParams(Schema):
    seed: int = Field(0, description="seed of adapter init, prompt order and sampling")
    start: Literal["lora", "base"] = Field(
        "lora", description="the policy's frozen weights: the base with the lora stage's recovered adapter "
        "merged (lora) or the base alone")
    reward: str = Field("slimforge.tasks.families:numeric_reward",
                        description="verifier as module:function(answer, completion) -> float")
    format_reward: float = Field(0.0, ge=0, description="added when the completion is one integer and EOS")
    rank: int = Field(8, ge=1, description="rank of the adapter RL trains")
    alpha: float = Field(16.0, gt=0, description="LoRA alpha")
    targets: list[str] = Field(list(PROJECTIONS), description=f"projections with adapters, among {PROJECTIONS}")
    warmup: Warmup = Field(Warmup(steps=800, lr=3e-3, warmup_steps=20, batch_size=64, checkpoint_every=200),
                           description="supervised warm-up before RL")
    train: Schedule = Field(Schedule(steps=250, lr=4e-4, warmup_steps=5, batch_size=32, checkpoint_every=50),
                            description="RL optimisation: steps = policy updates, batch_size = prompts per step")
    num_generations: int = Field(8, ge=2, description="samples per prompt (the group size G)")
    max_completion_length: int = Field(6, ge=1, description="new tokens per sample at most")
    temperature: float = Field(1.0, gt=0, description="sampling temperature (training log-probs use the same)")
    loss_type: Literal[LOSS_TYPES] = Field("dapo", description="grpo | dapo (token-level) | dr_grpo")
    scale_rewards: bool = Field(True, description="divide advantages by the group std (False: Dr. GRPO)")
    epsilon: float = Field(0.2, gt=0, lt=1, description="lower clip of the ratio")
    epsilon_high: float = Field(0.28, gt=0, description="upper clip (DAPO's clip-higher)")
    beta: float = Field(0.0, ge=0, description="KL weight to the reference (the policy as RL starts: after the warm-up)")
    num_iterations: int = Field(1, ge=1, description="updates per rollout batch (TRL's mu)")
    dynamic_sampling: bool = Field(True, description="drop groups whose rewards are all equal (DAPO)")
    max_staleness: int = Field(0, ge=0, description="AReaL's eta: 0 synchronous; k: a rollout process may run "
                               "k policy versions ahead of the trainer (decoupled PPO loss)")
    behaviour_cap: float = Field(5.0, gt=1, description="decoupled loss: tokens whose proximal/behaviour weight "
                                 "exceeds this are masked")
    ptx: Ptx = Field(Ptx(), description="replay loss during RL (PPO-ptx)")
    latr: Latr = Field(Latr(), description="lookahead tree rollouts")
    compare_async: bool = Field(False, description="also train with max_staleness 0 and 2 in one run and report "
                                "samples trained per second for each (a benchmark: doubles the stage's time)")
    eval_batch_size: int = Field(256, gt=0, description="sequences per evaluation batch")

    @field_validator("targets")
    @classmethod
    def _targets(cls, v: list[str]) -> list[str]:
        return check_projections(v)

    @field_validator("reward")
    @classmethod
    def _reward(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", v):
            raise ValueError(f"reward {v!r} must be module:function, e.g. slimforge.tasks.families:numeric_reward")
        return v

    @model_validator(mode="after")
    def _clips(self) -> RlParams:
        if self.epsilon_high < self.epsilon:
            raise ValueError(f"epsilon_high {self.epsilon_high} must be >= epsilon {self.epsilon}")
        return self
