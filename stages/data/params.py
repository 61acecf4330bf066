"""Schema of params/data.yaml."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator

from slimforge.config import Schema
from slimforge.tasks.families import BASE_FAMILIES, ERROR_MODES, FAMILIES
from slimforge.tasks.suite import LABELS_FILE, SUITE_FILES


class LoraSizes(Schema):
    train: int = Field(4000, ge=0, description="clean add3 training examples (reference upper bound)")
    val: int = Field(300, ge=0, description="add3 validation problems")
    test: int = Field(500, ge=1, description="add3 test problems (the LoRA stage's target metric)")


class RlSizes(Schema):
    train: int = Field(6000, ge=0, description="chain (a+b-c) rows: the rl stage warms up on the first "
                       "warmup.rows and trains RL on the rest")
    val: int = Field(300, ge=0, description="chain validation problems (the rl stage selects on them)")
    test: int = Field(500, ge=1, description="chain test problems")


def known_families(v: list[str]) -> list[str]:
    bad = [f for f in v if f not in FAMILIES]
    if bad or not v:
        raise ValueError(f"unknown or empty families {bad} (allowed: {', '.join(FAMILIES)})")
    return v


class NoisySet(Schema):
    families: list[str] = Field(["add3"], description="families the instruction set draws from")
    size: int = Field(3000, ge=1, description="number of instruction records")
    wrong_fraction: float = Field(0.3, ge=0.0, le=1.0, description="share of wrong responses")
    error_modes: dict[str, float] = Field({"no_carry": 0.5, "wrong_op": 0.5}, description="how the wrong responses (and the "
                                          "reference pool's) are wrong, {mode: share}: random (slips), no_carry "
                                          "(column sums without carries/borrows), wrong_op (the neighbouring "
                                          "question's answer); slimforge/tasks/families.py")

    @field_validator("families")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        return known_families(v)

    @field_validator("error_modes")
    @classmethod
    def _modes(cls, v: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(v) - set(ERROR_MODES))
        if unknown or not v or any(share < 0 for share in v.values()) or sum(v.values()) <= 0:
            raise ValueError(f"error modes must be shares >= 0 (not all 0) of {', '.join(ERROR_MODES)}; got {v}")
        return v


class DataParams(Schema):
    seed: int = Field(0, description="seed of every generated file")
    train_per_family: dict[str, int] = Field(
        {"add": 20000, "sub": 20000, "mul": 40000},
        description="pretraining examples per base family (mul is the hardest, so it gets more)")
    val_per_family: int = Field(300, ge=1, description="unique validation problems per base family")
    test_per_family: int = Field(500, ge=1, description="unique test problems per base family (fewer "
                                 "where the family's test split is smaller, e.g. mul)")
    judge_train: int = Field(20000, ge=0, description="judge items in pretraining, half of each format")
    judge_families: list[str] = Field(
        ["add", "sub", "mul"], description="families the judge items show. A held-out family listed here "
        "(e.g. add3, the filter's and the LoRA's) appears only inside judge prompts: the base learns to "
        "judge it, never to answer it")
    judge_test: int = Field(1000, ge=0, description="held-out judge items, half of each format")
    lora: LoraSizes = Field(LoraSizes(), description="held-out LoRA family (add3) sizes")
    rl: RlSizes = Field(RlSizes(), description="held-out RL family (chain) sizes")
    noisy: NoisySet = Field(NoisySet(), description="noisy instruction set for the filter stage")
    references: int = Field(200, ge=2, description="labelled reference pool size (half correct)")
    gross_fraction: float = Field(
        0.5, ge=0.0, le=1.0, description="share of wrong answers (judge items, noisy set, references) "
        "that are gross (a digit dropped/doubled, 10x off) rather than subtle slips: gross ones "
        "teach a tiny model to judge at all; subtle ones keep it a weak judge")
    user_files: dict[str, str] = Field(
        {}, description="replace suite files with your own JSONL under user_data/ (dvc.yaml tracks that "
        "folder, so editing a file reruns the pipeline), e.g. {test.jsonl: user_data/my_test.jsonl}")

    @field_validator("judge_families")
    @classmethod
    def _judge_known(cls, v: list[str]) -> list[str]:
        return known_families(v)

    @field_validator("train_per_family")
    @classmethod
    def _base_families(cls, v: dict[str, int]) -> dict[str, int]:
        bad = [f for f in v if f not in BASE_FAMILIES]
        if bad or any(n < 0 for n in v.values()):
            raise ValueError(f"keys must be base families ({', '.join(BASE_FAMILIES)}) with counts >= 0; got {v}")
        return v

    @field_validator("user_files")
    @classmethod
    def _suite_names(cls, v: dict[str, str]) -> dict[str, str]:
        bad = [k for k in v if k not in (*SUITE_FILES, LABELS_FILE)]
        if bad:
            raise ValueError(f"unknown suite file(s) {bad} (allowed: {', '.join(SUITE_FILES)})")
        outside = [p for p in v.values() if Path(p).is_absolute() or ".." in Path(p).parts
                   or Path(p).parts[:1] != ("user_data",)]
        if outside:
            raise ValueError(f"{outside}: user files must lie under user_data/ (the folder dvc.yaml tracks; a file "
                             "elsewhere could change without DVC noticing)")
        return v
