"""Schemas of params/model.yaml and params/base.yaml."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from slimforge.config import Preset, Schema


class ModelParams(Schema):
    source: str | None = Field(None, description="local Hugging Face folder or hub id already in the "
                               "local cache; null trains the embedded tiny Llama")
    trust_remote_code: bool = Field(False, description="allow custom modeling code in `source` (only "
                                    "if you trust it)")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="weights dtype on load")


class BaseParams(Schema):
    seed: int = Field(0, description="seed of the model init and the data order")
    preset: str = Field("cpu", description="which entry of `presets` to use")
    presets: dict[str, Preset] = Field(description="named architecture + schedule presets")
    eval_batch_size: int = Field(256, gt=0, description="sequences per evaluation batch")

    @model_validator(mode="after")
    def _preset_exists(self) -> "BaseParams":
        if self.preset not in self.presets:
            raise ValueError(f"preset '{self.preset}' is not defined (allowed: {', '.join(self.presets)})")
        return self
