"""Export a slimforge quantized folder to the ecosystem's standard: a compressed-tensors
"pack-quantized" model (what transformers and vLLM load natively) plus its low-rank error
correction as a PEFT LoRA adapter on top.

    from slimforge.ct_export import export_compressed_tensors
    export_compressed_tensors("data/quantized", "out/quantized", "out/adapters/correction")

What is written (the numbers are exact: every weight the stock loader dequantizes equals
slimforge's own W_hat = (q - zero) * scale, bit for bit, before the matmul):
  model folder     config.json with the stock architecture (LlamaForCausalLM, ...) and a
                   `quantization_config` (quant_method compressed-tensors, format pack-quantized,
                   int weights, group strategy, asymmetric, one config group per (bits, group));
                   model.safetensors: per quantized linear <name>.weight_packed (int32, dense
                   little-endian bit packing along the input dimension), .weight_scale (N x K/group,
                   the model's dtype), .weight_zero_point (int32, packed the same way along the
                   output dimension), .weight_shape; every other tensor as is.
  adapter folder   adapter_config.json + adapter_model.safetensors: lora_A = the correction's
                   `down` (r x K), lora_B = `up` (N x r), lora_alpha = r so PEFT's scale is 1:
                   y = x W_hat^T + (x down^T) up^T, which is slimforge's QuantLinear.

Codes: slimforge stores unsigned q and zero in [0, 2^b); compressed-tensors stores signed
q - 2^(b-1) and packs (value + 2^(b-1)), i.e. the same unsigned fields, so the packed words are
slimforge's codes laid out densely (element i of a row at bits [i*b, (i+1)*b)).

Readers: transformers >= 5.17 with compressed-tensors >= 0.19 (tested: 5.24 + 0.20.1, logits equal to
slimforge's loader within 1e-6 in fp32); vLLM reads the same config (not run here: no vLLM build).

Widths: 2 and 4 bits pack identically in every compressed-tensors release (32 / b fields per
word); 3 bits use the dense layout of compressed-tensors >= 0.19 (older releases refuse the file on
a shape mismatch). vLLM's compressed-tensors kernels serve 4 (and 8) bits; 2- and 3-bit exports
load in transformers, which dequantizes them.

Pruned models (each layer its own head count and MLP width) become the stock architecture at the
widest layer's widths, with zero rows/columns in the padding: a padded MLP channel computes
silu(0) * 0 = 0, a padded head's o_proj columns are zero, so the function is unchanged. This is
exact only where no quantization group would mix padding with a different source group (checked
per module; the export refuses otherwise, naming the layer).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from kernels.lowbit_format import unpack
from kernels.quant_linear import QuantLinear
from slimforge import SlimforgeError
from slimforge.config import PROJECTIONS

STOCK = {"slimforge_pruned_llama": ("llama", "LlamaForCausalLM"), "slimforge_pruned_qwen2": ("qwen2", "Qwen2ForCausalLM"),
         "slimforge_pruned_mistral": ("mistral", "MistralForCausalLM"),
         "llama": ("llama", "LlamaForCausalLM"), "qwen2": ("qwen2", "Qwen2ForCausalLM"),
         "mistral": ("mistral", "MistralForCausalLM")}
EXPORT_BITS = (2, 3, 4)  # every width the quantize stage writes; pack-quantized holds 1..8


class ExportUnsupported(SlimforgeError):
    """The model cannot be written in the format as is (the package stage may skip the export)."""

WIDTH_KEYS = ("layer_num_heads", "layer_num_kv_heads", "layer_intermediate_sizes")


def pack_dense(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes (N, K) -> int32 (N, ceil(K * bits / 32)): element i of a row occupies bits
    [i*bits, (i+1)*bits) of the row's little-endian bit stream (compressed-tensors' layout)."""
    n, k = codes.shape
    padded = math.ceil(k / 32) * 32
    values = torch.nn.functional.pad(codes.to(torch.int64), (0, padded - k))
    stream = (values.unsqueeze(-1) >> torch.arange(bits)) & 1  # (N, K, bits), LSB first
    words = (stream.reshape(n, -1, 32) << torch.arange(32)).sum(-1)  # (N, padded * bits / 32)
    words = torch.where(words >= 2 ** 31, words - 2 ** 32, words)  # two's complement int32
    return words[:, :math.ceil(k * bits / 32)].to(torch.int32).contiguous()


