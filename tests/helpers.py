"""Tiny random models of the architectures slimforge must handle, saved as HF folders."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
                          Qwen2Config, Qwen2ForCausalLM)

ARCHS = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),  # q/k/v projections carry biases
    "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": 64}),
}


def tiny_model(arch: str, tokenizer, seed: int = 0, layers: int = 2, tie: bool = True):
    """A random model with GQA (4 query heads, 2 KV heads) sized to `tokenizer`."""
    config_cls, model_cls, extra = ARCHS[arch]
    config = config_cls(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                        max_position_embeddings=128, tie_word_embeddings=tie,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id, **extra)
    torch.manual_seed(seed)
    return model_cls(config).eval()


def save_tiny(arch: str, tokenizer, folder: Path, seed: int = 0) -> Path:
    model = tiny_model(arch, tokenizer, seed)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def run_cases_under_interpreter(module: str, repo: Path) -> subprocess.CompletedProcess:
    """`python -m <module> cpu` with TRITON_INTERPRET=1: the Triton code runs on the CPU. A fresh
    process, because triton reads the variable when it is imported."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(repo)}
    return subprocess.run([sys.executable, "-m", module, "cpu"], cwd=repo, env=env, capture_output=True,
                          text=True, timeout=600)
