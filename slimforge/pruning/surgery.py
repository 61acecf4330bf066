"""Structured surgery: cut a Llama / Qwen2 / Mistral model down to a plan, physically.

Query/key/value projections lose the rows of removed heads (with their biases, as in Qwen2),
o_proj the matching columns; gate/up projections lose the rows of removed MLP channels, down_proj
the matching columns. Embeddings, norms, RoPE and lm_head are untouched. The result is an
instance of the per-layer-width classes in modeling_pruned.py and saves to a folder that loads
with stock `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from slimforge import SlimforgeError
from slimforge.io import file_hash
from slimforge.pruning import modeling_pruned as mp
from slimforge.pruning.plan import PrunePlan

MODELING_FILE = Path(mp.__file__)
CLASSES = {"llama": (mp.PrunedLlamaConfig, mp.PrunedLlamaForCausalLM),
           "qwen2": (mp.PrunedQwen2Config, mp.PrunedQwen2ForCausalLM),
           "mistral": (mp.PrunedMistralConfig, mp.PrunedMistralForCausalLM)}

# In-process, slimforge loads pruned folders with its own registered classes: the folder's copy of
# the modeling code is never executed here (trust_remote_code stays off).
for _config_cls, _model_cls in CLASSES.values():
    AutoConfig.register(_config_cls.model_type, _config_cls, exist_ok=True)
    AutoModelForCausalLM.register(_config_cls, _model_cls, exist_ok=True)


def head_index(heads: list[int], head_dim: int) -> torch.Tensor:
    """Row indices of whole heads in a (heads * head_dim, ...) projection."""
    return (torch.tensor(heads, dtype=torch.long)[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)


def layer_indices(plan: PrunePlan, i: int) -> dict[str, tuple[str, torch.Tensor]]:
    """For each weight of layer i: (which dim is cut: 'rows' or 'cols', kept indices)."""
    lp, hd = plan.layers[i], plan.head_dim
    q, kv, ch = head_index(lp.q_heads, hd), head_index(lp.kv_heads, hd), torch.tensor(lp.channels)
    return {"self_attn.q_proj": ("rows", q), "self_attn.k_proj": ("rows", kv),
            "self_attn.v_proj": ("rows", kv), "self_attn.o_proj": ("cols", q),
            "mlp.gate_proj": ("rows", ch), "mlp.up_proj": ("rows", ch), "mlp.down_proj": ("cols", ch)}


def pruned_state_dict(model: PreTrainedModel, plan: PrunePlan,
                      replace: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The pruned model's weights. `replace` maps parameter names to already-pruned tensors that
    take the place of the cut ones (e.g. least-squares refits of o_proj / down_proj)."""
    state = dict(model.state_dict())
    for i in range(len(plan.layers)):
        for module, (dim, idx) in layer_indices(plan, i).items():
            name = f"model.layers.{i}.{module}"
            w = state[f"{name}.weight"]
            idx = idx.to(w.device)
            state[f"{name}.weight"] = w.index_select(0 if dim == "rows" else 1, idx).contiguous()
            if dim == "rows" and f"{name}.bias" in state:
                state[f"{name}.bias"] = state[f"{name}.bias"].index_select(0, idx).contiguous()
    for name, tensor in (replace or {}).items():
        if name not in state or state[name].shape != tensor.shape:
            raise SlimforgeError(f"replacement for {name} has shape {tuple(tensor.shape)}, expected "
                                 f"{tuple(state[name].shape) if name in state else 'no such parameter'}")
        state[name] = tensor.to(state[name].dtype)
    return state


def pruned_config(config, plan: PrunePlan):
    config_cls, model_cls = CLASSES[plan.arch]
    values = {k: v for k, v in config.to_dict().items() if k not in ("model_type", "architectures", "auto_map")}
    values.update(plan.widths(), head_dim=plan.head_dim)
    cfg = config_cls(**values)
    cfg.architectures = [model_cls.__name__]
    cfg.auto_map = {"AutoConfig": f"modeling_pruned.{config_cls.__name__}",
                    "AutoModelForCausalLM": f"modeling_pruned.{model_cls.__name__}"}
    return cfg


def prune_model(model: PreTrainedModel, plan: PrunePlan,
                replace: dict[str, torch.Tensor] | None = None) -> PreTrainedModel:
    """A new, physically smaller model following `plan` (same device and dtype as `model`)."""
    plan.check_matches(model.config)
    plan.validate()
    param = next(model.parameters())
    cfg = pruned_config(model.config, plan)
    default = torch.get_default_dtype()
    torch.set_default_dtype(param.dtype)
    try:
        with torch.device(param.device):
            pruned = CLASSES[plan.arch][1](cfg)
    finally:
        torch.set_default_dtype(default)
    pruned.load_state_dict(pruned_state_dict(model, plan, replace), strict=True)
    pruned.generation_config = model.generation_config
    return pruned.eval()


def save_pruned(model: PreTrainedModel, tokenizer, plan: PrunePlan, folder: str | Path) -> None:
    """Model weights (safetensors), config with per-layer widths and auto_map, the modeling file,
    tokenizer, and plan.json."""
    folder = Path(folder)
    model.save_pretrained(folder, safe_serialization=True)
    shutil.copyfile(MODELING_FILE, folder / MODELING_FILE.name)
    tokenizer.save_pretrained(folder)
    plan.save(folder / "plan.json")


def is_slimforge_pruned(folder: str | Path) -> bool:
    """True when `folder` holds a pruned model whose modeling file is byte-identical to this
    slimforge's, i.e. code we wrote ourselves (safe to load with trust_remote_code)."""
    shipped = Path(folder) / MODELING_FILE.name
    if not shipped.is_file():
        return False
    return file_hash(shipped) == file_hash(MODELING_FILE)
