"""The report stage's run(): the method is described in stages/report/__init__.py."""

from __future__ import annotations

import statistics
from pathlib import Path

import torch

from slimforge.adapters import load_adapter
from slimforge.evaluate.generation import exact_match_hits
from slimforge.evaluate.intervals import macro_interval
from slimforge.evaluate.speed import eager_decode
from slimforge.io import atomic_write_text, read_json
from slimforge.modeling import load_model
from slimforge.quantized import dequantize_for_cpu
from slimforge.stage import open_stage
from slimforge.tasks.families import BASE_FAMILIES
from slimforge.tasks.records import load_records
from stages.report.figure import size_accuracy_plot
from stages.report.params import ReportParams

COLUMNS = ("base families", "add3", "chain")  # accuracy columns: macro over add/sub/mul, then the new families


def _acc(result: dict, key: str) -> dict | None:
    """{"value", "lo", "hi"} of accuracy `key` (accuracy_base, accuracy_lora, accuracy_rl) in a stage
    result, or None when that stage did not measure it."""
    if result.get(key) is None:
        return None
    ci = result["ci95"][key]
    return {"value": result[key], "lo": ci["lo"], "hi": ci["hi"]}


def table_rows(reports: Path) -> list[dict]:
    """One dict per model, every number from the stages' reports (test splits, scored by them)."""
    base = read_json(reports / "base.json")
    prune = read_json(reports / "prune.json")["searched"]
    quantize = read_json(reports / "quantize.json")
    quant = quantize["results"][quantize["final"]]
    lora = read_json(reports / "lora.json")["results"]
    rl = read_json(reports / "rl.json")["results"]
    package = read_json(reports / "package.json")["sizes"]
    recovered = lora.get("recovered") or lora["lora"]
    rows = [
        {"key": "base", "model": "base", "params": base["params"], "bytes": base["bytes"], "bits": 8 * base["bytes"] / base["params"],
         "acc": [_acc(base, "accuracy_base"), _acc(lora["base"], "accuracy_lora"), None], "ppl": base["ppl"]},
        {"key": "pruned", "model": "pruned", "params": prune["params"], "bytes": prune["bytes"],
         "bits": 8 * prune["bytes"] / prune["params"], "acc": [_acc(prune, "accuracy_base"), None, None],
         "ppl": prune["ppl"]},
        {"key": "quantized", "model": f"quantized ({quantize['final']})", "params": quant["params"], "bytes": quant["bytes"],
         "bits": quant["bits_per_weight"], "acc": [_acc(quant, "accuracy_base"), None, None], "ppl": quant["ppl"]},
        {"key": "lora", "model": "base + lora adapter", "params": recovered["params"],
         "bytes": base["bytes"] + package["adapters/lora"]["bytes"], "bits": 8 * base["bytes"] / base["params"],
         "acc": [_acc(recovered, "accuracy_base"), _acc(recovered, "accuracy_lora"), _acc(rl["start"], "accuracy_rl")],
         "ppl": recovered["ppl"]},
        {"key": "full", "model": "shipped: package/full", "params": package["full"]["parameters"], "bytes": package["full"]["bytes"],
         "bits": package["full"]["bits_per_weight"],
         "acc": [_acc(rl["rl"], "accuracy_base"), _acc(rl["rl"], "accuracy_lora"), _acc(rl["rl"], "accuracy_rl")],
         "ppl": rl["rl"]["ppl"]},
    ]
    for row in rows:
        row.update({"accuracy_base": row["acc"][0]["value"], **dict(zip(COLUMNS, row.pop("acc")))})
    return rows


def base_families_accuracy(model, tokenizer, records: list[dict], batch_size: int) -> dict:
    """{"value", "lo", "hi", "n"}: exact match macro-averaged over the base families in `records`."""
    hits = exact_match_hits(model, tokenizer, [r for r in records if r["family"] in BASE_FAMILIES], batch_size)
    families = sorted(hits)
    value = sum(sum(hits[f]) / len(hits[f]) for f in families) / len(families)
    return {"value": value, **macro_interval(hits, families), "n": sum(len(hits[f]) for f in families)}


