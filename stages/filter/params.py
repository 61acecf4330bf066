"""Schema of params/filter.yaml."""

from __future__ import annotations

from pydantic import Field

from slimforge.config import Schema


class Finetune(Schema):
    steps: int = Field(100, ge=1, description="judge fine-tuning steps on the kept data between rounds")
    lr: float = Field(5e-4, gt=0, description="learning rate of that fine-tune")
    batch_size: int = Field(64, ge=1, description="sequences per step")


class Downstream(Schema):
    steps: int = Field(300, ge=0, description="LoRA steps on the kept and on all rows, each (0: skip the "
                       "downstream comparison)")
    rank: int = Field(8, ge=1, description="LoRA rank")
    lr: float = Field(2e-3, gt=0, description="LoRA learning rate")
    batch_size: int = Field(64, ge=1, description="sequences per step")
    test_file: str = Field("lora_test.jsonl", description="suite file the two LoRAs are scored on")


class FilterParams(Schema):
    seed: int = Field(0, description="seed of reference draws and fine-tunes")
    judge: str | None = Field(None, description="judge model folder; null: the base model")
    targets: str = Field("noisy.jsonl", description="instruction set to filter (suite file, or a path)")
    pool: str = Field("references.jsonl", description="labelled reference pool: JSONL rows with prompt, "
                      "response and a boolean `correct` (suite file, or a path)")
    references: int = Field(5, ge=1, description="references each target is compared with")
    balanced: bool = Field(True, description="draw ceil(N/2) correct and floor(N/2) wrong references")
    threshold: float | None = Field(None, description="keep when the score reaches this; null: calibrated "
                                    "on the pool (best Youden J at catching its wrong rows)")
    min_pool_auc: float = Field(0.6, ge=0.0, le=1.0, description="skill check of a calibrated threshold: when "
                                "the score separates the pool's right and wrong rows with a lower AUC, keep every "
                                "row (0: never)")
    rounds: int = Field(1, ge=1, description="filter rounds; between rounds the judge is fine-tuned briefly "
                        "on what was kept")
    finetune: Finetune = Field(Finetune(), description="the judge's fine-tune between rounds")
    baselines: bool = Field(True, description="also run keep-all, direct single-response judging and "
                            "perplexity filtering (each with a pool-calibrated threshold)")
    downstream: Downstream = Field(Downstream(), description="LoRA on kept vs all rows, scored on a test file")
    batch_size: int = Field(256, ge=1, description="judge prompts per forward pass")
