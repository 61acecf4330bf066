"""RL post-training with verifiable rewards, for the rl stage (stages/rl).

    losses.py        group advantages; GRPO / DAPO / Dr. GRPO clipped loss; AReaL's decoupled PPO loss
    rollout.py       batched sampling on the KV cache, per-token behaviour log-probs and policy versions
    latr.py          LATR: lookahead tree-based rollouts
    rewards.py       a user's module:function verifier, called defensively
    batch.py         one step's rollout batch (shared by the trainer and the rollout process)
    asynchronous.py  AReaL: a rollout process bounded by max_staleness
    trainer.py       the training loop (synchronous or asynchronous), checkpointed and resumable
"""
