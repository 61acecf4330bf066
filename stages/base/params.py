"""Schemas of params/model.yaml and params/base.yaml."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from slimforge.config import Schema


class ModelParams(Schema):
    source: str | None = Field(None, description="local Hugging Face folder or hub id already in the "
                               "local cache; null trains the embedded tiny Llama")
    trust_remote_code: bool = Field(False, description="allow custom modeling code in `source` (only "
                                    "if you trust it)")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="weights dtype on load")


class Preset(Schema):
    """Architecture and schedule of the embedded model for one machine class."""

    hidden_size: int = Field(gt=0, description="model width")
    num_layers: int = Field(ge=1, description="decoder layers (>= 6 so a per-layer sparsity search means something)")
    num_heads: int = Field(ge=1, description="query heads")
    num_kv_heads: int = Field(ge=1, description="key/value heads (< num_heads: grouped-query attention)")
    intermediate_size: int = Field(gt=0, description="MLP width")
    max_positions: int = Field(ge=64, description="context length")
    vocab_size: int = Field(ge=262, description="BPE vocabulary (256 bytes + 3 specials + merges)")
    initializer_range: float = Field(gt=0, description="std of the normal weight init (small models "
                                     "want more than HF's 0.02)")
    steps: int = Field(gt=0, description="optimizer steps")
    batch_size: int = Field(gt=0, description="sequences per step")
    lr: float = Field(gt=0, description="peak learning rate")
    warmup_steps: int = Field(ge=1, description="linear warm-up steps")
    min_lr_ratio: float = Field(ge=0, le=1, description="final LR as a share of the peak (cosine)")
    weight_decay: float = Field(ge=0, description="AdamW decay on matrices")
    adam_beta2: float = Field(gt=0, lt=1, description="AdamW second-moment decay")
    grad_clip: float = Field(ge=0, description="gradient norm clip (0 = off)")
    amp: Literal["none", "bf16"] = Field("none", description="autocast dtype on GPU")
    compile: bool = Field(False, description="torch.compile the model (GPU; pays off on long runs)")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = cuda when available")
    checkpoint_every: int = Field(ge=0, description="steps between resumable checkpoints (0 = none)")
    log_every: int = Field(ge=1, description="steps between logged losses")

    @model_validator(mode="after")
    def _gqa_shapes(self) -> "Preset":
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError(f"hidden_size {self.hidden_size} must divide by num_heads {self.num_heads}, "
                             f"and num_heads by num_kv_heads {self.num_kv_heads}")
        return self


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
