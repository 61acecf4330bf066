"""Verifiable rewards: a user's `module:function(answer, completion) -> float`, called defensively.

A reward function that raises or returns something that is not a finite number for a sample does
not stop training: that sample's group is left out of the update, and the count is reported
(`failed` in the stage's metrics), so a flaky verifier is visible rather than silently zero.
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Callable

from slimforge import SlimforgeError

RewardFn = Callable[[str, str], float]
_INTEGER = re.compile(r"-?\d+")


def load_reward(spec: str) -> RewardFn:
    """Import `module:function` (checked before any work: a typo fails in seconds, naming the spec)."""
    module_name, _, name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise SlimforgeError(f"reward {spec!r}: cannot import module {module_name!r} ({err})") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise SlimforgeError(f"reward {spec!r}: {module_name} has no function {name!r}")
    return fn


def score(reward_fn: RewardFn, answers: list[str], completions: list[str]) -> tuple[list[float], list[bool]]:
    """(reward per sample, whether it is valid). Invalid samples (the function raised, or returned
    a non-number, NaN or inf) get reward 0 and valid False."""
    rewards, valid = [], []
    for answer, completion in zip(answers, completions, strict=True):
        try:
            r = reward_fn(answer, completion)
            ok = isinstance(r, (int, float)) and math.isfinite(r)  # bools count as 0/1
        except Exception:  # a user's verifier may fail on odd text; count it, do not crash training
            ok = False
        rewards.append(float(r) if ok else 0.0)
        valid.append(ok)
    return rewards, valid


def format_bonus(completions: list[str], weight: float) -> list[float]:
    """`weight` for a completion that is exactly one integer (every embedded family's answer format)."""
    return [weight if weight and _INTEGER.fullmatch(c.strip()) else 0.0 for c in completions]
