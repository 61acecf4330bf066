"""The embedded task suite: every JSONL file the pipeline's default run uses, from one seed.

Record schema (one JSON object per line; a user's JSONL in this schema works wherever the
embedded suite does):

    prompt    str, required   the text the model is given
    response  str, required   the text that follows (the training target)
    answer    str, optional   the verified answer; required in evaluation files
    family    str, optional   task family, for per-family metrics (default "user")
    id        str, optional   stable identifier (noisy set, reference pool, scores)
    correct   bool            reference pool only: whether `response` is right
    format    str             judge items only: "verify" or "pairwise"

Files (under the data stage's output folder):

    train.jsonl, val.jsonl, test.jsonl          base families (add, sub, mul)
    judge_train.jsonl, judge_test.jsonl         judge items, verify and pairwise in equal numbers, over
                                                the judge families (default add, sub, mul)
    lora_train.jsonl, lora_val.jsonl, lora_test.jsonl   held-out LoRA family (add3)
    rl_train.jsonl, rl_val.jsonl, rl_test.jsonl held-out multi-step family with verifier (chain)
    noisy.jsonl                                 instruction set, ~30% wrong responses, no answers
    references.jsonl                            small labelled reference pool for the judge

The noisy set's labels go to a separate sidecar (`noisy_labels.jsonl`, its own DVC output) that
only evaluation may read.
"""

from __future__ import annotations

import random

from slimforge.tasks.families import (BASE_FAMILIES, LORA_FAMILY, RL_FAMILY, corrupt, systematic_answer,
                                      sample_problems)
from slimforge.tasks.judge import pairwise_record, verify_record


SUITE_FILES = ("train.jsonl", "val.jsonl", "test.jsonl", "judge_train.jsonl", "judge_test.jsonl",
               "lora_train.jsonl", "lora_val.jsonl", "lora_test.jsonl", "rl_train.jsonl",
               "rl_val.jsonl", "rl_test.jsonl", "noisy.jsonl", "references.jsonl")
LABELS_FILE = "noisy_labels.jsonl"


def task_records(family: str, split: str, n: int, rng: random.Random, unique: bool) -> list[dict]:
    problems = sample_problems(family, split, n, rng, unique=unique)
    return [{"id": f"{family}-{split}-{i:06d}", "prompt": p, "response": str(v), "answer": str(v),
             "family": family} for i, (p, v) in enumerate(problems)]


