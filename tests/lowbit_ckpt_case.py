"""Activation checkpointing over QuantLinear layers on the dequantise + matmul path (M >= 128): the
gradients equal those without checkpointing, the recompute's W_hat is handed to the backward that
follows (as many dequantisations as without checkpointing, not 1.5x), and nothing is left behind.
Run by tests/test_lowbit.py under TRITON_INTERPRET=1 in a subprocess, and on a GPU directly:

    python -m tests.lowbit_ckpt_case cpu|cuda      # prints one line per failure
"""

from __future__ import annotations

import sys

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from kernels import lowbit_dequant
from kernels.quant_linear import QuantLinear


def run(device: str) -> list[str]:
    torch.manual_seed(0)
    bf16 = torch.bfloat16  # a bf16 model, as trained; the packed weight's scales stay fp16
    blocks = nn.ModuleList(nn.Sequential(QuantLinear.from_linear(nn.Linear(64, 96, dtype=bf16), 4, 32, rank=4),
                                         nn.SiLU(),
                                         QuantLinear.from_linear(nn.Linear(96, 64, dtype=bf16), 2, 32, rank=4))
                           for _ in range(2)).to(device)
    for p in blocks.parameters():
        nn.init.normal_(p, std=0.1)  # up = 0 at init would hide the factors' gradients
    x0 = torch.randn(2, 80, 64, device=device, dtype=bf16)  # M = 160: the dequantise path
    calls = {"n": 0}
    dequantize = lowbit_dequant.dequantize

    def counted(*args, **kwargs):
        calls["n"] += 1
        return dequantize(*args, **kwargs)

    lowbit_dequant.dequantize = counted
    grads, counts = {}, {}
    try:
        for ckpt in (False, True):
            calls["n"] = 0
            x = x0.clone().requires_grad_()
            h = x
            for block in blocks:
                h = h + (checkpoint(block, h, use_reentrant=False) if ckpt else block(h))
            params = [x, *blocks.parameters()]
            grads[ckpt] = torch.autograd.grad(h.float().square().mean(), params)
            counts[ckpt] = calls["n"]
    finally:
        lowbit_dequant.dequantize = dequantize
    failures = []
    for i, (a, b) in enumerate(zip(grads[False], grads[True])):
        if not torch.equal(a, b):
            failures.append(f"{device}: gradient {i} differs under checkpointing (max {(a - b).abs().max().item():.2e})")
    if counts[True] != counts[False] or counts[False] != 8:  # 4 layers: forward + dx each
        failures.append(f"{device}: dequantisations {counts[False]} without / {counts[True]} with checkpointing, "
                        "want 8 / 8")
    left = getattr(lowbit_dequant, "_RECOMPUTED", {})
    if left:
        failures.append(f"{device}: {len(left)} recomputed weights left behind")
    return failures


if __name__ == "__main__":
    found = run("cuda" if sys.argv[1] == "cuda" else "cpu")
    print("\n".join(found) if found else "checkpointing over QuantLinear matches")
    sys.exit(1 if found else 0)
