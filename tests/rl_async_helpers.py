"""Picklable top-level callables for tests/test_rl_async.py: the rollout worker is a spawned
process, which imports these by name (tests/ has no __init__.py, so they cannot live in the test
module itself)."""

from __future__ import annotations

import time

import torch
from torch import nn


def build_linear() -> nn.Module:
    """A one-weight 'policy' whose weight the trainer sets to its version number."""
    return nn.Linear(1, 1, bias=False)


def weight_state(version: int) -> dict[str, torch.Tensor]:
    return {"weight": torch.full((1, 1), float(version))}


def record_rollout(model: nn.Module, batch_index: int, version: int, delay: float = 0.0, slow_from: int = 0,
                   fail_at: int | None = None) -> dict:
    """Report what the worker saw: the weight it generated with, and a tensor to test transport.
    Batches from `slow_from` on take `delay` seconds (a slow rollout)."""
    if batch_index == fail_at:
        raise ValueError(f"boom at batch {batch_index}")
    if batch_index >= slow_from:
        time.sleep(delay)
    return {"weight": model.weight.item(), "batch": batch_index, "version": version,
            "tokens": torch.arange(4) + batch_index}
