"""Schema of params/package.yaml."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from slimforge.config import Schema


class PackageParams(Schema):
    name: str = Field("slimforge-tiny", pattern=r"^[A-Za-z0-9][\w.-]{0,99}$",
                      description="registered model name in the MLflow model registry (letters, digits, . _ -)")
    register_model: bool = Field(True, description="log the full model to MLflow and register it (false: folders only)")
    max_shard_size: str = Field("2GB", pattern=r"^\d+(KB|MB|GB)$",
                                description="safetensors shard size of the full model, e.g. 500MB or 2GB")
    check: bool = Field(True, description="load every deployable in a fresh process and score it on the test "
                        "split; fail unless it matches the pipeline's measurement within the interval")
    eval_batch_size: int = Field(256, gt=0, description="sequences per evaluation batch")
    quantized_export: Literal["auto", "required", "off"] = Field(
        "auto", description="the compressed-tensors export of --quantized: auto skips it (reason in the metrics) "
        "when the format cannot hold the model as is (e.g. a group wider than a layer), required fails then, off skips it")
