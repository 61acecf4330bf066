"""Schema of params/lora.yaml."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from slimforge.config import PROJECTIONS, Schedule, Schema, check_projections


class Train(Schedule):
    """Each LoRA run (LoRAM and the full-model baseline)."""

    max_len: int = Field(64, ge=8, description="tokens per training sequence at most")


class Align(Schedule):
    """LoRAM's alignment: full-parameter training of the pruned model before LoRA so it computes like
    the full model (steps 0: none; ignored with model: base; with model: quantized the packed weights
    stay frozen and the correction factors, norms and embeddings train)."""

    files: list[str] = Field(["train.jsonl"], description="suite files (in the data folder) of base-task text")
    with_train_rows: bool = Field(True, description="also align on the LoRA training rows' text (with ce_weight 0 "
                                  "only the base model's view of them is learned, not their responses)")
    hidden_weight: float = Field(1.0, ge=0, description="weight of the residual-stream match to the base model "
                                 "after every layer (normalised squared error)")
    kl_weight: float = Field(0.0, ge=0, description="weight of KL(base || pruned) over the vocabulary at every "
                             "position (output distillation)")
    ce_weight: float = Field(0.0, ge=0, description="weight of the next-token cross-entropy on responses "
                             "(LoRAM's continual pre-training when the other two are 0)")


class Replay(Schema):
    """Rows of the base families mixed into every LoRA run (LoRAM and the full-model baseline alike),
    so the adapted model learns the new family without forgetting the old ones: without them the
    adapter took the base families from 0.93 to 0.07."""

    ratio: float = Field(2.0, ge=0, description="replay rows per training row (0: off)")
    files: list[str] = Field(["train.jsonl"], description="suite files (in the data folder) they are drawn from")


class Recovery(Schema):
    init: Literal["zeros", "random"] = Field(
        "zeros", description="what the expanded A columns of o_proj/down_proj hold at pruned inputs: zeros "
        "(the full model gets exactly the pruned adapter's change on the kept sub-network) or small random values")
    std: float = Field(1e-3, ge=0, description="standard deviation of those values with init: random")


class LoraParams(Schema):
    seed: int = Field(0, description="seed of adapter init and data order")
    model: str = Field(
        "data/pruned", description="the folder the adapters train on: the prune stage's data/pruned (LoRAM: its "
        "plan.json recovers the adapters to the base's shape), the quantize stage's data/quantized (QLoRAM: packed "
        "weights on the low-bit kernels, with the same plan), or data/base (plain LoRA, no recovery). dvc.yaml "
        "depends on exactly this folder")
    prune_weights: Literal["selection", "refit"] = Field(
        "selection", description="a pruned model: selection = the base model's weights cut to plan.json "
        "(what recovery assumes); refit = the prune stage's saved weights (OBS-refit o_proj/down_proj)")
    train_rows: str = Field(
        "data/tasks/lora_train.jsonl", description="JSONL training rows: the suite's lora_train.jsonl, the filter "
        "stage's kept rows (data/filtered/filtered.jsonl), or a file of yours under user_data/. Their families are "
        "the stage's headline: accuracy on those families in lora_test.jsonl. dvc.yaml depends on exactly this file")
    rank: int = Field(8, ge=1, description="LoRA rank")
    alpha: float = Field(16.0, gt=0, description="LoRA alpha (scale alpha/rank)")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapter input")
    targets: list[str] = Field(list(PROJECTIONS), description=f"projections that get adapters, among {PROJECTIONS}")
    replay: Replay = Field(Replay(), description="base-family rows mixed into the LoRA training rows")
    train: Train = Field(Train(steps=600, lr=2e-3, warmup_steps=20, batch_size=64, checkpoint_every=100),
                         description="the LoRA runs")
    align: Align = Field(Align(steps=600, lr=3e-4, warmup_steps=10, batch_size=64, checkpoint_every=100),
                         description="optional alignment of the pruned model before LoRA")
    recovery: Recovery = Field(Recovery(), description="how adapters are expanded to the full model")
    baselines: bool = Field(True, description="also evaluate the untouched base and train LoRA on the full "
                            "model with the same data and steps")
    eval_batch_size: int = Field(256, gt=0, description="sequences per evaluation batch")

    @field_validator("targets")
    @classmethod
    def _targets(cls, v: list[str]) -> list[str]:
        return check_projections(v)
