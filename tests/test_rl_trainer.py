"""The RL loop's pieces around the loss: which rows RL trains on, the replay mix, the KL reference
(the adapter as RL found it) and the PPO-ptx term."""

from __future__ import annotations

import copy

import pytest
import torch

from slimforge import SlimforgeError
from slimforge.adapters import add_lora
from slimforge.rl import trainer
from slimforge.rl.batch import make_batch
from slimforge.rl.losses import group_advantages
from slimforge.rl.rollout import sequence_logprobs
from slimforge.tasks.records import load_records
from stages.rl.params import RlParams
from stages.rl.stage import REPLAY, RL_TRAIN, ptx_args, replay_rows, rl_prompts, rollout_spec
from tests.helpers import tiny_model

SMALL = {"rank": 2, "warmup": {"rows": 8, "steps": 4, "batch_size": 4}, "train": {"steps": 2, "batch_size": 3},
         "num_generations": 4, "max_completion_length": 3}


def _params(**over) -> RlParams:
    return RlParams.model_validate({**SMALL, **over})


def test_rl_prompts_are_the_rows_after_the_warmup_and_too_few_is_refused(suite_dir):
    rows = load_records(suite_dir / RL_TRAIN)
    assert rl_prompts(_params(), suite_dir) == tuple((r["prompt"], r["answer"]) for r in rows[8:])
    no_warmup = _params(warmup={"rows": 8, "steps": 0})  # rows without steps: no warm-up, all rows for RL
    assert len(rl_prompts(no_warmup, suite_dir)) == len(rows)
    with pytest.raises(SlimforgeError, match=r"leaves fewer than train.batch_size=3 prompts for RL"):
        rl_prompts(_params(warmup={"rows": len(rows) - 2, "steps": 4}), suite_dir)


def test_replay_takes_an_equal_share_from_each_file(suite_dir):
    rows = replay_rows(suite_dir, 20, "0:replay")
    per_file = [{r["id"] for r in load_records(suite_dir / f)} for f in REPLAY]
    assert [sum(r["id"] in ids for r in rows) for ids in per_file] == [10, 10]
    assert rows == replay_rows(suite_dir, 20, "0:replay") != replay_rows(suite_dir, 20, "1:replay")


def _policy(tokenizer):
    torch.manual_seed(0)
    policy = add_lora(tiny_model("llama", tokenizer), 2, 4.0, ["q_proj", "v_proj"], seed=0)
    with torch.no_grad():  # a "warmed-up" adapter: B non-zero, so it differs from the adapter off
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    return policy


def test_the_kl_reference_is_the_adapter_as_rl_found_it(suite_dir, tokenizer):
    policy = _policy(tokenizer)
    spec = rollout_spec(_params(), suite_dir)
    r = make_batch(policy, tokenizer, spec, 0, 0)["rollouts"]
    reference = trainer.trainable_state(policy)
    with torch.no_grad():
        at_start = sequence_logprobs(policy, r, spec.temperature)
        with policy.disable_adapter():
            adapter_off = sequence_logprobs(policy, r, spec.temperature)
        for name, p in policy.named_parameters():  # RL moves the adapter on
            if p.requires_grad:
                p.add_(0.2)
        moved = trainer.trainable_state(policy)
        ref = trainer._reference_logprobs(policy, reference, r, spec.temperature)
    assert torch.allclose(ref, at_start, atol=1e-6) and not torch.allclose(ref, adapter_off, atol=1e-3)
    now = trainer.trainable_state(policy)  # the current weights are back after the reference pass
    assert all(torch.equal(now[k], moved[k]) for k in moved)


def test_ptx_adds_coef_times_the_replay_loss_and_draws_rows_by_step(suite_dir, tokenizer):
    params = _params(ptx={"coef": 2.0, "rows": 12, "batch_size": 4})
    args = ptx_args(params, suite_dir, tokenizer)
    assert len(args["replay"]) == 12 and args["replay_coef"] == 2.0
    assert ptx_args(_params(ptx={"coef": 0.0}), suite_dir, tokenizer) == {}
    draw = [trainer._replay_batch(args["replay"], 4, 0, step, tokenizer.pad_token_id) for step in (5, 5, 6)]
    batch = draw[0]
    assert torch.equal(draw[0]["input_ids"], draw[1]["input_ids"])  # a resumed run redraws step 5's rows
    assert not torch.equal(draw[0]["input_ids"], draw[2]["input_ids"])

    start = _policy(tokenizer)
    spec = rollout_spec(params, suite_dir)
    b = make_batch(start, tokenizer, spec, 0, 0)
    advantages = group_advantages(b["rewards"], spec.num_generations) + 0.5  # non-zero: the policy term acts
    logs = {}
    for coef in (0.0, 2.0):
        policy = copy.deepcopy(start)
        trainable = [p for p in policy.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(trainable, lr=0.0)
        logs[coef] = trainer._update(policy, trainable, optimizer, b["rollouts"], advantages, spec, params.train, 0,
                                     loss_type="dapo", epsilon=0.2, epsilon_high=0.28, beta=0.0, num_iterations=1,
                                     decoupled=False, behaviour_cap=None, reference=trainer.trainable_state(start),
                                     replay=batch if coef else None, replay_coef=coef)
    assert "replay_loss" not in logs[0.0] and logs[2.0]["replay_loss"] > 0
    assert logs[2.0]["loss"] == pytest.approx(logs[0.0]["loss"] + 2.0 * logs[2.0]["replay_loss"], rel=1e-5)
