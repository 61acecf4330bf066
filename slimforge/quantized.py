"""Quantized model folders: build, save, load and account for models whose linear layers are
`kernels.quant_linear.QuantLinear` (packed low-bit weights + optional low-rank correction).

Folder layout (written by the quantize stage):

    config.json, generation_config.json, tokenizer files   as in the input model's folder
    modeling_pruned.py                                     when the input was a pruned model
    lowbit.safetensors    every tensor of the model's state dict; each quantized linear <name> has
                          <name>.packed (int32, kernels/lowbit_format.py documents the bit layout),
                          <name>.scale, <name>.zero (fp16, one per row and group), optional
                          <name>.down (r x K) and <name>.up (N x r) low-rank factors, <name>.bias
    quantization.json     {"format": "slimforge-lowbit-2", "modules": {<name>: {bits, group, rank,
                          in_features, out_features}}, "sha256": {"lowbit.safetensors": ...}}

The packed weights are deliberately not in `model.safetensors`: stock `from_pretrained` would
initialise every linear at random from such a folder (it cannot read the packing) and generate
garbage after a warning; with no file it recognises, it fails loudly instead.

    from slimforge.quantized import load_quantized
    model, tokenizer = load_quantized("data/quantized", device="cuda")

On a CPU, `dequantize_for_cpu(model)` turns the loaded layers into plain nn.Linear (the same speed as
the unquantized model; the report and `slimforge eval` do it there).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from kernels.lowbit_format import GROUPS, storage_bits_per_weight
from kernels.quant_linear import QuantLinear
from slimforge import SlimforgeError
from slimforge.config import PROJECTIONS
from slimforge.io import file_hash

FORMAT = "slimforge-lowbit-2"  # 2: weights in lowbit.safetensors
META_FILE = "quantization.json"
WEIGHTS_FILE = "lowbit.safetensors"  # not model.safetensors: see the module docstring
FACTOR_BITS = 16  # low-rank factors are stored in fp16


def is_quantized(folder: str | Path) -> bool:
    return (Path(folder) / META_FILE).is_file()


def target_linears(model: torch.nn.Module, targets: list[str]) -> dict[str, torch.nn.Linear]:
    """The decoder's nn.Linear modules whose last name is in `targets` (lm_head never)."""
    found = {n: m for n, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and n.split(".")[-1] in targets and ".layers." in f".{n}"}
    missing = [t for t in targets if not any(n.endswith("." + t) for n in found)]
    if missing:
        raise SlimforgeError(f"the model has no linear layers named {', '.join(missing)} "
                             f"(targets must be among its projections, e.g. q_proj ... down_proj)")
    return found


