"""The one evaluation harness every stage uses, so numbers line up in one table.

    slimforge eval data/base --data data/tasks        # any model folder, from the shell

Metrics: exact-match accuracy per task family (greedy, batched, KV cache), the macro mean over the
base families, perplexity of held-out responses, judge accuracy in both formats, parameter count,
bytes on disk, decode tokens/s.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from slimforge.evaluate.generation import exact_match
from slimforge.evaluate.scoring import next_token_probs, perplexity
from slimforge.evaluate.speed import decode_tokens_per_s
from slimforge.io import folder_bytes
from slimforge.modeling import count_parameters
from slimforge.tasks.families import BASE_FAMILIES
from slimforge.tasks.judge import VERDICTS, verdict_ids
from slimforge.tasks.records import load_records

# Evaluation files of the embedded suite, read when present in the data folder.
TEST_FILES = ("test.jsonl", "lora_test.jsonl", "rl_test.jsonl")
PPL_FILE = "test.jsonl"
JUDGE_FILE = "judge_test.jsonl"


def judge_accuracy(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, records: list[dict],
                   batch_size: int = 128) -> dict[str, float]:
    """Share of judge items whose more probable verdict is the right one, per format."""
    out = {}
    for fmt in VERDICTS:
        items = [r for r in records if r.get("format") == fmt]
        if not items:
            continue
        try:
            ids = verdict_ids(tokenizer, fmt)
        except ValueError:
            continue  # a real model's tokenizer may split the verdicts: no judge metric then
        probs = next_token_probs(model, tokenizer, [r["prompt"] for r in items], ids, batch_size)
        predicted = [VERDICTS[fmt][int(i)] for i in probs.argmax(-1)]
        out[fmt] = sum(p == r["response"] for p, r in zip(predicted, items)) / len(items)
    return out


def evaluate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, test_records: list[dict],
             ppl_records: list[dict] | None = None, judge_records: list[dict] | None = None,
             model_dir: str | Path | None = None, batch_size: int = 256, speed: bool = True) -> dict:
    """Metrics for one model. `test_records` need `answer`; the rest are optional."""
    start = time.perf_counter()
    model.eval()
    acc = exact_match(model, tokenizer, test_records, batch_size)
    base = [acc[f] for f in BASE_FAMILIES if f in acc]
    metrics: dict = {"accuracy": acc, "params": count_parameters(model)}
    if base:
        metrics["accuracy_base"] = sum(base) / len(base)
    if ppl_records:
        metrics["ppl"] = perplexity(model, tokenizer, ppl_records, max(1, batch_size // 4))
    if judge_records:
        metrics["judge"] = judge_accuracy(model, tokenizer, judge_records, max(1, batch_size // 2))
    if model_dir is not None:
        metrics["bytes"] = folder_bytes(model_dir)
    if speed:
        metrics["decode_tokens_per_s"], _mode = decode_tokens_per_s(model)
    metrics["eval_seconds"] = time.perf_counter() - start
    return metrics


def evaluate_suite(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, data_dir: str | Path,
                   model_dir: str | Path | None = None, batch_size: int = 256, speed: bool = True) -> dict:
    """`evaluate` on the suite files found in `data_dir` (the data stage's output)."""
    data_dir = Path(data_dir)
    tests = [r for name in TEST_FILES if (data_dir / name).exists()
             for r in load_records(data_dir / name, need_answer=True)]
    ppl = load_records(data_dir / PPL_FILE) if (data_dir / PPL_FILE).exists() else None
    judge = load_records(data_dir / JUDGE_FILE) if (data_dir / JUDGE_FILE).exists() else None
    with torch.no_grad():
        return evaluate(model, tokenizer, tests, ppl, judge, model_dir, batch_size, speed)
