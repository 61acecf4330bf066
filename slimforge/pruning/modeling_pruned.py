"""Modeling code of slimforge-pruned causal LMs: the stock Llama / Qwen2 / Mistral blocks, each
layer with its own number of query heads, key/value heads and MLP width (listed in config.json).

This file is copied into every pruned model folder, so the folder loads on its own with

    AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)

It imports only torch and transformers (never slimforge). Attention keeps whole head_dim-wide
heads and the grouped-query layout (every kept key/value head serves the same number of query
heads), so the stock attention, RoPE, KV caches (dynamic and static) and generate() work as is.
"""

import copy

from transformers import LlamaConfig, MistralConfig, Qwen2Config
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaForCausalLM
from transformers.models.mistral.modeling_mistral import MistralDecoderLayer, MistralForCausalLM
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2ForCausalLM


def _init_widths(config, layer_num_heads, layer_num_kv_heads, layer_intermediate_sizes):
    n = config.num_hidden_layers
    config.layer_num_heads = list(layer_num_heads or [config.num_attention_heads] * n)
    config.layer_num_kv_heads = list(layer_num_kv_heads or [config.num_key_value_heads] * n)
    config.layer_intermediate_sizes = list(layer_intermediate_sizes or [config.intermediate_size] * n)
    if getattr(config, "head_dim", None) is None:
        config.head_dim = config.hidden_size // config.num_attention_heads


def layer_config(config, i):
    """A copy of `config` describing layer i alone (the stock layer classes read widths from it)."""
    cfg = copy.copy(config)
    cfg.num_attention_heads = config.layer_num_heads[i]
    cfg.num_key_value_heads = config.layer_num_kv_heads[i]
    cfg.intermediate_size = config.layer_intermediate_sizes[i]
    cfg.head_dim = config.head_dim  # fixed: heads are removed whole, never narrowed
    return cfg


def _rebuild_layers(model, layer_cls):
    cfg = model.config
    for i in range(cfg.num_hidden_layers):
        model.model.layers[i] = layer_cls(layer_config(cfg, i), layer_idx=i)
    model.post_init()


class PrunedLlamaConfig(LlamaConfig):
    model_type = "slimforge_pruned_llama"

    def __init__(self, layer_num_heads=None, layer_num_kv_heads=None, layer_intermediate_sizes=None, **kwargs):
        kwargs.setdefault("head_dim", None)
        super().__init__(**kwargs)
        _init_widths(self, layer_num_heads, layer_num_kv_heads, layer_intermediate_sizes)


class PrunedQwen2Config(Qwen2Config):
    model_type = "slimforge_pruned_qwen2"

    def __init__(self, layer_num_heads=None, layer_num_kv_heads=None, layer_intermediate_sizes=None, **kwargs):
        super().__init__(**kwargs)
        _init_widths(self, layer_num_heads, layer_num_kv_heads, layer_intermediate_sizes)


class PrunedMistralConfig(MistralConfig):
    model_type = "slimforge_pruned_mistral"

    def __init__(self, layer_num_heads=None, layer_num_kv_heads=None, layer_intermediate_sizes=None, **kwargs):
        super().__init__(**kwargs)
        _init_widths(self, layer_num_heads, layer_num_kv_heads, layer_intermediate_sizes)


class PrunedLlamaForCausalLM(LlamaForCausalLM):
    config_class = PrunedLlamaConfig

    def __init__(self, config):
        super().__init__(config)
        _rebuild_layers(self, LlamaDecoderLayer)


class PrunedQwen2ForCausalLM(Qwen2ForCausalLM):
    config_class = PrunedQwen2Config

    def __init__(self, config):
        super().__init__(config)
        _rebuild_layers(self, Qwen2DecoderLayer)


class PrunedMistralForCausalLM(MistralForCausalLM):
    config_class = PrunedMistralConfig

    def __init__(self, config):
        super().__init__(config)
        _rebuild_layers(self, MistralDecoderLayer)
