"""Tiny random models of the architectures slimforge must handle, saved as HF folders."""

from __future__ import annotations

import os
import shutil
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


def tiny_model(arch: str, tokenizer, seed: int = 0, layers: int = 2, tie: bool = True, heads: int = 4,
               kv_heads: int = 2):
    """A random model sized to `tokenizer`, by default with GQA (4 query heads, 2 KV heads)."""
    config_cls, model_cls, extra = ARCHS[arch]
    config = config_cls(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
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


REPO = Path(__file__).resolve().parents[1]


def _git(*args, cwd):
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True)


def _source_files() -> list[str]:
    """What git would commit: tracked plus untracked-but-not-ignored files. A checkout without
    git metadata falls back to every file outside the generated folders."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
                            cwd=REPO, capture_output=True, text=True)
    if listed.returncode == 0:
        return [f for f in listed.stdout.split("\0") if f]
    def wanted(rel: Path) -> bool:
        top = rel.parts[0]
        if len(rel.parts) > 1 and top.startswith(".") and top not in (".dvc", ".ci"):
            return False  # .git, caches, local scratch folders
        return (top not in ("data", "mlruns", "mlartifacts") and "__pycache__" not in rel.parts
                and rel.parts[:2] not in ((".dvc", "tmp"), (".dvc", "cache")) and rel.name != "mlflow.db")

    return [str(p.relative_to(REPO)) for p in REPO.rglob("*") if p.is_file() and wanted(p.relative_to(REPO))]


def copy_source_tree(dst: Path) -> Path:
    """The working tree's source files (what git would commit) copied into `dst`."""
    for rel in _source_files():
        if (REPO / rel).is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, dst / rel)
    return dst


def git_commit_all(repo: Path, message: str) -> None:
    """A new git repo at `repo` with everything committed (DVC wants a git checkout)."""
    _git("init", "-q", cwd=repo)
    _git("add", "-A", cwd=repo)
    _git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", message, cwd=repo)


def prefect_harness():
    """prefect_test_harness with room to start: its ephemeral server (a subprocess running the
    database migrations) missed the default 30 s on a loaded 2-core CI machine (.ci/lower_bounds,
    2026-12-01)."""
    from prefect.testing.utilities import prefect_test_harness

    return prefect_test_harness(server_startup_timeout=180)
