"""Fused log-softmax statistics over large vocabularies: per-token log-prob of given tokens,
KL(p || q) between two logit tensors, and entropy -- forward and backward -- without ever
materialising fp32 probabilities of the whole vocabulary.

One Triton program handles one row (position) and walks the vocabulary in BLOCK-wide chunks with
an online max/sum (pass 1: log-sum-exp), then accumulates the statistic (pass 2). The backward
recomputes the softmax chunk by chunk from the saved log-sum-exp and writes the gradient in the
logits' dtype. Memory beyond inputs and outputs: a few fp32 numbers per row. The plain PyTorch
expression holds two to four fp32 (N, V) tensors (21.5 GiB at N=8192, V=128k).

    from kernels.logsoftmax_stats import token_logprobs, kl_divergence, entropy
    python -m kernels.bench_logsoftmax          # timing and peak memory vs PyTorch

Dispatch: Triton for CUDA tensors (and for CPU tensors under TRITON_INTERPRET=1, which the tests
use); the references in kernels/reference.py otherwise.
"""

from __future__ import annotations

import torch

from kernels.dispatch import interpreting, use_triton
from kernels.reference import entropy_ref, kl_divergence_ref, token_logprobs_ref

try:
    import triton
    import triton.language as tl
except ImportError:  # a machine without triton still gets the references
    triton = None


