"""Pretraining recipe of the embedded tiny Llama on the suite's train split and judge items: the
base stage runs it, and so does the judge-zoo experiment (judges of several strengths).

    from slimforge.pretrain import pretrain
    model, tokenizer, metrics, losses = pretrain(preset, seed=0, data_dir=Path("data/tasks"),
                                                 checkpoint_dir=Path("/tmp/ckpt"))
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from slimforge.batching import encode_records
from slimforge.config import Preset
from slimforge.modeling import tiny_llama
from slimforge.stage import pick_device
from slimforge.perf import peak_flops, train_flops_per_token
from slimforge.tasks.judge import VERDICTS
from slimforge.tasks.records import load_records
from slimforge.tokenizer import build_tokenizer
from slimforge.training import train_causal_lm

TRAIN_FILES = ("train.jsonl", "judge_train.jsonl")


def train_files(data_dir: Path) -> list[Path]:
    """The suite files pretraining reads (those that exist)."""
    return [data_dir / name for name in TRAIN_FILES if (data_dir / name).exists()]


def pretrain(preset: Preset, seed: int, data_dir: Path, checkpoint_dir: Path, fingerprint: str = "pretrain",
             on_log: Callable[[int, dict], None] | None = None
             ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, dict, list[float]]:
    """Build the tokenizer and model, train them; returns (model, tokenizer, train metrics, losses).
    `fingerprint` names the run whose checkpoint in `checkpoint_dir` may be resumed."""
    records = [r for path in train_files(data_dir) for r in load_records(path, allow_empty=True)]
    texts = [r["prompt"] + r["response"] for r in records]
    judged = any("format" in r for r in records)  # verdicts need to be single tokens only if taught
    tokenizer = build_tokenizer(texts, preset.vocab_size,
                                must_be_single=[v for pair in VERDICTS.values() for v in pair] if judged else [])
    device = torch.device(pick_device(preset.device))
    model = tiny_llama(len(tokenizer), preset.hidden_size, preset.num_layers, preset.num_heads,
                       preset.num_kv_heads, preset.intermediate_size, preset.max_positions, tokenizer,
                       seed, preset.initializer_range).to(device)
    examples = encode_records(records, tokenizer, max_len=preset.max_positions)
    amp = torch.bfloat16 if preset.amp == "bf16" and device.type == "cuda" else None
    result = train_causal_lm(
        model, examples, preset, pad_id=tokenizer.pad_token_id, seed=seed, checkpoint_dir=checkpoint_dir,
        fingerprint=fingerprint, amp_dtype=amp, on_log=on_log, log_every=preset.log_every,
        compile=preset.compile, adam_beta2=preset.adam_beta2, groups=[r.get("format", "task") for r in records])
    losses = result["losses"]
    tail = losses[-preset.log_every:]
    tokens_per_s = result["run_tokens"] / max(result["seconds"], 1e-9)
    mean_len = sum(len(ids) for ids, _ in examples) / len(examples)
    flops = train_flops_per_token(model, mean_len) * result["steady_tokens_per_s"]
    peak = peak_flops(device, amp or torch.float32)
    metrics = {"steps": preset.steps, "seconds": result["seconds"], "tokens_per_s": tokens_per_s,
               "steady_tokens_per_s": result["steady_tokens_per_s"],
               "final_loss": sum(tail) / len(tail), "resumed_from": result["resumed_from"],
               "model_tflops_per_s": flops / 1e12,  # at the steady rate
               "world_size": result["world_size"]}  # processes that trained (SLIMFORGE_NPROC)
    if peak:
        metrics["mfu"] = flops / peak
    return model, tokenizer, metrics, losses
