"""Schema of params/report.yaml."""

from __future__ import annotations

from pydantic import Field

from slimforge.config import Schema


class ReportParams(Schema):
    speed: bool = Field(True, description="measure decode tokens/s of each model (batch 1, eager)")
    prompt_len: int = Field(16, ge=1, description="prompt tokens before the timed decode")
    new_tokens: int = Field(64, ge=1, description="tokens decoded and timed")
    repeats: int = Field(3, ge=1, description="timed decodes per model; the median is reported")
    eval_batch_size: int = Field(256, ge=1, description="problems per batch when scoring val.jsonl")
