"""One matmul for the projections that read the same input: q|k|v of each attention block and
gate|up of each MLP, for decoding (issue 19). In place, on nn.Linear or QuantLinear layers:

    from slimforge.fused_projections import fuse_projections
    model, tokenizer = load_quantized("data/quantized", device="cuda")
    fuse_projections(model)   # -> number of groups fused

Why: a decode step of a Llama-3-8B-shape model makes 7 matmuls per layer at M = batch; the k/v ones
(1024 x 4096, 2 MB at 4 bits) are too small to fill the GPU, and every launch pays its start-up.
Back to back in a CUDA graph one low-bit call on the concatenated 6144 x 4096 weight takes 8.3 us
against 14.0 us for the three (W4, M=1), gate|up 25.2 against 31.1 us
(benchmarks/2026-11-30-h200-fused-projections.json).

How: the group's weights are concatenated along the output dimension into one layer, kept by the
parent module (`qkv_proj`, `gate_up_proj`); each member becomes a ProjectionSlice that returns its
columns of the fused output. The first member called with an input computes the fused product and
keeps it until the others, called with the same tensor (same object, not modified in place since),
have sliced it, so the model's own forward code runs unchanged. A member called with any other
input (or twice) recomputes, so results never depend on call order. Under torch.compile the
sharing is traced too (one matmul per group in the graph; identity alone decides there). Inference only: the fused layer is one
parameter set (no adapters); layers with a low-rank correction or wrapped by PEFT are left alone.
The packed format on disk is unchanged: fuse after loading (a fused model is for running, not saving).
"""

from __future__ import annotations

import torch
from torch import nn

from kernels.quant_linear import QuantLinear
from slimforge import SlimforgeError

GROUPS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


class FusedProjection(nn.Module):
    """The concatenated layer of one group, and its output for the current input until every
    member has taken its columns (then it is dropped: a long prefill's output is not kept)."""

    def __init__(self, fused: nn.Module, out_features: list[int]):
        super().__init__()
        self.fused = fused
        self.bounds = [(sum(out_features[:i]), sum(out_features[: i + 1])) for i in range(len(out_features))]
        self._pending: tuple | None = None  # (x, x's version, output, members yet to read it)

    def columns(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """Member `index`'s columns of fused(x)."""
        start, end = self.bounds[index]
        p = self._pending
        if p is not None and p[0] is x and p[1] == _version(x) and index in p[3]:
            p[3].discard(index)
            if not p[3]:
                self._pending = None
            return p[2][..., start:end]
        y = self.fused(x)
        self._pending = (x, _version(x), y, set(range(len(self.bounds))) - {index})
        return y[..., start:end]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fused(x)


class ProjectionSlice(nn.Module):
    """What replaces a member: its columns [start, end) of the group's fused output."""

    def __init__(self, owner: FusedProjection, index: int):
        super().__init__()
        self._owner = [owner]  # a list, not an attribute: the parent registers the owner once
        self.index = index
        self.start, self.end = owner.bounds[index]
        self.in_features, self.out_features = owner.fused.in_features, self.end - self.start

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._owner[0].columns(x, self.index)

    def extra_repr(self) -> str:
        return f"columns [{self.start}, {self.end}) of the fused output"


def _version(x: torch.Tensor) -> int:
    """x's in-place version; -1 (identity alone decides) for inference-mode tensors, which keep no
    counter, and under torch.compile, where the counter is not traceable."""
    if torch.compiler.is_compiling():
        return -1
    try:
        return x._version
    except RuntimeError:
        return -1


def _fusable(layers: list[nn.Module]) -> bool:
    """Same type (exactly nn.Linear or QuantLinear: not PEFT wrappers), input width, dtype, device,
    bias presence and, for QuantLinear, format and no low-rank correction."""
    first = layers[0]
    if type(first) not in (nn.Linear, QuantLinear) or any(type(m) is not type(first) for m in layers):
        return False
    same = lambda f: all(f(m) == f(first) for m in layers)
    if not (same(lambda m: m.in_features) and same(lambda m: m.bias is None)):
        return False
    if isinstance(first, QuantLinear):
        return same(lambda m: (m.bits, m.group, m.packed.device)) and all(m.rank == 0 for m in layers) and \
            same(lambda m: None if m.bias is None else m.bias.dtype)
    return same(lambda m: (m.weight.dtype, m.weight.device))


def concatenate(layers: list[nn.Module]) -> nn.Module:
    """One layer computing all of `layers` (fusable ones) side by side along the output."""
    first = layers[0]
    cat = lambda name: torch.cat([getattr(m, name) for m in layers]).detach()
    n = sum(m.out_features for m in layers)
    if isinstance(first, QuantLinear):
        fused = QuantLinear(first.in_features, n, first.bits, first.group, bias=first.bias is not None,
                            device=first.packed.device, dtype=first.bias.dtype if first.bias is not None else None)
        for name in ("packed", "scale", "zero") + (("bias",) if first.bias is not None else ()):
            getattr(fused, name).copy_(cat(name))
        return fused.requires_grad_(False)
    fused = nn.Linear(first.in_features, n, bias=first.bias is not None, device=first.weight.device,
                      dtype=first.weight.dtype)
    with torch.no_grad():
        fused.weight.copy_(cat("weight"))
        if first.bias is not None:
            fused.bias.copy_(cat("bias"))
    return fused.requires_grad_(False)


def fuse_projections(model: nn.Module) -> int:
    """Fuse every q|k|v and gate|up group of `model` (in place); returns how many groups were fused.
    Groups whose layers differ in type, input width, dtype, device, bias or format, carry a low-rank
    correction, or are already fused, are left as they are."""
    fused = 0
    for parent in list(model.modules()):
        for group_name, members in GROUPS.items():
            layers = [getattr(parent, name, None) for name in members]
            if any(m is None for m in layers) or not _fusable(layers):
                continue
            if hasattr(parent, group_name):
                raise SlimforgeError(f"{type(parent).__name__} already has an attribute {group_name!r}: "
                                     f"cannot fuse {', '.join(members)} into it")
            owner = FusedProjection(concatenate(layers), [m.out_features for m in layers])
            parent.add_module(group_name, owner)
            for i, name in enumerate(members):
                setattr(parent, name, ProjectionSlice(owner, i))
            fused += 1
    return fused