def _set_module(model: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def quantize_model(model: torch.nn.Module, decomposed: dict, formats: dict[str, tuple[int, int]]) -> torch.nn.Module:
    """Replace each linear `name` of `model` by a QuantLinear from `decomposed[name]` (an
    lq_decompose result: q, scale, zero, optional down/up). In place; returns the model."""
    for name, d in decomposed.items():
        old = model.get_submodule(name)
        bits, group = formats[name]
        bias = old.bias.detach().clone() if old.bias is not None else None
        new = QuantLinear.from_quantized(d.q, d.scale, d.zero, bits, group, bias=bias, down=d.down, up=d.up,
                                         in_features=old.in_features)
        _set_module(model, name, new.to(old.weight.device))
    return model


def pack_linears(model: torch.nn.Module, bits: int, group: int, rank: int = 0) -> torch.nn.Module:
    """Round-to-nearest: every decoder projection becomes a QuantLinear, in place (the benchmarks'
    models, whose speed and memory do not depend on the values)."""
    for name, module in target_linears(model, list(PROJECTIONS)).items():
        _set_module(model, name, QuantLinear.from_linear(module, bits, group, rank=rank))
    return model


def dequantize_for_cpu(model: torch.nn.Module) -> int:
    """Replace every QuantLinear of a CPU model by a frozen nn.Linear holding its folded weight
    (W_hat + up @ down), in place; returns how many. With no kernels on the CPU this is the fast path:
    one matmul per layer and no per-call checks, as fast as the unquantized model (issue 19). For
    inference only (the factors stop training); the packed form stays the one on disk, and nothing
    is saved from the result. An fp32 model gives bit-identical logits to the QuantLinear CPU path; a
    bf16/fp16 model gets its weights rounded once to that dtype, as its unquantized weights were.

        model, tokenizer = load_quantized("data/quantized")
        dequantize_for_cpu(model)
    """
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    for name, m in layers.items():  # all checked before any is replaced: no half-converted model
        if not name:
            raise SlimforgeError("dequantize_for_cpu replaces layers inside a model; for one layer use to_linear()")
        if m.packed.device.type != "cpu":
            raise SlimforgeError(f"{name} is on {m.packed.device}, not the CPU: dequantize_for_cpu is for "
                                 f"CPU inference (on a GPU the packed kernels are the fast path)")
    dtype = getattr(model, "dtype", torch.float32)  # a Hugging Face model's dtype (its embeddings')
    for name, m in layers.items():
        _set_module(model, name, m.to_linear(dtype))
    return len(layers)


def bits_report(model: torch.nn.Module) -> dict:
    """True storage of the quantized linears: packed weights + fp16 scales/zeros + fp16 low-rank
    factors, per weight of the original matrices."""
    weights = q_bits = lr_bits = 0
    for m in model.modules():
        if isinstance(m, QuantLinear):
            weights += m.out_features * m.in_features
            q_bits += storage_bits_per_weight(m.bits, m.group) * m.out_features * m.packed_in_features
            lr_bits += FACTOR_BITS * m.rank * (m.out_features + m.packed_in_features)
    if weights == 0:
        raise SlimforgeError("the model has no quantized linear layers")
    return {"bits_per_weight": (q_bits + lr_bits) / weights, "quantized_bits_per_weight": q_bits / weights,
            "low_rank_bits_per_weight": lr_bits / weights, "quantized_weights": weights}


def save_quantized(model, tokenizer, source_folder: str | Path, folder: str | Path) -> None:
    """Write the quantized folder (layout in the module docstring)."""
    folder, source_folder = Path(folder), Path(source_folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    for py in source_folder.glob("*.py"):  # a pruned model's modeling file travels with its config
        shutil.copyfile(py, folder / py.name)
    if (source_folder / "plan.json").is_file():  # and its plan, which LoRAM recovery needs (QLoRAM)
        shutil.copyfile(source_folder / "plan.json", folder / "plan.json")
    tokenizer.save_pretrained(folder)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # tied to the embedding; rebuilt by the model class
    save_file(state, folder / WEIGHTS_FILE, metadata={"format": FORMAT})
    modules = {n: {"bits": m.bits, "group": m.group, "rank": m.rank, "in_features": m.in_features,
                   "out_features": m.out_features, "bias": m.bias is not None}
               for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    meta = {"format": FORMAT, "modules": modules, "sha256": {WEIGHTS_FILE: file_hash(folder / WEIGHTS_FILE)}}
    (folder / META_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")


def load_quantized(folder: str | Path, device: str | torch.device = "cpu"):
    """Rebuild a quantized model on the low-bit kernels; checks the format, the checksum and every
    tensor's shape before loading."""
    import slimforge.pruning  # noqa: F401  registers the pruned-model classes (a pruned input)

    folder = Path(folder)
    meta = json.loads((folder / META_FILE).read_text())
    if meta.get("format") != FORMAT:
        raise SlimforgeError(f"{folder / META_FILE}: format {meta.get('format')!r} is not {FORMAT!r}")
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise SlimforgeError(f"{weights} is missing")
    if file_hash(weights) != meta["sha256"][WEIGHTS_FILE]:
        raise SlimforgeError(f"{weights}: checksum does not match {META_FILE} (corrupt or replaced file)")
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    # the dtype the unquantized parts (embeddings, norms, scales) were saved in: a bf16 model stays bf16.
    # (transformers 5 reads a config.json's old `torch_dtype` key into `dtype`; its `torch_dtype`
    # attribute is a deprecated alias that logs "`torch_dtype` is deprecated!" on every read.)
    saved = getattr(config, "dtype", None) or torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, saved) if isinstance(saved, str) else saved)
    for name, spec in meta["modules"].items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise SlimforgeError(f"{META_FILE}: module {name} does not exist in the model of config.json") from None
        if spec["group"] not in GROUPS or (old.in_features, old.out_features) != (spec["in_features"],
                                                                                 spec["out_features"]):
            raise SlimforgeError(f"{META_FILE}: module {name} is {spec}, the config's layer is "
                                 f"{old.out_features}x{old.in_features}")
        _set_module(model, name, QuantLinear.empty(spec["in_features"], spec["out_features"], spec["bits"],
                                                   spec["group"], spec["rank"], spec["bias"]))
    state = load_file(weights)
    expected = model.state_dict()
    if getattr(config, "tie_word_embeddings", False):
        expected.pop("lm_head.weight", None)
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or extra or wrong:
        raise SlimforgeError(f"{weights} does not match {META_FILE}/config.json: missing {missing[:3]}, "
                             f"unexpected {extra[:3]}, wrong shape {wrong[:3]}")
    model.load_state_dict(state, strict=False)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return model.to(device).eval(), tokenizer
