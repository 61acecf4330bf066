"""LoRAM recovery: expand a pruned model's LoRA adapter to the full model's shape with plan.json.

A LoRA on a linear W (out x in) is delta = B @ A with A (r x in), B (out x r). Pruning cut W's
rows (q/k/v by head, gate/up by MLP channel) or columns (o_proj by query head, down_proj by
channel); the hidden-size side is never cut. So only one factor per matrix changes shape:

    rows cut  (q, k, v, gate, up):  B (kept_out x r)  ->  (out x r), zero rows at pruned outputs
    cols cut  (o, down):            A (r x kept_in)   ->  (r x in),  zero columns at pruned inputs
                                    (or small random values, `init="random"`)

With zeros, the full model's delta equals the pruned delta scattered into the kept rows/columns
and is zero elsewhere: on the sub-network the prune kept, full model + recovered adapter adds
exactly what the adapter added to the pruned model. Pure functions on tensors; no model needed.
"""

from __future__ import annotations

import re

import torch

from slimforge import SlimforgeError
from slimforge.pruning import PrunePlan
from slimforge.pruning.surgery import layer_indices

KEY = re.compile(r"layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_(A|B)\.weight$")


def full_width(plan: PrunePlan, module: str) -> int:
    """Size of the cut dimension of `module` ('self_attn.q_proj', ...) in the unpruned model."""
    attn = {"q_proj": plan.num_heads, "k_proj": plan.num_kv_heads, "v_proj": plan.num_kv_heads,
            "o_proj": plan.num_heads}
    name = module.split(".")[-1]
    return attn[name] * plan.head_dim if name in attn else plan.intermediate_size


def recover_tensor(key: str, tensor: torch.Tensor, plan: PrunePlan, init: str = "zeros", std: float = 0.0,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """One adapter tensor (PEFT key '...layers.{i}.{self_attn|mlp}.{proj}.lora_{A|B}.weight') in the
    full model's shape."""
    m = KEY.search(key)
    if m is None:
        raise SlimforgeError(f"adapter tensor {key}: recovery handles lora_A/lora_B of the decoder projections "
                             "only (no lm_head, embeddings, biases or modules_to_save)")
    layer, module, factor = int(m[1]), f"{m[2]}.{m[3]}", m[4]
    if layer >= len(plan.layers):
        raise SlimforgeError(f"adapter tensor {key}: layer {layer} is not in the plan ({len(plan.layers)} layers)")
    indices = layer_indices(plan, layer)
    if module not in indices:
        raise SlimforgeError(f"adapter tensor {key}: {module} is not a prunable projection")
    dim, kept = indices[module]
    kept = kept.to(tensor.device)
    if dim == "rows" and factor == "B":
        return _scatter(tensor, 0, kept, full_width(plan, module), "zeros", 0.0, generator)
    if dim == "cols" and factor == "A":
        return _scatter(tensor, 1, kept, full_width(plan, module), init, std, generator)
    return tensor.clone()  # the hidden-size side: unchanged


def _scatter(t: torch.Tensor, dim: int, kept: torch.Tensor, full: int, init: str, std: float,
             generator: torch.Generator | None) -> torch.Tensor:
    if t.shape[dim] != len(kept):
        raise SlimforgeError(f"adapter factor has {t.shape[dim]} entries along the pruned dimension, the plan keeps "
                             f"{len(kept)}: the adapter was not trained on this plan's pruned model")
    shape = list(t.shape)
    shape[dim] = full
    if init == "zeros":
        out = torch.zeros(shape, dtype=t.dtype, device=t.device)
    elif init == "random":
        out = torch.randn(shape, generator=generator, dtype=torch.float32).to(t.dtype).to(t.device) * std
    else:
        raise SlimforgeError(f"recovery init {init!r} is not one of zeros, random")
    return out.index_copy(dim, kept, t)


def recover_state(state: dict[str, torch.Tensor], plan: PrunePlan, init: str = "zeros", std: float = 0.0,
                  seed: int = 0) -> dict[str, torch.Tensor]:
    """Every tensor of a pruned model's adapter state dict, in the full model's shape."""
    generator = torch.Generator().manual_seed(seed)
    return {k: recover_tensor(k, v, plan, init, std, generator) for k, v in sorted(state.items())}
