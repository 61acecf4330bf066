"""Downstream check of a filter: the library's LoRA recipe trained on each method's kept rows (same
schedule, same seed), scored by exact match on a held-out test file; with labels, also on the
truly correct rows only (`oracle`: what a perfect filter would reach)."""

from __future__ import annotations

from pathlib import Path

from slimforge.adapters import train_lora
from slimforge.batching import encode_records
from slimforge.config import PROJECTIONS
from slimforge.evaluate.generation import exact_match_hits
from slimforge.evaluate.intervals import macro_interval
from slimforge.modeling import load_model
from stages.filter.params import Downstream


def lora_accuracy(model_dir: Path, records: list[dict], tests: list[dict], ds: Downstream, seed: int,
                  checkpoint_dir: Path, fingerprint: str, device: str) -> tuple[float, dict[str, float]]:
    """Mean exact match over the families of `tests` of `model_dir` + a LoRA trained on `records`,
    and its 95% bootstrap interval."""
    model, tokenizer = load_model(model_dir, device=device)
    model, _ = train_lora(model, encode_records(records, tokenizer), ds, rank=ds.rank, alpha=ds.alpha,
                          targets=list(PROJECTIONS), seed=seed, pad_id=tokenizer.pad_token_id,
                          checkpoint_dir=checkpoint_dir, fingerprint=fingerprint,
                          desc=f"downstream lora ({len(records)} rows)")
    hits = exact_match_hits(model, tokenizer, tests)
    return sum(sum(h) / len(h) for h in hits.values()) / len(hits), macro_interval(hits, list(hits))


def downstream_accuracy(model_dir: Path, targets: list[dict], methods: dict, wrong: list[bool] | None,
                        tests: list[dict], ds: Downstream, seed: int, stage) -> tuple[dict, dict]:
    """({method: accuracy}, {method: 95% interval}) for the chosen method's kept rows (`filtered`; with
    `every_method`, each method's too), keep-all and (with labels) the oracle. Methods that kept the same rows share one run (same recipe, same seed:
    the same adapter)."""
    names = ("filtered", "meta_ranking", "direct", "perplexity", "keep_all") if ds.every_method else ("filtered", "keep_all")
    kept = {name: methods[name]["kept"] for name in names if name in methods}
    if wrong is not None:  # the upper bound a perfect filter reaches (evaluation only)
        kept["oracle"] = [not w for w in wrong]
    accuracy, interval, by_rows = {}, {}, {}
    for name, keep in kept.items():
        if not any(keep):
            continue
        if tuple(keep) not in by_rows:
            rows = [t for t, k in zip(targets, keep) if k]
            by_rows[tuple(keep)] = lora_accuracy(model_dir, rows, tests, ds, seed, stage.checkpoints / f"lora-{name}",
                                                 stage.fingerprint, stage.device)
        accuracy[name], interval[name] = by_rows[tuple(keep)]
    return accuracy, interval
