"""Typed params: one pydantic schema per stage, loaded from `params/<stage>.yaml`.

A bad params file fails before any work, with one message that names every wrong key and what is
allowed there, e.g.

    params/base.yaml: unknown key 'lerning_rate' (allowed: batch_size, lr, ...); steps: must be > 0
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from slimforge import SlimforgeError


class Schema(BaseModel):
    """Base for every params schema: unknown keys are errors, values are immutable.

    A nested section given in part (`lrec: {steps: 4}`) keeps the stage's defaults for the keys it
    does not name: a section's default is the stage's own instance (e.g. `Lrec(steps=400, ...)`),
    so one shared section schema can carry different defaults in each stage.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    @model_validator(mode="before")
    @classmethod
    def _partial_sections_keep_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        merged = dict(data)
        for name, field in cls.model_fields.items():
            if isinstance(merged.get(name), dict) and isinstance(field.default, BaseModel):
                merged[name] = {**field.default.model_dump(), **merged[name]}
        return merged


class Schedule(Schema):
    """The optimiser and schedule of every training run (AdamW, linear warm-up, cosine decay to
    `min_lr_ratio * lr`). Stages embed it with their own defaults; the loop takes it as is."""

    steps: int = Field(100, ge=0, description="optimizer steps (0: this training is skipped)")
    lr: float = Field(1e-3, gt=0, description="peak learning rate")
    warmup_steps: int = Field(10, ge=0, description="linear warm-up steps (at most `steps`)")
    batch_size: int = Field(64, ge=1, description="sequences per step (at most the number of examples)")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="final learning rate as a share of the peak")
    weight_decay: float = Field(0.0, ge=0, description="AdamW decay on matrices (not on norms and biases)")
    grad_clip: float = Field(1.0, ge=0, description="gradient norm clip (0: off)")
    checkpoint_every: int = Field(100, ge=0, description="steps between resumable checkpoints (0: none)")
    micro_batch_size: int = Field(0, ge=0, description="sequences per forward/backward on each process (0: its "
                                  "whole share of the batch); gradients accumulate to batch_size")
    shard: Literal["auto", "ddp", "fsdp"] = Field(
        "auto", description="across processes (SLIMFORGE_NPROC > 1): DDP, FSDP2, or auto: FSDP2 when weights + "
        "gradients + AdamW state exceed memory_budget_gb")
    memory_budget_gb: float = Field(0.0, ge=0, description="per-device memory budget in GiB (0: the device's "
                                    "memory); enforced on CUDA")


S = TypeVar("S", bound=Schema)


def _allowed_keys(schema: type[BaseModel], loc: tuple) -> list[str]:
    """The field names allowed at `loc` (a path of keys into nested schemas)."""
    model = schema
    for key in loc[:-1]:
        field = model.model_fields.get(key) if isinstance(key, str) else None
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return sorted(model.model_fields)


def describe_errors(err: ValidationError, schema: type[BaseModel]) -> str:
    """Flatten a pydantic error into '; '-joined parts, one per wrong key."""
    parts = []
    for e in err.errors():
        where = ".".join(str(x) for x in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            allowed = ", ".join(_allowed_keys(schema, e["loc"]))
            parts.append(f"unknown key '{where}' (allowed: {allowed})")
        elif e["type"] == "missing":
            parts.append(f"missing key '{where}'")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            parts.append(f"{where}: {msg} (got {e.get('input')!r})")
    return "; ".join(parts)


def parse_params(data: dict[str, Any] | None, schema: type[S], source: str) -> S:
    """Validate a dict against `schema` (strict types: 'yes' is no boolean and '64' no number);
    raise SlimforgeError naming `source` and each wrong key."""
    if data is None:
        raise SlimforgeError(f"{source}: the file is empty; write the keys you want (the shipped file in params/ "
                             f"lists every one) rather than run on silent defaults")
    if not isinstance(data, dict):
        raise SlimforgeError(f"{source}: expected a mapping of keys to values, got {type(data).__name__}")
    try:
        return schema.model_validate(data)
    except ValidationError as err:
        raise SlimforgeError(f"{source}: {describe_errors(err, schema)}") from None


class _Loader(yaml.SafeLoader):
    """YAML 1.2 floats: PyYAML (YAML 1.1) reads `1e-3` as a string, and strict params would then
    refuse a learning rate written the usual way."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|\.[0-9_]+(?:[eE][-+]?[0-9]+)?"
               r"|[0-9][0-9_]*[eE][-+]?[0-9]+|\.inf|\.Inf|\.INF|\.nan|\.NaN|\.NAN)$"),
    list("-+0123456789."))


def read_yaml(path: str | Path) -> Any:
    """A params-style YAML file as Python data (None when empty), floats read the YAML 1.2 way."""
    path = Path(path)
    if not path.is_file():
        raise SlimforgeError(f"params file {path} not found")
    try:
        data = yaml.load(path.read_text(), Loader=_Loader)
    except yaml.YAMLError as err:
        raise SlimforgeError(f"{path}: not valid YAML: {str(err).splitlines()[0]}") from None
    return data


def load_params(path: str | Path, schema: type[S]) -> S:
    """Read and validate one params YAML file."""
    return parse_params(read_yaml(path), schema, str(path))


class Preset(Schedule):
    """Architecture, optimiser and schedule of the embedded model for one machine class."""

    hidden_size: int = Field(gt=0, description="model width")
    num_layers: int = Field(ge=1, description="decoder layers (>= 6 so a per-layer sparsity search means something)")
    num_heads: int = Field(ge=1, description="query heads")
    num_kv_heads: int = Field(ge=1, description="key/value heads (< num_heads: grouped-query attention)")
    intermediate_size: int = Field(gt=0, description="MLP width")
    max_positions: int = Field(ge=64, description="context length")
    vocab_size: int = Field(ge=262, description="BPE vocabulary (256 bytes + 3 specials + merges)")
    initializer_range: float = Field(gt=0, description="std of the normal weight init")
    adam_beta2: float = Field(gt=0, lt=1, description="AdamW second-moment decay")
    amp: Literal["none", "bf16"] = Field("none", description="autocast dtype on GPU")
    compile: bool = Field(False, description="torch.compile the model (GPU; pays off on long runs)")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = cuda when available")
    log_every: int = Field(ge=1, description="steps between logged losses")

    @model_validator(mode="after")
    def _gqa_shapes(self) -> Preset:
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError(f"hidden_size {self.hidden_size} must divide by num_heads {self.num_heads}, "
                             f"and num_heads by num_kv_heads {self.num_kv_heads}")
        if self.steps < 1:
            raise ValueError("a preset trains for at least one step")
        return self


# The decoder projections a LoRA or a quantizer can target (Llama-family names).
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def check_projections(targets: list[str]) -> list[str]:
    """`targets` as given, if a non-empty subset of PROJECTIONS (a params validator)."""
    bad = [t for t in targets if t not in PROJECTIONS]
    if bad or not targets:
        raise ValueError(f"targets must be a non-empty subset of {', '.join(PROJECTIONS)}; unknown: {bad}")
    return targets