def _widths(config) -> dict[str, list[int]]:
    n = config.num_hidden_layers
    return {"heads": list(getattr(config, "layer_num_heads", None) or [config.num_attention_heads] * n),
            "kv": list(getattr(config, "layer_num_kv_heads", None) or [config.num_key_value_heads] * n),
            "inter": list(getattr(config, "layer_intermediate_sizes", None) or [config.intermediate_size] * n)}


def layer_maps(config, layer: int, target: dict) -> dict[str, torch.Tensor]:
    """Where each row/column of layer `layer`'s pruned projections sits in the stock layout:
    query head p (kv group p // g, slot p % g) -> head (p // g) * G + p % g, key/value head j -> j,
    MLP channel c -> c."""
    w, hd = _widths(config), config.head_dim
    heads, kv = w["heads"][layer], w["kv"][layer]
    g, big_g = heads // kv, target["heads"] // target["kv"]
    q_heads = torch.tensor([(p // g) * big_g + p % g for p in range(heads)])
    q = (q_heads[:, None] * hd + torch.arange(hd)).flatten()
    kvr = torch.arange(kv * hd)
    ch = torch.arange(w["inter"][layer])
    return {"q_proj": ("rows", q), "k_proj": ("rows", kvr), "v_proj": ("rows", kvr), "o_proj": ("cols", q),
            "gate_proj": ("rows", ch), "up_proj": ("rows", ch), "down_proj": ("cols", ch)}


def target_shape(name: str, config, target: dict) -> tuple[int, int]:
    hd, h = config.head_dim, config.hidden_size
    short = name.rsplit(".", 1)[-1]
    return {"q_proj": (target["heads"] * hd, h), "k_proj": (target["kv"] * hd, h), "v_proj": (target["kv"] * hd, h),
            "o_proj": (h, target["heads"] * hd), "gate_proj": (target["inter"], h), "up_proj": (target["inter"], h),
            "down_proj": (h, target["inter"])}[short]


def _index_maps(kind: str, index: torch.Tensor, src: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(row map, column map) of a module from its layer map entry (identity on the other axis)."""
    rows, cols = torch.arange(src[0]), torch.arange(src[1])
    return (index, cols) if kind == "rows" else (rows, index)


def relayout_quantized(m: QuantLinear, rows: torch.Tensor, cols: torch.Tensor, shape: tuple[int, int], where: str):
    """Codes, scale, zero, down, up of QuantLinear `m` placed at (rows, cols) of a zero
    (N, K) weight. Padding weights dequantize to exactly 0 (code = the group's zero point)."""
    n, k, group = *shape, m.group
    if k % group:
        raise ExportUnsupported(f"{where}: the stock layout's {k} input features are not a multiple of group {group} "
                                "(compressed-tensors stores whole groups; quantize with a group that divides it)")
    src_groups, dst_groups = torch.arange(m.in_features) // group, cols // group
    owner = {}
    for s, d in zip(src_groups.tolist(), dst_groups.tolist()):
        if owner.setdefault(d, s) != s:
            raise ExportUnsupported(f"{where}: padding to the stock layout would put two quantization groups' weights in "
                                 f"one group of {group} (a layer keeps a head count whose width is not a multiple of "
                                 "the group); export a model with uniform widths or quantize with a smaller group")
    codes = unpack(m.packed, m.bits, m.packed_in_features)[:, :m.in_features].to(torch.int64)
    scale = torch.ones(n, k // group, dtype=torch.float32)
    zero = torch.zeros(n, k // group, dtype=torch.int64)
    gather = torch.tensor([owner.get(d, -1) for d in range(k // group)])
    has = gather >= 0
    filled = has.nonzero().flatten()[None, :]
    scale[rows[:, None], filled] = m.scale.float()[:, gather[has]]
    zero[rows[:, None], filled] = m.zero.to(torch.int64)[:, gather[has]]
    q = zero.repeat_interleave(group, dim=1)  # every unset weight = its group's zero point: W_hat 0
    q[rows[:, None], cols[None, :]] = codes
    out = {"codes": q, "scale": scale, "zero": zero, "down": None, "up": None}
    if m.rank:
        out["down"] = torch.zeros(m.rank, k, dtype=m.down.dtype)
        out["down"][:, cols] = m.down[:, :m.in_features]
        out["up"] = torch.zeros(n, m.rank, dtype=m.up.dtype).index_copy(0, rows, m.up)
    return out


def stock_config(config, target: dict):
    """The stock architecture's config at the target widths (a pruned model's per-layer lists dropped)."""
    from transformers import AutoConfig

    if config.model_type not in STOCK:
        raise ExportUnsupported(f"model type {config.model_type!r} cannot be exported to compressed-tensors "
                             f"(supported: {', '.join(sorted(STOCK))})")
    model_type, arch = STOCK[config.model_type]
    values = {k: v for k, v in config.to_dict().items()
              if k not in (*WIDTH_KEYS, "model_type", "architectures", "auto_map", "transformers_version")}
    values.update(num_attention_heads=target["heads"], num_key_value_heads=target["kv"],
                  intermediate_size=target["inter"], head_dim=config.head_dim, architectures=[arch])
    return AutoConfig.for_model(model_type, **values)


def _weight_args(bits: int, group: int) -> dict:
    return {"num_bits": bits, "type": "int", "symmetric": False, "strategy": "group", "group_size": group,
            "dynamic": False, "actorder": None, "block_structure": None, "observer": "minmax", "observer_kwargs": {}}


def quantization_config(formats: dict[str, tuple[int, int]], dense: list[str]) -> dict:
    """compressed-tensors' config: one config group per (bits, group), targets by module name
    ("Linear" when a single format covers every quantized linear), the rest ignored."""
    by_format: dict[tuple[int, int], list[str]] = {}
    for name, fmt in formats.items():
        by_format.setdefault(fmt, []).append(name)
    groups = {}
    for i, ((bits, group), names) in enumerate(sorted(by_format.items())):
        targets = ["Linear"] if len(by_format) == 1 else [f"re:^{n.replace('.', '[.]')}$" for n in sorted(names)]
        groups[f"group_{i}"] = {"targets": targets, "weights": _weight_args(bits, group), "input_activations": None,
                                "output_activations": None, "format": "pack-quantized"}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": groups, "ignore": sorted(["lm_head", *dense]), "kv_cache_scheme": None,
            # transformers (>= 5.17) then dequantizes at load; its compressed route builds asymmetric
            # zero points at the unpacked shape and refuses the packed ones every writer stores
            # (transformers 5.24 + compressed-tensors 0.20.1: "size mismatch ... weight_zero_point").
            # vLLM ignores the key and runs its own kernels.
            "dequantize": True}


def export_compressed_tensors(quantized: str | Path, out: str | Path, adapter_out: str | Path) -> dict:
    """Write `quantized` (a slimforge quantized folder) as a compressed-tensors model at `out` and
    its low-rank correction as a PEFT adapter at `adapter_out` (none when the model has no
    correction). Returns {"formats", "padded", "target_widths", "correction_rank"}."""
    from slimforge.quantized import load_quantized

    model, tokenizer = load_quantized(quantized)
    config = model.config
    if getattr(config, "head_dim", None) is None:
        config.head_dim = config.hidden_size // config.num_attention_heads
    w = _widths(config)
    target = {"kv": max(w["kv"]), "heads": max(w["kv"]) * max(h // k for h, k in zip(w["heads"], w["kv"])),
              "inter": max(w["inter"])}
    quantized_modules = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    down_group = max((m.group for n, m in quantized_modules.items() if n.endswith("down_proj")), default=1)
    target["inter"] = -(-target["inter"] // down_group) * down_group  # the stock width must hold whole groups
    bad = sorted({m.bits for m in quantized_modules.values()} - set(EXPORT_BITS))
    if bad:
        raise ExportUnsupported(f"{quantized}: {bad}-bit weights cannot be exported (allowed: {EXPORT_BITS})")
    dtype = model.model.embed_tokens.weight.dtype
    state, adapter, dense = {}, {}, []
    maps = [layer_maps(config, i, target) for i in range(config.num_hidden_layers)]
    for name, tensor in model.state_dict().items():  # embeddings, norms, lm_head: as they are
        if ".layers." not in name or name.rpartition(".")[0].rsplit(".", 1)[-1] not in PROJECTIONS:
            state[name] = tensor.contiguous()
    for name, module in model.named_modules():
        short = name.rsplit(".", 1)[-1]
        if ".layers." not in f".{name}" or short not in PROJECTIONS:
            continue
        kind, index = maps[int(name.split(".layers.")[1].split(".")[0])][short]
        shape = target_shape(name, config, target)
        if isinstance(module, QuantLinear):
            rows, cols = _index_maps(kind, index, (module.out_features, module.in_features))
            t = relayout_quantized(module, rows, cols, shape, name)
            state[f"{name}.weight_packed"] = pack_dense(t["codes"], module.bits)
            state[f"{name}.weight_scale"] = t["scale"].to(dtype)
            state[f"{name}.weight_zero_point"] = pack_dense(t["zero"].T.contiguous(), module.bits).T.contiguous()
            state[f"{name}.weight_shape"] = torch.tensor(shape)
            if t["down"] is not None:
                adapter[f"base_model.model.{name}.lora_A.weight"] = t["down"].contiguous()
                adapter[f"base_model.model.{name}.lora_B.weight"] = t["up"].contiguous()
        elif isinstance(module, torch.nn.Linear):  # a projection left in full precision
            dense.append(name)
            rows, cols = _index_maps(kind, index, tuple(module.weight.shape))
            weight = torch.zeros(shape, dtype=module.weight.dtype)
            weight[rows[:, None], cols[None, :]] = module.weight.detach()
            state[f"{name}.weight"] = weight
        else:
            continue
        if getattr(module, "bias", None) is not None:
            state[f"{name}.bias"] = torch.zeros(shape[0], dtype=module.bias.dtype).index_copy(
                0, rows, module.bias.detach())
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    formats = {n: (m.bits, m.group) for n, m in quantized_modules.items()}
    stock = stock_config(config, target)
    stock.quantization_config = quantization_config(formats, dense)
    out, adapter_out = Path(out), Path(adapter_out)
    out.mkdir(parents=True, exist_ok=True)
    stock.save_pretrained(out)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    ranks = sorted({m.rank for m in quantized_modules.values()})
    if adapter:
        _save_correction(adapter, quantized_modules, adapter_out)
    return {"formats": sorted({f"{b}-bit g{g}" for b, g in formats.values()}), "target_widths": target,
            "padded": any(len(set(v)) > 1 for v in w.values()), "correction_rank": ranks[-1], "dense": dense}



def _save_correction(tensors: dict, modules: dict[str, QuantLinear], folder: Path) -> None:
    """The correction as a LoRA adapter: scale lora_alpha / r = 1 for every module."""
    with_rank = {n: m.rank for n, m in modules.items() if m.rank}
    shorts = sorted({n.rsplit(".", 1)[-1] for n in with_rank})
    uniform = len(set(with_rank.values())) == 1 and len(with_rank) == len(modules)
    r = max(with_rank.values())
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": r, "lora_dropout": 0.0,
              "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
              "modules_to_save": None, "init_lora_weights": True, "base_model_name_or_path": None,
              "target_modules": shorts if uniform else sorted(with_rank),
              "rank_pattern": {} if uniform else {n: k for n, k in with_rank.items() if k != r},
              "alpha_pattern": {} if uniform else {n: k for n, k in with_rank.items() if k != r}}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file({k: v.contiguous() for k, v in tensors.items()}, folder / "adapter_model.safetensors",
              metadata={"format": "pt"})
