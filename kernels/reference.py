"""Plain PyTorch references for the kernels: the definitions the Triton code is tested against,
and what runs on CPU.

The log-softmax statistics take logits of shape (..., V); everything computes in fp32.
"""

from __future__ import annotations

import torch


def token_logprobs_ref(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """log softmax(logits)[target] per position; 0 where target == ignore_index."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    keep = targets != ignore_index
    out = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(keep, out, torch.zeros_like(out))


def kl_divergence_ref(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per position, p = softmax(p_logits) (e.g. the teacher), q = softmax(q_logits)."""
    logp = torch.log_softmax(p_logits.float(), dim=-1)
    logq = torch.log_softmax(q_logits.float(), dim=-1)
    p = logp.exp()
    # Terms with p = 0 are 0. Masking the inputs of the product (not its output) keeps the
    # gradient finite where logits are -inf (0 * inf would poison it with NaN).
    live = p > 0
    return (p * (torch.where(live, logp, 0.0) - torch.where(live, logq, 0.0))).sum(-1)


def entropy_ref(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) per position, in nats."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    p = logp.exp()
    return -(p * torch.where(p > 0, logp, 0.0)).sum(-1)  # masked inside: see kl_divergence_ref


def lowbit_matmul_ref(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                      bits: int, group: int, down: torch.Tensor | None = None, up: torch.Tensor | None = None,
                      bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W_hat^T (+ (x @ down^T) @ up^T) (+ bias) with W_hat = dequantize(unpack(packed)), all
    in fp32, cast back to x's dtype. x (..., K); packed (N, K*bits/32) int32; scale, zero (N, K/group);
    down (r, K), up (N, r). Differentiable in x, down, up and bias."""
    from kernels.lowbit_format import dequantize_groups, unpack

    return dense_lowbit_ref(x, dequantize_groups(unpack(packed, bits, x.shape[-1]), scale, zero, group), down, up,
                            bias)


def dense_lowbit_ref(x: torch.Tensor, w: torch.Tensor, down: torch.Tensor | None = None,
                     up: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """lowbit_matmul_ref with W_hat already dequantised (fp32, (N, K)): the same ops in the same order,
    so a layer that keeps W_hat (QuantLinear off the GPU kernels) computes bit-identical outputs."""
    xf = x.float()
    y = xf @ w.t()
    if down is not None:
        y = y + (xf @ down.float().t()) @ up.float().t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
