"""Schema of params/filter.yaml."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from slimforge.config import Schedule, Schema


class Finetune(Schedule):
    """The judge's fine-tune on the kept rows between rounds."""


class Downstream(Schedule):
    """LoRA on each method's kept rows (steps 0: skip the downstream comparison)."""

    rank: int = Field(8, ge=1, description="LoRA rank")
    alpha: float = Field(16.0, gt=0, description="LoRA alpha (scale alpha/rank)")
    test_file: str = Field("lora_test.jsonl", description="suite file (in the data folder) the LoRAs are scored on")
    every_method: bool = Field(False, description="also a LoRA per method not chosen (Meta Ranking, direct, "
                               "perplexity); false: only the filtered rows, keep-all and the oracle (about 35 s "
                               "each on 2 CPU cores)")


class FilterParams(Schema):
    seed: int = Field(0, description="seed of reference draws and fine-tunes")
    judge: str | None = Field(None, description="the judge: a model folder, or a PEFT adapter folder for the base "
                              "model (--model) that is merged in (the lora stage's data/lora/adapter); null: the base "
                              "model itself (library use only: dvc.yaml depends on this path, so the pipeline names one, "
                              "data/base for the plain base)")
    targets: str = Field("data/tasks/noisy.jsonl", description="instruction set to filter (a path; dvc.yaml "
                         "depends on exactly this file): the suite's, or yours under user_data/")
    pool: str = Field("data/tasks/references.jsonl", description="labelled reference pool, JSONL rows with prompt, "
                      "response and a boolean `correct` (a path; dvc.yaml depends on exactly this file)")
    references: int = Field(5, ge=1, description="references each target is compared with")
    balanced: bool = Field(True, description="draw ceil(N/2) correct and floor(N/2) wrong references")
    score: Literal["mean_win", "vote"] = Field("mean_win", description="mean_win: mean win probability against "
                                               "correct and against wrong references, averaged (every outcome counts); "
                                               "vote: the paper's weighted vote (stages/filter/ranking.py)")
    threshold: float | None = Field(None, description="keep when the score reaches this; null: calibrated "
                                    "on the pool (best Youden J at catching its wrong rows)")
    min_pool_auc: float = Field(0.6, ge=0.0, le=1.0, description="skill check of a calibrated threshold: when "
                                "the score separates the pool's right and wrong rows with a lower AUC, keep every "
                                "row (0: never)")
    rounds: int = Field(1, ge=1, description="filter rounds; between rounds the judge is fine-tuned briefly "
                        "on what was kept")
    finetune: Finetune = Field(Finetune(steps=100, lr=5e-4, warmup_steps=10, batch_size=64, checkpoint_every=0),
                               description="the judge's fine-tune between rounds")
    keep_by: Literal["auto", "meta_ranking", "direct", "perplexity"] = Field(
        "auto", description="whose verdict filtered.jsonl keeps; auto: the method whose score best separates the "
        "labelled pool's right and wrong rows (pool AUC; the targets' labels are never read)")
    baselines: bool = Field(True, description="also run keep-all, direct single-response judging and "
                            "perplexity filtering (each with a pool-calibrated threshold)")
    downstream: Downstream = Field(Downstream(steps=300, lr=2e-3, warmup_steps=20, batch_size=64, checkpoint_every=0),
                                   description="LoRA on kept vs all rows, scored on a test file")
    batch_size: int = Field(256, ge=1, description="judge prompts per forward pass")

    @model_validator(mode="after")
    def _keep_by_needs_its_method(self):
        if self.keep_by in ("direct", "perplexity") and not self.baselines:
            raise ValueError(f"keep_by: {self.keep_by} needs baselines: true (it is one of the baselines)")
        return self
