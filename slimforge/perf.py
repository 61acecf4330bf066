"""Model FLOPs utilisation (MFU): achieved model FLOPs per second over the device's peak."""

from __future__ import annotations

import torch

# Dense peak TFLOP/s by GPU name fragment and compute dtype (vendor datasheets, SXM parts).
PEAK_TFLOPS = {
    "H200": {torch.bfloat16: 989.0, torch.float16: 989.0, torch.float32: 494.0},
    "H100": {torch.bfloat16: 989.0, torch.float16: 989.0, torch.float32: 494.0},
    "A100": {torch.bfloat16: 312.0, torch.float16: 312.0, torch.float32: 156.0},
}


def train_flops_per_token(model: torch.nn.Module, context: float) -> float:
    """6 FLOPs per matmul weight per token (forward + backward), plus attention scores and values:
    12 * layers * hidden * context (the PaLM appendix B formula, causal half not discounted)."""
    cfg = model.config
    matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    heads_dim = cfg.num_attention_heads * getattr(cfg, "head_dim", cfg.hidden_size // cfg.num_attention_heads)
    return 6.0 * matmul + 12.0 * cfg.num_hidden_layers * heads_dim * context


def peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """Peak FLOP/s of `device` for matmuls in `dtype`, or None when unknown (CPUs, other GPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, table in PEAK_TFLOPS.items():
        if key in name:
            return table.get(dtype, table[torch.float32]) * 1e12
    return None
