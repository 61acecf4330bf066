"""How the lora stage scores its variants: the adapter's families, validation and test accuracy
with intervals, and the headline ratios of LoRAM against full-model LoRA."""

from __future__ import annotations

import logging
from pathlib import Path

from slimforge import SlimforgeError
from slimforge.tasks.records import load_records

log = logging.getLogger(__name__)

LORA_TEST = "lora_test.jsonl"
TEST_FILES = ("test.jsonl", LORA_TEST)  # base families (kept?) and the adapter's families (learned?)
# Every variant is also scored on the validation problems of the adapter's families: ablations and any
# "which variant is best" choice read accuracy_lora_val; lora_test is reported, never selected on.
LORA_VAL, BASE_VAL = "lora_val.jsonl", "val.jsonl"


def headline_families(rows: list[dict], data: Path) -> list[str]:
    """The training rows' families, each of which must have test problems in lora_test.jsonl."""
    families = sorted({r["family"] for r in rows})
    tested = {r["family"] for r in load_records(data / LORA_TEST, need_answer=True)}
    missing = [f for f in families if f not in tested]
    if missing:
        raise SlimforgeError(f"the training rows' families {missing} have no test problems in {data / LORA_TEST} "
                             f"(it has: {', '.join(sorted(tested))}); add them there (data stage user_files)")
    return families


def summarize(result: dict, families: list[str], val: dict | None = None) -> dict:
    """One variant's numbers; `result` from evaluate_suite(..., macro={"accuracy_lora": families})."""
    out = {"accuracy_lora": result.get("accuracy_lora"), "accuracy_base": result.get("accuracy_base"),
           "ppl": result.get("ppl"), "accuracy": result["accuracy"], "params": result["params"],
           "n": result["n"], "ci95": {k: v for k, v in result["ci95"].items() if k != "accuracy"},
           "accuracy_lora_val": None}
    if val is not None:  # the validation problems of the same families: what ablations select on
        out["accuracy_lora_val"] = macro_accuracy(val["accuracy"], families)
        out["accuracy_base_val"] = macro_accuracy(val["accuracy"], sorted(set(val["accuracy"]) - set(families)))
        out["accuracy_val"] = val["accuracy"]
    return out


def macro_accuracy(accuracy: dict, families: list[str]) -> float | None:
    """Macro accuracy over `families`; None unless every one was scored (a partial mean would not
    compare with the test headline)."""
    if not families or any(f not in accuracy for f in families):
        return None
    return sum(accuracy[f] for f in families) / len(families)


def val_records(data: Path, families: list[str]) -> list[dict]:
    """lora_val.jsonl's problems of the adapter's families (empty, with a warning, when a family has
    none there: accuracy_lora_val is then None, and nothing can be selected on it), plus val.jsonl's
    base-family problems (accuracy_base_val: did the adapter keep them?)."""
    path = data / LORA_VAL
    records = [r for r in load_records(path, need_answer=True) if r["family"] in families] if path.is_file() else []
    missing = sorted(set(families) - {r["family"] for r in records})
    if missing:
        log.warning("%s has no validation problems for %s: accuracy_lora_val is not reported (add them through the "
                    "data stage's user_files)", path, ", ".join(missing))
    base = data / BASE_VAL
    return records + ([r for r in load_records(base, need_answer=True) if r["family"] not in families]
                      if base.is_file() else [])


def ratios(results: dict, training: dict) -> dict:
    """The headline comparisons: recovered vs full-model LoRA accuracy, memory and speed; and LoRAM's
    whole cost (alignment + LoRA) beside full-model LoRA's."""
    out = {}
    full, rec = results.get("full_lora"), results.get("recovered")
    if full and rec and full["accuracy_lora"]:
        out["recovered_vs_full_lora"] = rec["accuracy_lora"] / full["accuracy_lora"]
    small, big, aligned = training.get("loram"), training.get("full_lora"), training.get("align")
    if small and big:
        out["state_bytes_ratio"] = small["state_bytes"] / big["state_bytes"]
        out["tokens_per_s_ratio"] = small["tokens_per_s"] / big["tokens_per_s"]
        if small["peak_memory_bytes"] and big["peak_memory_bytes"]:
            out["peak_memory_ratio"] = small["peak_memory_bytes"] / big["peak_memory_bytes"]
        if aligned:  # alignment is part of LoRAM's price: its own window, teacher resident
            out["align_seconds_ratio"] = aligned["seconds"] / big["seconds"]
            out["loram_with_align_seconds_ratio"] = (aligned["seconds"] + small["seconds"]) / big["seconds"]
            out["align_state_bytes_ratio"] = aligned["state_bytes"] / big["state_bytes"]
            if aligned["peak_memory_bytes"] and big["peak_memory_bytes"]:
                out["align_peak_memory_ratio"] = aligned["peak_memory_bytes"] / big["peak_memory_bytes"]
    return out
