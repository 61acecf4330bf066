"""The one evaluation harness every stage uses, so numbers line up in one table.

    slimforge eval data/base --data data/tasks        # any model folder, from the shell

Metrics: exact-match accuracy per task family (greedy, batched, KV cache), the macro mean over the
base families, perplexity of held-out responses, judge accuracy in both formats, parameter count,
bytes on disk. Decode speed is a benchmark, not a stage metric: `slimforge eval --speed` and
the bench_* scripts measure it (so editing the timing code never reruns a stage).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from slimforge.evaluate.generation import exact_match_hits
from slimforge.evaluate.intervals import accuracy_with_intervals
from slimforge.evaluate.judging import verdict_probs
from slimforge.evaluate.scoring import perplexity
from slimforge.io import folder_bytes
from slimforge.modeling import count_parameters
from slimforge.tasks.judge import VERDICTS
from slimforge.tasks.records import load_records

log = logging.getLogger(__name__)

# Evaluation files of the embedded suite. test.jsonl holds the base families (the model's own
# tasks); lora_test.jsonl and rl_test.jsonl the later stages' families.
BASE_TEST = "test.jsonl"
TEST_FILES = (BASE_TEST, "lora_test.jsonl", "rl_test.jsonl")
JUDGE_FILE = "judge_test.jsonl"


def judge_accuracy(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, records: list[dict],
                   batch_size: int = 128) -> dict[str, float]:
    """Share of judge items whose more probable verdict is the right one, per format (verdicts of
    several tokens are scored as whole sequences, see judging.verdict_probs)."""
    out = {}
    for fmt in VERDICTS:
        items = [r for r in records if r.get("format") == fmt]
        if not items:
            continue
        p_first = verdict_probs(model, tokenizer, [r["prompt"] for r in items], fmt, batch_size)
        predicted = [VERDICTS[fmt][0 if p >= 0.5 else 1] for p in p_first.tolist()]
        out[fmt] = sum(p == r["response"] for p, r in zip(predicted, items)) / len(items)
    return out


def evaluate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, test_records: list[dict],
             ppl_records: list[dict] | None = None, judge_records: list[dict] | None = None,
             model_dir: str | Path | None = None, batch_size: int = 256,
             base_families: list[str] | None = None, macro: dict[str, list[str]] | None = None) -> dict:
    """Metrics for one model. `test_records` need `answer`; the rest are optional.
    `accuracy_base` is the macro mean over `base_families` (default: every family tested); `macro`
    names further macro means ({"accuracy_lora": [...families]}). Every accuracy comes with its
    problem count (`n`) and a 95% bootstrap interval (`ci95`, see intervals.py)."""
    start = time.perf_counter()
    model.eval()
    hits = exact_match_hits(model, tokenizer, test_records, batch_size)
    means = {"accuracy_base": list(hits) if base_families is None else base_families, **(macro or {})}
    metrics: dict = {**accuracy_with_intervals(hits, means), "params": count_parameters(model)}
    if ppl_records:
        metrics["ppl"] = perplexity(model, tokenizer, ppl_records, max(1, batch_size // 4))
    if judge_records:
        metrics["judge"] = judge_accuracy(model, tokenizer, judge_records, max(1, batch_size // 2))
    if model_dir is not None:
        metrics["bytes"] = folder_bytes(model_dir)
    metrics["eval_seconds"] = time.perf_counter() - start
    log.info("evaluated %d test problems in %.0f s: accuracy_base %s, ppl %s", len(test_records),
             metrics["eval_seconds"], _fmt(metrics.get("accuracy_base")), _fmt(metrics.get("ppl")))
    return metrics


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.4g}"


def eval_files(test_files: tuple[str, ...] = (BASE_TEST,)) -> list[str]:
    """The suite files `evaluate_suite` reads: the test files and the judge items."""
    return [*test_files, JUDGE_FILE]


def evaluate_suite(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, data_dir: str | Path,
                   model_dir: str | Path | None = None, batch_size: int = 256,
                   test_files: tuple[str, ...] = (BASE_TEST,), macro: dict[str, list[str]] | None = None) -> dict:
    """`evaluate` on suite files of `data_dir` (the data stage's output): exact match on
    `test_files` (those present), perplexity and `accuracy_base` on test.jsonl (its families are
    the base families), judge accuracy on judge_test.jsonl, `macro` as in `evaluate`. A stage reads
    only the files it names, so dvc.yaml can make it depend on just those."""
    data_dir = Path(data_dir)
    loaded = {name: load_records(data_dir / name, need_answer=True) for name in test_files
              if (data_dir / name).exists()}
    tests = [r for records in loaded.values() for r in records]
    ppl = loaded.get(BASE_TEST)
    families = sorted({r["family"] for r in ppl}) if ppl else None
    judge = load_records(data_dir / JUDGE_FILE) if (data_dir / JUDGE_FILE).exists() else None
    with torch.no_grad():
        return evaluate(model, tokenizer, tests, ppl, judge, model_dir, batch_size, families, macro)
