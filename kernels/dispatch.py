"""Where a kernel op runs: Triton for CUDA tensors, and for CPU tensors under TRITON_INTERPRET=1
(how the CPU tests run the Triton code); the PyTorch reference otherwise, e.g. on a machine
without triton."""

from __future__ import annotations

import os

import torch

try:
    import triton
except ImportError:
    triton = None


# Read once, as triton.jit reads it when the kernels are defined (setting it later cannot turn the
# interpreter on); use_triton runs on every layer call, where an environment lookup costs ~1 us.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def interpreting() -> bool:
    return _INTERPRET


def use_triton(t: torch.Tensor) -> bool:
    return triton is not None and (t.is_cuda or _INTERPRET)
