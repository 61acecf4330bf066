"""The two judge formats the base model learns in pretraining, with equal exposure, so that it can
later act as a weak judge and the filter stage can compare them fairly.

verify   -- one (query, response):  "Is this correct?\n12+34=46\nAnswer:"            -> " yes" | " no"
pairwise -- two (query, response):  "Which is correct?\nA: 12+34=46\nB: 7*8=54\nAnswer:" -> " A" | " B"

The verdict is a single token (checked when the tokenizer is built), so a judge's answer is read
from next-token probabilities without sampling.
"""

from __future__ import annotations

VERIFY_TEMPLATE = "Is this correct?\n{shown}\nAnswer:"
PAIRWISE_TEMPLATE = "Which is correct?\nA: {first}\nB: {second}\nAnswer:"
VERDICTS = {"verify": (" yes", " no"), "pairwise": (" A", " B")}


def show(prompt: str, response: str) -> str:
    """A (query, response) pair as the judge sees it: exactly the text the model was trained on."""
    return f"{prompt}{response}"


def verify_prompt(prompt: str, response: str) -> str:
    return VERIFY_TEMPLATE.format(shown=show(prompt, response))


def pairwise_prompt(first: tuple[str, str], second: tuple[str, str]) -> str:
    return PAIRWISE_TEMPLATE.format(first=show(*first), second=show(*second))


def verify_record(prompt: str, response: str, correct: bool, family: str) -> dict:
    yes, no = VERDICTS["verify"]
    return {"prompt": verify_prompt(prompt, response), "response": yes if correct else no,
            "family": f"judge_verify_{family}", "format": "verify"}


def pairwise_record(good: tuple[str, str], bad: tuple[str, str], good_first: bool, family: str) -> dict:
    a, b = VERDICTS["pairwise"]
    first, second = (good, bad) if good_first else (bad, good)
    return {"prompt": pairwise_prompt(first, second), "response": a if good_first else b,
            "family": f"judge_pairwise_{family}", "format": "pairwise"}


def verdict_ids(tokenizer, fmt: str) -> list[int]:
    """Token ids of the two verdicts of `fmt` (positive first), as they follow a prompt."""
    ids = [tokenizer(v, add_special_tokens=False)["input_ids"] for v in VERDICTS[fmt]]
    if any(len(i) != 1 for i in ids) or ids[0] == ids[1]:
        raise ValueError(f"judge verdicts {VERDICTS[fmt]} are not two distinct single tokens for this tokenizer")
    return [i[0] for i in ids]
