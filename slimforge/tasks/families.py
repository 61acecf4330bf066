"""Checkable task families: seeded generators of (prompt, answer) with an exact verifier.

Base families (the base model is trained on these):  add, sub, mul
Held-out families, reserved for later stages:        add3  (LoRA domain shift: 3-digit addition)
                                                     chain (multi-step a+b-c with a verifier, for RL)

Every problem belongs to exactly one split, decided by a stable hash of its prompt, so a test
problem never appears in any training file whatever the seed or sizes.
"""

from __future__ import annotations

import hashlib
import random
import re
from typing import Callable

BASE_FAMILIES = ("add", "sub", "mul")
LORA_FAMILY = "add3"
RL_FAMILY = "chain"


def _add(rng: random.Random) -> tuple[str, int]:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    return f"{a}+{b}=", a + b


def _sub(rng: random.Random) -> tuple[str, int]:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    a, b = max(a, b), min(a, b)  # non-negative results keep the answer format one integer
    return f"{a}-{b}=", a - b


def _mul(rng: random.Random) -> tuple[str, int]:
    a, b = rng.randint(0, 9), rng.randint(0, 99)  # one digit times up to two digits
    return f"{a}*{b}=", a * b


def _add3(rng: random.Random) -> tuple[str, int]:
    a, b = rng.randint(100, 999), rng.randint(100, 999)
    return f"{a}+{b}=", a + b


def _chain(rng: random.Random) -> tuple[str, int]:
    a, b, c = rng.randint(0, 99), rng.randint(0, 99), rng.randint(0, 99)
    return f"{a}+{b}-{c}=", a + b - c


FAMILIES: dict[str, Callable[[random.Random], tuple[str, int]]] = {
    "add": _add, "sub": _sub, "mul": _mul, "add3": _add3, "chain": _chain,
}

# Share of the problem space held out for each evaluation split (by prompt hash).
SPLIT_SHARES = {"test": 0.10, "val": 0.05}


def split_of(prompt: str) -> str:
    """'test', 'val' or 'train' for a problem, from a stable hash of its prompt."""
    u = int.from_bytes(hashlib.blake2b(prompt.encode(), digest_size=8).digest(), "big") / 2**64
    if u < SPLIT_SHARES["test"]:
        return "test"
    if u < SPLIT_SHARES["test"] + SPLIT_SHARES["val"]:
        return "val"
    return "train"


def sample_problems(family: str, split: str, n: int, rng: random.Random, unique: bool
                    ) -> list[tuple[str, int]]:
    """Draw `n` problems of `family` that fall in `split`. With `unique`, no problem repeats; a
    family whose split holds fewer than `n` problems returns all it could find."""
    make = FAMILIES[family]
    out, seen = [], set()
    attempts = 0
    while len(out) < n and attempts < 200 * n + 10_000:
        attempts += 1
        prompt, value = make(rng)
        if split_of(prompt) != split or (unique and prompt in seen):
            continue
        seen.add(prompt)
        out.append((prompt, value))
    return out


ERROR_MODES = ("random", "no_carry", "wrong_op")


def systematic_answer(prompt: str, value: int, mode: str) -> int | None:
    """The answer a labeller with a systematic error gives, or None where the mode happens to give
    the right answer (or does not apply). `no_carry`: column sums without carries (+) or borrows
    (-); `wrong_op`: the neighbouring question -- the difference for a sum, the sum for a
    difference or product. Unlike corrupt()'s random slips, these are a rule a model can learn."""
    m = re.fullmatch(r"(\d+)([+\-*])(\d+)=", prompt)
    if m is None or mode not in ("no_carry", "wrong_op"):
        return None
    a, op, b = int(m[1]), m[2], int(m[3])
    if mode == "wrong_op":
        wrong = abs(a - b) if op == "+" else a + b
    elif op == "*":
        return None
    else:
        width = max(len(m[1]), len(m[3]))
        da, db = m[1].zfill(width), m[3].zfill(width)
        column = (lambda x, y: (x + y) % 10) if op == "+" else (lambda x, y: (x - y) % 10)
        wrong = int("".join(str(column(int(x), int(y))) for x, y in zip(da, db)))
    return wrong if wrong != value else None


def corrupt(value: int, rng: random.Random, gross: bool = False) -> int:
    """A wrong answer, never equal to `value` and never negative.

    Subtle (default): the slips people and small models make -- off by one or ten, two digits
    swapped, one digit changed, a small random offset. Telling these from the right answer needs
    the exact sum. Gross (`gross=True`): a digit dropped or doubled, or the magnitude off by ten
    times -- errors a weak judge can catch from the answer's length and leading digit alone.
    """
    for _ in range(100):
        digits = list(str(value))
        kind = rng.randrange(5)
        if gross:
            if kind in (0, 1) and len(digits) > 1:  # drop a digit
                del digits[rng.randrange(len(digits))]
                wrong = int("".join(digits))
            elif kind in (2, 3):  # double a digit
                i = rng.randrange(len(digits))
                wrong = int("".join(digits[:i + 1] + digits[i:]))
            else:  # ten times too large
                wrong = value * 10 + rng.randrange(10)
        elif kind == 0:
            wrong = value + rng.choice((-1, 1))
        elif kind == 1:
            wrong = value + rng.choice((-10, 10))
        elif kind == 2 and value >= 10:
            i = rng.randrange(len(digits) - 1)
            digits[i], digits[i + 1] = digits[i + 1], digits[i]
            wrong = int("".join(digits))
        elif kind == 3:
            i = rng.randrange(len(digits))
            digits[i] = str(rng.choice([d for d in range(10) if d != int(digits[i])]))
            wrong = int("".join(digits))
        else:
            wrong = value + rng.choice((-1, 1)) * rng.randint(2, 20)
        if wrong != value and wrong >= 0:
            return wrong
    return value + 1


_INT = re.compile(r"-?\d+")


def is_correct(answer: str, output: str) -> bool:
    """Exact match after trimming whitespace: the verifier for every embedded family."""
    return output.strip() == answer.strip()


def numeric_reward(answer: str, output: str) -> float:
    """Verifiable reward for RL: 1.0 when the first integer in `output` equals the answer."""
    m = _INT.search(output)
    return float(m is not None and int(m.group()) == int(answer))
