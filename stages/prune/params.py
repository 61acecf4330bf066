"""Schema of params/prune.yaml."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from slimforge.config import Schema


class Calibration(Schema):
    files: list[str] = Field(["train.jsonl"], description="suite files (in the data folder) the "
                             "calibration sequences are drawn from")
    samples: int = Field(512, ge=8, description="calibration sequences")
    max_len: int = Field(64, ge=8, description="tokens per sequence at most")
    batch_size: int = Field(128, ge=1, description="sequences per forward pass")


class Obs(Schema):
    rounds: int = Field(8, ge=1, description="removal rounds (OBS costs recomputed after each)")
    damp: float = Field(0.01, gt=0, description="Hessian damping, as a share of its mean diagonal")


class LoraPrune(Schema):
    rank: int = Field(8, ge=1, description="LoRA rank of the importance pass")
    steps: int = Field(30, ge=1, description="LoRA steps on calibration batches")
    lr: float = Field(1e-3, gt=0, description="LoRA learning rate")
    ema: float = Field(0.9, ge=0, lt=1, description="smoothing of the importance over steps")


class Search(Schema):
    rounds: int = Field(2, ge=1, description="coarse-to-fine rounds (step halved each round)")
    levels: int = Field(2, ge=1, description="candidate levels each side of a sublayer's centre")
    delta: float = Field(0.125, gt=0, lt=1, description="first-round step between levels (share of a sublayer)")
    generations: int = Field(12, ge=1, description="generations per round")
    population: int = Field(12, ge=2, description="genomes kept per generation (elitism)")
    offspring: int = Field(24, ge=1, description="mutated children per generation")
    stages: list[float] = Field([0.25, 0.5, 1.0], description="growing shares of the calibration tokens "
                                "for ranking offspring; the last must be 1.0")
    survive: float = Field(0.5, gt=0, le=1, description="share of offspring passing each ranking stage")
    max_moves: int = Field(3, ge=1, description="sparsity moves per mutation, at most")
    moves: Literal["same_type", "cross_type"] = Field(
        "cross_type", description="same_type: sparsity moves only between sublayers of one kind (as in "
        "Týr-the-Pruner); cross_type: also between attention and MLP, the budget held by un-pruning")
    topk_kl: int = Field(0, ge=0, description="0: full KL; k > 0: sparse KL over the dense model's top-k tokens")

    @field_validator("stages")
    @classmethod
    def _stages(cls, v: list[float]) -> list[float]:
        if not v or v[-1] != 1.0 or any(not 0 < x <= 1 for x in v) or v != sorted(v):
            raise ValueError("stages must be increasing shares in (0, 1] ending with 1.0")
        return v


class PruneParams(Schema):
    seed: int = Field(0, description="seed of calibration sampling, LoRA init and the search")
    sparsity: float = Field(0.5, ge=0.0, lt=1.0, description="share of attention+MLP weights to remove")
    criterion: Literal["obs", "loraprune", "wanda", "magnitude"] = Field(
        "obs", description="local criterion: second-order reconstruction, LoRA-gradient importance, "
        "activation-weighted magnitude, or magnitude")
    attention_unit: Literal["group", "query"] = Field(
        "group", description="group: drop a key/value head with all query heads reading it; query: drop "
        "query heads inside every group, the same number per group")
    refit: bool = Field(True, description="least-squares refit of the kept o_proj/down_proj columns "
                        "(false: selection only, the kept weights stay the base model's)")
    mlp_round_to: int = Field(16, ge=1, description="kept MLP widths are multiples of this")
    calibration: Calibration = Field(Calibration(), description="calibration data")
    obs: Obs = Field(Obs(), description="second-order criterion")
    loraprune: LoraPrune = Field(LoraPrune(), description="LoRA-gradient criterion")
    search: Search = Field(Search(), description="evolutionary search")
    uniform_baseline: bool = Field(True, description="also prune uniformly (every sublayer at the target) "
                                   "and report it beside the searched model")
    attention_kept_baseline: bool = Field(True, description="also prune a control that keeps every attention "
                                          "head and cuts the MLPs as evenly as mlp_round_to allows, removing as "
                                          "many weights as the searched model (within half of one layer's "
                                          "mlp_round_to step), and report it beside the searched model")
    eval_batch_size: int = Field(256, gt=0, description="sequences per evaluation batch")
