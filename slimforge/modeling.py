"""Model construction, loading and saving: the embedded tiny Llama and any local HF causal LM."""

from __future__ import annotations

import inspect
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from kernels.quant_linear import QuantLinear
from slimforge import SlimforgeError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def tiny_llama(vocab_size: int, hidden_size: int, num_layers: int, num_heads: int, num_kv_heads: int,
               intermediate_size: int, max_positions: int, tokenizer: PreTrainedTokenizerBase,
               seed: int, initializer_range: float = 0.02) -> LlamaForCausalLM:
    """A randomly initialised LlamaForCausalLM with grouped-query attention (num_kv_heads <
    num_heads), so every code path real Llama-3/Qwen2/Mistral checkpoints need is exercised."""
    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise SlimforgeError(f"hidden_size ({hidden_size}) must divide by num_heads ({num_heads}) and "
                             f"num_heads by num_kv_heads ({num_kv_heads})")
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        intermediate_size=intermediate_size, max_position_embeddings=max_positions,
        rope_theta=10000.0, tie_word_embeddings=True, initializer_range=initializer_range,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, do_sample=False)
    return model


def load_model(source: str | Path, dtype: str = "auto", trust_remote_code: bool = False,
               device: str | torch.device = "cpu") -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer from a local HF folder or a hub id already in the local
    cache (downloads are never attempted). `dtype` "auto" keeps the dtype the weights were saved
    in (a bf16 base stays bf16 through every stage). Raises SlimforgeError with the reason on failure."""
    import slimforge.pruning  # noqa: F401  registers the pruned-model classes (no remote code needed)

    source = str(source)
    if dtype != "auto" and dtype not in DTYPES:
        raise SlimforgeError(f"dtype {dtype!r} is not supported (allowed: auto, {', '.join(DTYPES)})")
    is_dir = Path(source).is_dir()
    if is_dir and (Path(source) / "quantization.json").is_file():  # the quantize stage's folders
        from slimforge.quantized import load_quantized

        return load_quantized(source, device=device)
    if not is_dir and (Path(source).exists() or source.startswith((".", "/"))):
        raise SlimforgeError(f"model source {source!r} is not a folder with a Hugging Face model")
    where = "folder" if is_dir else "hub id (local cache only, downloads are off)"
    tokenizer = load_tokenizer(source, trust_remote_code)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source, local_files_only=True, trust_remote_code=trust_remote_code,
            dtype="auto" if dtype == "auto" else DTYPES[dtype])
    except Exception as err:
        raise SlimforgeError(f"model source {source!r} ({where}): cannot load a causal LM: "
                             f"{str(err).splitlines()[0]}") from None
    return model.to(device).eval(), tokenizer


def load_tokenizer(source: str | Path, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The tokenizer `load_model` gives, without loading the weights: left padding, and EOS as the
    pad token when the folder names none."""
    where = "folder" if Path(source).is_dir() else "hub id (local cache only, downloads are off)"
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source), local_files_only=True,
                                                  trust_remote_code=trust_remote_code)
    except Exception as err:  # HF raises OSError/ValueError/EnvironmentError variants
        raise SlimforgeError(f"model source {str(source)!r} ({where}): no usable tokenizer: "
                             f"{str(err).splitlines()[0]}") from None
    if tokenizer.pad_token_id is None:  # batched evaluation pads; reuse EOS as most chat LMs do
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def save_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, folder: str | Path) -> None:
    """config.json, model.safetensors, generation_config.json and tokenizer files."""
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


def count_parameters(model: torch.nn.Module) -> int:
    """Unique parameters (tied embeddings counted once). A quantized linear counts as the
    out x in weights it stands for (and its bias): its packed codes are buffers, not parameters,
    so a plain count would miss most of a quantized model."""
    unique = {id(p): p for p in model.parameters()}
    stood_for = 0
    for m in model.modules():
        if isinstance(m, QuantLinear):
            stood_for += m.out_features * m.in_features + (m.bias.numel() if m.bias is not None else 0)
    return sum(p.numel() for p in unique.values()) + stood_for


def cache_kwarg(model: torch.nn.Module) -> str:
    """Name of the KV-cache argument of `model.forward`: `cache` from transformers 5.2x on,
    `past_key_values` before (both are in the supported range). A PEFT wrapper's forward takes
    **kwargs, so the wrapped model's signature decides."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"