if triton is not None:
    # finite "minus infinity": keeps exp(m_old - m_new) defined on the first chunk (a jit'ed
    # function may only read globals that are constexpr)
    NEG: tl.constexpr = tl.constexpr(-1.0e30)

    @triton.jit
    def _lse(row_ptr, V, BLOCK: tl.constexpr):
        """Log-sum-exp of one row of V logits, by chunks, in fp32."""
        m = tl.full((), NEG, tl.float32)
        s = tl.zeros((), tl.float32)
        for start in range(0, V, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            x = tl.load(row_ptr + offs, mask=offs < V, other=NEG).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, 0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
            m = m_new
        return m + tl.log(s)

    @triton.jit
    def _logprob_fwd(X, T, OUT, LSE, stride, V, ignore_index, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        lse = _lse(X + row * stride, V, BLOCK)
        t = tl.load(T + row)
        keep = t != ignore_index
        x_t = tl.load(X + row * stride + tl.where(keep, t, 0)).to(tl.float32)
        tl.store(OUT + row, tl.where(keep, x_t - lse, 0.0))
        tl.store(LSE + row, lse)

    @triton.jit
    def _logprob_bwd(X, T, LSE, G, DX, stride, V, ignore_index, BLOCK: tl.constexpr):
        """d/dx log p_t = onehot(t) - softmax(x)."""
        row = tl.program_id(0).to(tl.int64)
        t = tl.load(T + row)
        g = tl.where(t != ignore_index, tl.load(G + row), 0.0)
        lse = tl.load(LSE + row)
        for start in range(0, V, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < V
            x = tl.load(X + row * stride + offs, mask=mask, other=NEG).to(tl.float32)
            grad = g * (tl.where(offs == t, 1.0, 0.0) - tl.exp(x - lse))
            tl.store(DX + row * stride + offs, grad.to(DX.dtype.element_ty), mask=mask)

    @triton.jit
    def _kl_fwd(P, Q, OUT, LSE_P, LSE_Q, stride_p, stride_q, V, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        lse_p = _lse(P + row * stride_p, V, BLOCK)
        lse_q = _lse(Q + row * stride_q, V, BLOCK)
        acc = tl.zeros((), tl.float32)
        for start in range(0, V, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < V
            lp = tl.load(P + row * stride_p + offs, mask=mask, other=NEG).to(tl.float32) - lse_p
            lq = tl.load(Q + row * stride_q + offs, mask=mask, other=0.0).to(tl.float32) - lse_q
            p = tl.exp(lp)
            acc += tl.sum(tl.where(p > 0, p * (lp - lq), 0.0), 0)
        tl.store(OUT + row, acc)
        tl.store(LSE_P + row, lse_p)
        tl.store(LSE_Q + row, lse_q)

    @triton.jit
    def _kl_bwd(P, Q, LSE_P, LSE_Q, KL, G, DP, DQ, stride_p, stride_q, V,
                NEED_DP: tl.constexpr, NEED_DQ: tl.constexpr, BLOCK: tl.constexpr):
        """d/dq = softmax(q) - softmax(p);  d/dp = p * (log p - log q - KL)."""
        row = tl.program_id(0).to(tl.int64)
        g = tl.load(G + row)
        lse_p = tl.load(LSE_P + row)
        lse_q = tl.load(LSE_Q + row)
        kl = tl.load(KL + row)
        for start in range(0, V, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < V
            lp = tl.load(P + row * stride_p + offs, mask=mask, other=NEG).to(tl.float32) - lse_p
            lq = tl.load(Q + row * stride_q + offs, mask=mask, other=NEG).to(tl.float32) - lse_q
            p = tl.exp(lp)
            if NEED_DQ:
                tl.store(DQ + row * stride_q + offs, (g * (tl.exp(lq) - p)).to(DQ.dtype.element_ty), mask=mask)
            if NEED_DP:
                dp = tl.where(p > 0, g * p * (lp - lq - kl), 0.0)
                tl.store(DP + row * stride_p + offs, dp.to(DP.dtype.element_ty), mask=mask)

    @triton.jit
    def _entropy_fwd(X, OUT, LSE, stride, V, BLOCK: tl.constexpr):
        """H = lse - sum_i p_i x_i."""
        row = tl.program_id(0).to(tl.int64)
        lse = _lse(X + row * stride, V, BLOCK)
        acc = tl.zeros((), tl.float32)
        for start in range(0, V, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            x = tl.load(X + row * stride + offs, mask=offs < V, other=NEG).to(tl.float32)
            p = tl.exp(x - lse)
            acc += tl.sum(tl.where(p > 0, p * x, 0.0), 0)
        tl.store(OUT + row, lse - acc)
        tl.store(LSE + row, lse)

    @triton.jit
    def _entropy_bwd(X, LSE, H, G, DX, stride, V, BLOCK: tl.constexpr):
        """dH/dx_i = -p_i (log p_i + H)."""
        row = tl.program_id(0).to(tl.int64)
        g = tl.load(G + row)
        lse = tl.load(LSE + row)
        h = tl.load(H + row)
        for start in range(0, V, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < V
            lp = tl.load(X + row * stride + offs, mask=mask, other=NEG).to(tl.float32) - lse
            p = tl.exp(lp)
            grad = tl.where(p > 0, -g * p * (lp + h), 0.0)
            tl.store(DX + row * stride + offs, grad.to(DX.dtype.element_ty), mask=mask)

    # Autotuned on the vocabulary size; under the interpreter a fixed block is used instead
    # (autotuning there would time kernels with CUDA events that do not exist).
    _CONFIGS = [triton.Config({"BLOCK": b}, num_warps=w) for b in (1024, 2048, 4096) for w in (4, 8, 16)]
    _TUNED = {k: triton.autotune(_CONFIGS, key=["V"])(k)
              for k in (_logprob_fwd, _logprob_bwd, _kl_fwd, _kl_bwd, _entropy_fwd, _entropy_bwd)}


def _launch(kernel, n_rows: int, *args, **constexprs) -> None:
    if interpreting() or not torch.cuda.is_available():
        kernel[(n_rows,)](*args, **constexprs, BLOCK=256)
    else:
        _TUNED[kernel][(n_rows,)](*args, **constexprs)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """(..., V) -> contiguous (N, V)."""
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"logits must have a non-empty last (vocabulary) dimension, got shape {tuple(x.shape)}")
    return x.reshape(-1, x.shape[-1]).contiguous()


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, ignore_index):
        x, t = _rows(logits), targets.reshape(-1).contiguous().long()
        out = torch.empty(x.shape[0], device=x.device, dtype=torch.float32)
        lse = torch.empty_like(out)
        _launch(_logprob_fwd, x.shape[0], x, t, out, lse, x.stride(0), x.shape[1], ignore_index)
        ctx.save_for_backward(x, t, lse)
        ctx.ignore_index, ctx.shape = ignore_index, logits.shape
        return out.view(targets.shape)

    @staticmethod
    def backward(ctx, grad):
        x, t, lse = ctx.saved_tensors
        dx = torch.empty_like(x)
        _launch(_logprob_bwd, x.shape[0], x, t, lse, grad.reshape(-1).float().contiguous(), dx,
                x.stride(0), x.shape[1], ctx.ignore_index)
        return dx.view(ctx.shape), None, None


class _KLDivergence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, p_logits, q_logits):
        p, q = _rows(p_logits), _rows(q_logits)
        out = torch.empty(p.shape[0], device=p.device, dtype=torch.float32)
        lse_p, lse_q = torch.empty_like(out), torch.empty_like(out)
        _launch(_kl_fwd, p.shape[0], p, q, out, lse_p, lse_q, p.stride(0), q.stride(0), p.shape[1])
        ctx.save_for_backward(p, q, lse_p, lse_q, out)
        ctx.shape = p_logits.shape
        return out.view(p_logits.shape[:-1])

    @staticmethod
    def backward(ctx, grad):
        p, q, lse_p, lse_q, kl = ctx.saved_tensors
        need_dp, need_dq = ctx.needs_input_grad
        dp = torch.empty_like(p) if need_dp else p  # placeholder pointer when not written
        dq = torch.empty_like(q) if need_dq else q
        _launch(_kl_bwd, p.shape[0], p, q, lse_p, lse_q, kl, grad.reshape(-1).float().contiguous(), dp, dq,
                p.stride(0), q.stride(0), p.shape[1], NEED_DP=need_dp, NEED_DQ=need_dq)
        return (dp.view(ctx.shape) if need_dp else None), (dq.view(ctx.shape) if need_dq else None)


class _Entropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits):
        x = _rows(logits)
        out = torch.empty(x.shape[0], device=x.device, dtype=torch.float32)
        lse = torch.empty_like(out)
        _launch(_entropy_fwd, x.shape[0], x, out, lse, x.stride(0), x.shape[1])
        ctx.save_for_backward(x, lse, out)
        ctx.shape = logits.shape
        return out.view(logits.shape[:-1])

    @staticmethod
    def backward(ctx, grad):
        x, lse, h = ctx.saved_tensors
        dx = torch.empty_like(x)
        _launch(_entropy_bwd, x.shape[0], x, lse, h, grad.reshape(-1).float().contiguous(), dx,
                x.stride(0), x.shape[1])
        return dx.view(ctx.shape)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """log softmax(logits)[targets] (fp32, shape of `targets`); 0 where targets == ignore_index.
    logits: (..., V) float; targets: (...) integer."""
    if targets.shape != logits.shape[:-1]:
        raise ValueError(f"targets shape {tuple(targets.shape)} must equal logits shape without the "
                         f"vocabulary dimension {tuple(logits.shape[:-1])}")
    if use_triton(logits):
        return _TokenLogprobs.apply(logits, targets, ignore_index)
    return token_logprobs_ref(logits, targets, ignore_index)


def kl_divergence(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(p_logits) || softmax(q_logits)) per position (fp32, shape (...)). Gradients flow
    to whichever input requires them (q: the student in distillation; p: e.g. a trained judge)."""
    if p_logits.shape != q_logits.shape:
        raise ValueError(f"p_logits {tuple(p_logits.shape)} and q_logits {tuple(q_logits.shape)} must "
                         f"have the same shape")
    if use_triton(p_logits):
        return _KLDivergence.apply(p_logits, q_logits)
    return kl_divergence_ref(p_logits, q_logits)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) per position, in nats (fp32, shape (...))."""
    if use_triton(logits):
        return _Entropy.apply(logits)
    return entropy_ref(logits)
