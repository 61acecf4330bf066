"""Reward functions for the rl stage's tests (importable as tests.rl_rewards:<name>)."""

from slimforge.tasks.families import numeric_reward


def flaky(answer: str, completion: str) -> float:
    """A verifier that fails on some samples: raises on even-length completions, NaN on others."""
    if len(completion) % 2 == 0:
        raise ValueError("cannot parse")
    if len(completion) % 3 == 0:
        return float("nan")
    return numeric_reward(answer, completion)
