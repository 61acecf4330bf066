"""Input statistics of one projection, and the KL fitness of a masked model."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kernels.logsoftmax_stats import kl_divergence


class _Stop(Exception):
    pass


@torch.no_grad()
def input_stats(model: torch.nn.Module, module: torch.nn.Module, batches: list[dict]
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(H = sum x x^T in fp64, per-column ||x||_2) over the real (unpadded) tokens entering
    `module`. The forward stops as soon as `module` has seen its input, so statistics for layer l
    cost l blocks of compute, not the whole model."""
    state: dict = {}

    def hook(_m, args):
        x = args[0][state["mask"]].double()
        state["h"] = state.get("h", 0) + x.T @ x
        raise _Stop

    handle = module.register_forward_pre_hook(hook)
    try:
        for b in batches:
            state["mask"] = b["attention_mask"].bool()
            try:
                model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
            except _Stop:
                pass
    finally:
        handle.remove()
    h = state["h"]
    return h, h.diagonal().clamp(min=0).sqrt()


@torch.no_grad()
def dense_logits(model: torch.nn.Module, batches: list[dict]) -> list[torch.Tensor]:
    """Reference next-token logits of the unpruned model on the real tokens of each batch."""
    return [model(**b).logits[b["attention_mask"].bool()] for b in batches]


@torch.no_grad()
def mean_kl(model: torch.nn.Module, batches: list[dict], reference: list[torch.Tensor], fraction: float = 1.0,
            topk: int = 0) -> float:
    """Mean KL(dense || model) over the real tokens of the first `fraction` of the batches (they
    are a random sample, so a prefix is a smaller random sample). topk > 0: the sparse KL over the
    dense model's top-k tokens per position."""
    n = max(1, math.ceil(fraction * len(batches)))
    total, count = 0.0, 0
    for b, ref in zip(batches[:n], reference[:n]):
        logits = model(**b).logits[b["attention_mask"].bool()]
        if topk > 0:
            ref_lp = torch.log_softmax(ref.float(), -1)
            top_lp, top_i = ref_lp.topk(topk, dim=-1)
            q_lp = logits.float().gather(-1, top_i) - torch.logsumexp(logits.float(), -1, keepdim=True)
            kl = (top_lp.exp() * (top_lp - q_lp)).sum(-1)
        else:
            kl = kl_divergence(ref, logits)
        total += kl.sum().item()
        count += kl.numel()
    return total / max(count, 1)


@dataclass
class KLProbe:
    """Token batches with the dense model's logits on them: KL(dense || model) in one call."""

    batches: list[dict]
    reference: list[torch.Tensor]

    def __call__(self, model: torch.nn.Module, fraction: float = 1.0, topk: int = 0) -> float:
        return mean_kl(model, self.batches, self.reference, fraction, topk)


def kl_probe(dense: torch.nn.Module, batches: list[dict]) -> KLProbe:
    return KLProbe(batches, dense_logits(dense, batches))
