"""Schema of params/quantize.yaml."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from kernels import BITS, GROUPS
from slimforge.config import PROJECTIONS, Schedule, Schema, check_projections

class Calibration(Schema):
    files: list[str] = Field(["train.jsonl"], description="suite files (in the data folder) the "
                             "calibration sequences are drawn from")
    samples: int = Field(256, ge=8, description="sequences for the Fisher estimate")
    max_len: int = Field(64, ge=8, description="tokens per sequence at most")
    batch_size: int = Field(1, ge=1, description="sequences per backward pass; 1 gives the per-example "
                            "empirical Fisher (as LQ-LoRA); larger batches square mean gradients and "
                            "underestimate it")


class Lrec(Schedule):
    """INT2.1 low-rank error correction: the factors train against the teacher (steps 0: none)."""

    teacher: Literal["input", "base"] = Field(
        "input", description="input: the full-precision model being quantized; base: the unpruned base "
        "model (may win back part of the pruning loss too)")
    kl_weight: float = Field(1.0, ge=0, description="weight of KL(teacher || student) over the vocabulary")
    ce_weight: float = Field(1.0, ge=0, description="weight of next-token cross-entropy on responses")


class QuantizeParams(Schema):
    seed: int = Field(0, description="seed of calibration sampling and LREC data order")
    model: Literal["pruned", "base"] = Field("pruned", description="which model to quantize")
    bits: int = Field(2, description=f"uniform bit width, one of {BITS} (ignored when budget is set)")
    group: int = Field(64, description=f"group size along the input dimension, one of {GROUPS}; a matrix "
                       "whose input width it does not divide is zero-padded to the next multiple")
    budget: float | None = Field(None, gt=0, description="mixed precision: average bits per weight over the "
                                 "quantized matrices, counting scales, zeros and low-rank factors; the "
                                 "bits/group per matrix are chosen by an integer linear program")
    choices: list[tuple[int, int]] = Field([(2, 64), (3, 64), (4, 64), (2, 128), (3, 128), (4, 128)],
                                           description="(bits, group) pairs the budget allocation picks from")
    method: Literal["rtn", "lq_lora"] = Field(
        "lq_lora", description="rtn: round to nearest; lq_lora: W = Q + L1 L2 by alternating "
        "quantization and rank-r SVD (the factors then start LREC)")
    rank: int = Field(8, ge=0, description="rank of the low-rank correction (0: none, no LREC)")
    lq_iters: int = Field(10, ge=1, description="LQ-LoRA alternations at most (stops when the error rises)")
    fisher: bool = Field(True, description="weight decomposition and allocation errors by the diagonal "
                         "Fisher (squared gradients on calibration data), row/column factorised")
    targets: list[str] = Field(list(PROJECTIONS), description=f"linear layers to quantize, among {PROJECTIONS}")
    calibration: Calibration = Field(Calibration(), description="calibration data (Fisher)")
    lrec: Lrec = Field(Lrec(steps=400, lr=2e-3, warmup_steps=20, batch_size=64, checkpoint_every=100),
                       description="INT2.1 low-rank error correction against the teacher")
    compare: bool = Field(True, description="also evaluate, for the comparison table (method lq_lora only): "
                          "round-to-nearest at the same format (rank 0, so fewer bits); RTN at matched bits "
                          "(the ILP over `choices` plus the run's own format, rank 0, at the final model's "
                          "bits/weight); and, when LREC runs, the control RTN + zero-product rank-r factors "
                          "trained with the same LREC recipe (about doubles the LREC time)")
    eval_batch_size: int = Field(256, gt=0, description="sequences per evaluation batch")

    @field_validator("bits")
    @classmethod
    def _bits(cls, v: int) -> int:
        if v not in BITS:
            raise ValueError(f"unsupported bit width; allowed: {', '.join(map(str, BITS))}")
        return v

    @field_validator("group")
    @classmethod
    def _group(cls, v: int) -> int:
        if v not in GROUPS:
            raise ValueError(f"unsupported group size; allowed: {', '.join(map(str, GROUPS))}")
        return v

    @field_validator("choices", mode="before")
    @classmethod
    def _pairs(cls, v):
        """YAML has no tuples: [[2, 64], ...] are the pairs."""
        return [tuple(c) if isinstance(c, list) else c for c in v] if isinstance(v, list) else v

    @field_validator("choices")
    @classmethod
    def _choices(cls, v: list[tuple[int, int]]) -> list[tuple[int, int]]:
        bad = [c for c in v if c[0] not in BITS or c[1] not in GROUPS]
        if bad or not v:
            raise ValueError(f"choices must be non-empty (bits, group) pairs with bits in {BITS} and group in "
                             f"{GROUPS}; bad: {bad}")
        return v

    @field_validator("targets")
    @classmethod
    def _targets(cls, v: list[str]) -> list[str]:
        return check_projections(v)