def judge_records(families: tuple[str, ...], split: str, n: int, gross_fraction: float,
                  rng: random.Random) -> list[dict]:
    """`n` judge items over `families`: half verify (half of those wrong), half pairwise (the
    correct one first half the time). Equal exposure is by construction: same count, same
    problems distribution, same share and kinds of wrong answers shown. A `gross_fraction` of
    the wrong answers are gross errors (see `corrupt`)."""
    out = []
    for i in range(n):
        # Formats alternate (i % 2). With an odd number of families i % len already gives every
        # family both formats equally; with an even number it would give each family one format only.
        fam = families[i % len(families) if len(families) % 2 else (i // 2) % len(families)]
        (p, v), = sample_problems(fam, split, 1, rng, unique=False)
        gross = rng.random() < gross_fraction
        if i % 2 == 0:
            correct = rng.random() < 0.5
            out.append(verify_record(p, str(v if correct else corrupt(v, rng, gross)), correct, fam))
        else:
            (p2, v2), = sample_problems(fam, split, 1, rng, unique=False)
            good, bad = (p, str(v)), (p2, str(corrupt(v2, rng, gross)))
            out.append(pairwise_record(good, bad, good_first=rng.random() < 0.5, family=fam))
    rng.shuffle(out)
    return out


def wrong_answer(prompt: str, value: int, rng: random.Random, gross: bool, error_modes: dict[str, float] | None) -> int:
    """A wrong answer: corrupt()'s random slips, or with `error_modes` ({mode: share}, modes from
    families.ERROR_MODES) a mode drawn by share, falling back to a random slip where the mode gives
    the right answer. No extra draw without `error_modes`, so the default files stay as they were."""
    if error_modes:
        mode = rng.choices(list(error_modes), weights=list(error_modes.values()))[0]
        systematic = systematic_answer(prompt, value, mode)
        if systematic is not None:
            return systematic
    return corrupt(value, rng, gross)


def noisy_records(families: tuple[str, ...], n: int, wrong_fraction: float, gross_fraction: float,
                  rng: random.Random, error_modes: dict[str, float] | None = None) -> tuple[list[dict], list[dict]]:
    """The instruction set (no answers) and its sidecar labels, joined by `id`."""
    records, labels = [], []
    for i in range(n):
        fam = families[i % len(families)]
        (p, v), = sample_problems(fam, "train", 1, rng, unique=False)
        wrong = rng.random() < wrong_fraction
        gross = rng.random() < gross_fraction
        rid = f"noisy-{i:06d}"
        records.append({"id": rid, "prompt": p, "family": fam,
                        "response": str(wrong_answer(p, v, rng, gross, error_modes) if wrong else v)})
        labels.append({"id": rid, "correct": not wrong})
    return records, labels


def reference_records(families: tuple[str, ...], n: int, gross_fraction: float, rng: random.Random,
                      error_modes: dict[str, float] | None = None) -> list[dict]:
    """A small labelled pool, half correct and half wrong (the noisy set's error modes), drawn from
    the val split so it never overlaps the instruction set (train split) or the test split."""
    out = []
    for i in range(n):
        fam = families[i % len(families)]
        (p, v), = sample_problems(fam, "val", 1, rng, unique=False)
        correct = i % 2 == 0
        gross = rng.random() < gross_fraction
        out.append({"id": f"ref-{i:05d}", "prompt": p,
                    "response": str(v if correct else wrong_answer(p, v, rng, gross, error_modes)),
                    "family": fam, "correct": correct})
    return out


def build_suite(seed: int, n_train: dict[str, int], n_val: int, n_test: int, n_judge_train: int,
                n_judge_test: int, n_lora: tuple[int, int, int], n_rl: tuple[int, int, int],
                noisy_families: tuple[str, ...], n_noisy: int, wrong_fraction: float,
                n_references: int, gross_fraction: float = 0.5,
                judge_families: tuple[str, ...] = BASE_FAMILIES,
                error_modes: dict[str, float] | None = None) -> tuple[dict[str, list[dict]], list[dict]]:
    """All suite files as {filename: records}, plus the sidecar labels. Deterministic in `seed`:
    each file draws from its own generator, so resizing one file leaves the others unchanged.
    `gross_fraction` of the wrong answers (judge items, noisy set, references) are gross errors.
    `judge_families`: the families the judge items show; a held-out family listed here appears in
    pretraining only inside judge prompts, never as a problem the model is trained to answer.
    `error_modes`: how the noisy set and the reference pool are wrong ({mode: share}; None: random
    slips, families.corrupt)."""
    def rng(name: str) -> random.Random:
        return random.Random(f"{seed}:{name}")

    files: dict[str, list[dict]] = {}
    train = []
    for fam, n in n_train.items():
        train += task_records(fam, "train", n, rng(f"train:{fam}"), unique=False)
    rng("train:shuffle").shuffle(train)
    files["train.jsonl"] = train
    files["val.jsonl"] = [r for fam in BASE_FAMILIES for r in task_records(fam, "val", n_val, rng(f"val:{fam}"), unique=True)]
    files["test.jsonl"] = [r for fam in BASE_FAMILIES for r in task_records(fam, "test", n_test, rng(f"test:{fam}"), unique=True)]
    files["judge_train.jsonl"] = judge_records(judge_families, "train", n_judge_train, gross_fraction,
                                               rng("judge_train"))
    files["judge_test.jsonl"] = judge_records(judge_families, "test", n_judge_test, gross_fraction,
                                              rng("judge_test"))
    for split, n in zip(("train", "val", "test"), n_lora):
        files[f"lora_{split}.jsonl"] = task_records(LORA_FAMILY, split, n, rng(f"lora:{split}"), unique=True)
    for split, n in zip(("train", "val", "test"), n_rl):
        files[f"rl_{split}.jsonl"] = task_records(RL_FAMILY, split, n, rng(f"rl:{split}"), unique=True)
    files["noisy.jsonl"], labels = noisy_records(noisy_families, n_noisy, wrong_fraction, gross_fraction,
                                                 rng("noisy"), error_modes)
    files["references.jsonl"] = reference_records(noisy_families, n_references, gross_fraction,
                                                  rng("references"), error_modes)
    return files, labels
