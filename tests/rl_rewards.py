"""Reward functions for the rl stage's tests (importable as tests.rl_rewards:<name>)."""

from slimforge.tasks.families import numeric_reward


def flaky(answer: str, completion: str) -> float:
    """A verifier that fails on some samples: raises on even-length completions, NaN on others."""
    if len(completion) % 2 == 0:
        raise ValueError("cannot parse")
    if len(completion) % 3 == 0:
        return float("nan")
    return numeric_reward(answer, completion)


def odd_length(answer: str, completion: str) -> float:
    """1 for an odd-length completion: a reward a random tiny model earns about half the time, so
    groups vary and every step updates."""
    return float(len(completion) % 2)
