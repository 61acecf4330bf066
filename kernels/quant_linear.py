"""QuantLinear: an nn.Linear replacement on the low-bit kernels (packed weight, optional trainable
low-rank factors), used by the quantize stage's folders, QLoRA(M) training and the benchmarks.

    from kernels.quant_linear import QuantLinear
    layer = QuantLinear.from_linear(nn.Linear(4096, 4096), bits=4, group=128)
"""

from __future__ import annotations

import math

import torch
from torch import nn

from kernels.dispatch import use_triton
from kernels.lowbit import lowbit_linear_checked, needs_grad
from kernels.lowbit_op import lowbit_linear_op
from kernels.lowbit_format import (check_format, check_lowbit_args, dequantize_groups, pack, packed_words,
                                   quantize_groups, unpack)
from kernels.reference import dense_lowbit_ref


def padded_width(in_features: int, group: int) -> int:
    """The packed weight's K: in_features rounded up to a multiple of the group."""
    return -(-in_features // group) * group


class QuantLinear(nn.Module):
    """nn.Linear replacement holding a packed low-bit weight (buffers packed, scale, zero; optional
    bias buffer) and optional trainable low-rank factors `down` (r, K) and `up` (out, r), so that
    y = x @ W_hat^T + (x @ down^T) @ up^T + bias.

    in_features need not be a multiple of the group (pruned widths): the packed weight, scale, zero
    and `down` then have K = packed_in_features = padded_width(in_features, group) columns, the
    extra ones quantizing zero-padded weight columns, and forward pads x with zeros to K."""

    def __init__(self, in_features: int, out_features: int, bits: int, group: int, bias: bool = False,
                 rank: int = 0, device=None, dtype: torch.dtype | None = None):
        super().__init__()
        check_format(bits, group)
        dtype = dtype or torch.get_default_dtype()
        k = padded_width(in_features, group)
        self.in_features, self.out_features, self.bits, self.group = in_features, out_features, bits, group
        self.packed_in_features = k
        self.register_buffer("packed", torch.zeros(out_features, packed_words(bits, k), dtype=torch.int32, device=device))
        self.register_buffer("scale", torch.ones(out_features, k // group, dtype=torch.float16, device=device))
        self.register_buffer("zero", torch.zeros(out_features, k // group, dtype=torch.float16, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)
        self.down = nn.Parameter(torch.empty(rank, k, dtype=dtype, device=device)) if rank else None
        self.up = nn.Parameter(torch.zeros(out_features, rank, dtype=dtype, device=device)) if rank else None
        if rank:  # as PEFT inits LoRA: random A (down), zero B (up), so the layer starts at W_hat
            nn.init.kaiming_uniform_(self.down, a=math.sqrt(5))

    @property
    def qweight(self) -> torch.Tensor:
        """The packed weight under the name PEFT looks for to place LoRA adapters on this layer's
        device (QLoRAM wraps QuantLinear with peft's LoRA layer)."""
        return self.packed

    @property
    def rank(self) -> int:
        return self.down.shape[0] if self.down is not None else 0

    @classmethod
    def empty(cls, in_features: int, out_features: int, bits: int, group: int, rank: int = 0, bias: bool = False,
              device=None, dtype: torch.dtype | None = None) -> "QuantLinear":
        """A layer of the right shapes to load a state dict into (e.g. from safetensors)."""
        return cls(in_features, out_features, bits, group, bias=bias, rank=rank, device=device, dtype=dtype)

    @classmethod
    def from_quantized(cls, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group: int,
                       bias: torch.Tensor | None = None, down: torch.Tensor | None = None,
                       up: torch.Tensor | None = None, in_features: int | None = None) -> "QuantLinear":
        """From quantize_groups output (q uint8 (N, K), scale/zero fp16 (N, K/group)); `in_features`
        (default K) is the layer's true input width when q quantizes zero-padded columns."""
        n, k = q.shape
        in_features = k if in_features is None else in_features
        if padded_width(in_features, group) != k:
            raise ValueError(f"q has {k} columns; in_features {in_features} with group {group} needs "
                             f"{padded_width(in_features, group)}")
        if (down is None) != (up is None):
            raise ValueError("down and up must be given together (or neither)")
        dtype = bias.dtype if bias is not None else (down.dtype if down is not None else None)
        layer = cls(in_features, n, bits, group, bias=bias is not None, rank=0, device=q.device, dtype=dtype)
        layer.packed.copy_(pack(q, bits))
        layer.scale.copy_(scale)
        layer.zero.copy_(zero)
        if bias is not None:
            layer.bias.copy_(bias.detach())
        if down is not None:
            if down.shape[1] != k or up.shape[0] != n:
                raise ValueError(f"low-rank factors must be down (r, {k}) and up ({n}, r), got "
                                 f"{tuple(down.shape)} and {tuple(up.shape)}")
            # contiguous copies: what a reload from safetensors gives, so results match it bit for bit
            layer.down = nn.Parameter(down.detach().clone(memory_format=torch.contiguous_format))
            layer.up = nn.Parameter(up.detach().clone(memory_format=torch.contiguous_format))
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, group: int, rank: int = 0) -> "QuantLinear":
        """Round-to-nearest quantization of linear.weight (columns zero-padded to a multiple of the
        group); rank > 0 adds PEFT-initialised factors (up = 0: the output starts at x @ W_hat^T)."""
        w = linear.weight.detach()
        k = padded_width(linear.in_features, group)
        w = nn.functional.pad(w, (0, k - linear.in_features))
        layer = cls.from_quantized(*quantize_groups(w, bits, group), bits, group, in_features=linear.in_features,
                                   bias=linear.bias.detach() if linear.bias is not None else None)
        if rank:
            fresh = cls(linear.in_features, linear.out_features, bits, group, rank=rank, device=w.device, dtype=w.dtype)
            layer.down, layer.up = fresh.down, fresh.up
        return layer

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W_hat (out, in_features) in `dtype` (materialised: for export and checks, not the forward)."""
        w = dequantize_groups(unpack(self.packed, self.bits, self.packed_in_features), self.scale, self.zero,
                              self.group, dtype)
        return w[:, : self.in_features]

    def to_linear(self, dtype: torch.dtype = torch.float32) -> nn.Linear:
        """A frozen nn.Linear with the folded weight (W_hat + up @ down, padded columns dropped) in
        `dtype`: in fp32, the same weight and results as the CPU forward, without its per-call checks."""
        w = self._dense_weight(folded=True).to(dtype)
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = nn.Parameter(w, requires_grad=False)  # no random init of a throwaway weight
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias.detach().to(dtype, copy=True), requires_grad=False)
        self.__dict__.pop("_dense", None)  # the Linear owns the weight now: no second copy, no shared
        self.__dict__.pop("_dense_src", None)  # cache that an edit of the Linear would make stale
        return linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected input (..., {self.in_features}), got {tuple(x.shape)}")
        if not use_triton(x):
            # CPU: no kernels, so the weight is dequantised once and kept. Outside training of the
            # correction it is folded in too (W_hat + up @ down, padded columns dropped): one matmul,
            # as in nn.Linear; per call, unpacking cost 3x the matmul and the correction 2 more.
            down, bias = self._parameters.get("down"), self._buffers.get("bias")  # no __getattr__ per call
            if down is not None and torch.is_grad_enabled() and (down.requires_grad or self.up.requires_grad):
                return dense_lowbit_ref(self._pad(x), self._dense_weight(), down, self.up, bias)
            w = self._dense_weight(folded=True)
            if x.dtype == torch.float32:  # the usual CPU model: no casts (each costs ~1 us at decode sizes)
                return nn.functional.linear(x, w, bias if bias is None or bias.dtype == torch.float32 else bias.float())
            return nn.functional.linear(x.float(), w, None if bias is None else bias.float()).to(x.dtype)
        x = self._pad(x)
        if x.dtype == torch.float32:
            # An fp32 model (the embedded one) on CUDA: the kernels compute in fp16 with fp32
            # accumulation, and the result goes back to fp32 for the rest of the model.
            return self._lowbit(x.half(), self.bias.half() if self.bias is not None else None).float()
        return self._lowbit(x, self.bias)

    def _lowbit(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The kernels; as the custom op while torch.compile traces a forward that needs no gradients
        (one node in the compiled graph, kernels/lowbit_op.py)."""
        packed, scale, zero, down, up = self.packed, self.scale, self.zero, self.down, self.up
        if torch.compiler.is_compiling():  # checks run at trace time only: no state to keep
            if not needs_grad(x, down, up, bias):
                return lowbit_linear_op(x, packed, scale, zero, self.bits, self.group, down, up, bias)
            check_lowbit_args(x, packed, scale, zero, self.bits, self.group, self.out_features, down, up, bias)
            return lowbit_linear_checked(x, packed, scale, zero, self.bits, self.group, down, up, bias)
        # lowbit_linear's argument checks cost about what the dequantise launch does on a GPU host (and
        # QLoRAM's training step is host-bound, benchmarks/2026-11-30-h200-qloram-host-bound.json): run
        # them once per set of tensors (held here, so no id is reused while they are compared; dropped
        # by _apply) and x's dtype and device; forward checks x's width
        tensors = (packed, scale, zero, down, up, bias)
        checked = self.__dict__.get("_checked")
        if (checked is None or checked[1] != x.dtype or checked[2] != x.get_device()
                or any(a is not b for a, b in zip(checked[0], tensors))):
            check_lowbit_args(x, packed, scale, zero, self.bits, self.group, self.out_features, down, up, bias)
            self.__dict__["_checked"] = (tensors, x.dtype, x.get_device())
        return lowbit_linear_checked(x, packed, scale, zero, self.bits, self.group, down, up, bias)

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        """x with zero columns up to packed_in_features (they meet the padded weight columns)."""
        if self.packed_in_features == self.in_features:
            return x
        return nn.functional.pad(x, (0, self.packed_in_features - self.in_features))

    def _dense_weight(self, folded: bool = False) -> torch.Tensor:
        """fp32 W_hat (out, packed_in_features), or with `folded` W_hat + up @ down cut to
        (out, in_features); rebuilt when a tensor it came from changes (moved, loaded, edited in place,
        an optimizer step). Not a buffer: the packed form stays the only one in state_dict and on disk;
        the copy costs 4 bytes per weight of RAM on the non-GPU path only."""
        b, p = self._buffers, self._parameters  # not nn.Module.__getattr__: this runs every call
        packed, scale, zero = b["packed"], b["scale"], b["zero"]
        down, up = (p.get("down"), p.get("up")) if folded else (None, None)
        # the same tensor objects at the same in-place versions (identity and _version are ~40 ns
        # reads; the data_ptr() key this replaced cost ~1 us per call at decode sizes)
        versions = (folded, packed._version, scale._version, zero._version,
                    None if down is None else (down._version, up._version))
        src = self.__dict__.get("_dense_src")
        if (src is not None and src[0] is packed and src[1] is scale and src[2] is zero and src[3] is down
                and src[4] is up and src[5] == versions):
            return self._dense
        w = dequantize_groups(unpack(packed, self.bits, self.packed_in_features), scale, zero, self.group)
        if folded:
            if down is not None:
                w = w + up.detach().float() @ down.detach().float()
            w = w[:, : self.in_features].contiguous()
        self._dense, self._dense_src = w, (packed, scale, zero, down, up, versions)
        return w

    def _apply(self, fn, recurse=True):
        """Moves and casts drop the CPU copy of the weight (the next CPU call rebuilds it), so a layer
        sent to the GPU does not keep it alive."""
        self.__dict__.pop("_dense", None)
        self.__dict__.pop("_dense_src", None)
        self.__dict__.pop("_checked", None)  # nor the old tensors' identities (it would keep them alive)
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        pad = f" (packed {self.packed_in_features})" if self.packed_in_features != self.in_features else ""
        return (f"in_features={self.in_features}{pad}, out_features={self.out_features}, bits={self.bits}, "
                f"group={self.group}, rank={self.rank}, bias={self.bias is not None}")