def decode_speed(model, params: ReportParams) -> float:
    """Median decode tokens/s at batch 1 (one untimed run first: allocation and lazy init)."""
    eager_decode(model, 1, params.prompt_len, 4)
    times = [eager_decode(model, 1, params.prompt_len, params.new_tokens)[1] for _ in range(params.repeats)]
    return params.new_tokens / statistics.median(times)


def markdown(rows: list[dict]) -> str:
    def cell(a):
        return "–" if a is None else f"{a['value']:.3f} [{a['lo']:.3f}, {a['hi']:.3f}]"

    speed = any("tokens_per_s" in r for r in rows)
    head = ["model", "parameters", "MB on disk", "bits / weight", *(["decode tokens/s"] if speed else []),
            *(f"{c} (test)" for c in COLUMNS), "perplexity"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["model"], f"{r['params']:,}", f"{r['bytes'] / 1e6:.2f}", f"{r['bits']:.2f}",
                 *([f"{r['tokens_per_s']:.0f}"] if speed else []), *(cell(r[c]) for c in COLUMNS),
                 f"{r['ppl']:.3f}" if r["ppl"] is not None else "–"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _quantized_model(folder: str | Path, device: str):
    """The quantized model as it is fastest there: on the CPU (no kernels) dequantised once into
    nn.Linear, so its decode speed is not behind the full-precision rows; the packed kernels on a GPU."""
    model = load_model(folder, device=device)[0]
    if device == "cpu":
        dequantize_for_cpu(model)
    return model


def run(params: ReportParams, reports: str | Path, base: str | Path, pruned: str | Path, quantized: str | Path,
        package: str | Path, out: str | Path, metrics: str | Path, plots: str | Path,
        report: str | Path | None = None, data: str | Path | None = None) -> dict:
    """`report` (reports/report.json): every row in full -- accuracies with intervals, decode
    tokens/s -- which the sweep flow reads for its frontier. `data` (the suite folder): each model is
    also scored on the base families of val.jsonl (`val`), which a sweep selects on (the test numbers
    come from the stages' reports and are only reported)."""
    reports, package = Path(reports), Path(package)
    rows = table_rows(reports)  # a missing or malformed report fails here, before any model loads
    val = load_records(Path(data) / "val.jsonl", need_answer=True) if data is not None else None
    with open_stage("report", params.model_dump(), out=out, inputs=[reports], metrics=metrics, report=report) as stage:
        if params.speed or val is not None:
            base_model, tokenizer = load_model(base, device=stage.device)
            models = {0: lambda: base_model, 1: lambda: load_model(pruned, device=stage.device)[0],
                      2: lambda: _quantized_model(quantized, stage.device),
                      3: lambda: load_adapter(base_model, package / "adapters" / "lora"),
                      4: lambda: load_model(package / "full", device=stage.device)[0]}
            for i, make in models.items():
                with torch.no_grad():
                    model = make()
                    if params.speed:
                        rows[i]["tokens_per_s"] = decode_speed(model, params)
                    if val is not None:
                        rows[i]["val"] = base_families_accuracy(model, tokenizer, val, params.eval_batch_size)
        device = "GPU" if stage.device == "cuda" else "CPU"
        text = (f"# slimforge: the pipeline's models\n\nTest splits, exact match with 95% bootstrap intervals (from "
                f"each stage's report); decode tokens/s at batch 1 on this machine's {device}.\n\n{markdown(rows)}\n\n"
                "![accuracy vs size](../plots/report/size_accuracy.png)\n")
        atomic_write_text(out, text)
        stage.tracker.log_artifact(out)
        files = size_accuracy_plot(Path(plots) / "size_accuracy", rows)
        measured = stage.finish({"models": {r["key"]: r for r in rows}, "device": device}, plots=list(files),
                                headline=["models.*.accuracy_base", "models.*.bytes", "models.*.bits"])
    try:  # the skeleton's checkpoint folder sits beside `out`: leave reports/ as it was
        (Path(out).parent / ".checkpoints").rmdir()
    except OSError:
        pass
    return measured
