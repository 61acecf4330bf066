"""quantize stage: error-correcting low-bit quantization (LQ-LoRA decomposition, exact bit
allocation, INT2.1 low-rank error correction) on the shared low-bit kernels.

    python -m stages.quantize --params params/quantize.yaml --model data/pruned --base data/base \
        --data data/tasks --out data/quantized --metrics metrics/quantize.json --plots plots/quantize

1. Fisher (optional): squared gradients of every target weight on calibration text, factorised
   into row x column weights (LQ-LoRA), so errors count where the loss is sensitive.
2. Format per matrix: uniform `bits`/`group`, or with `budget` an exact integer linear program over
   `choices` that minimises the summed (Fisher-weighted) reconstruction error under the average
   bits-per-weight budget (scales, zeros and low-rank factors counted).
3. Decomposition: W ~ Q + L1 L2 (LQ-LoRA: alternate quantization and rank-r SVD), or plain RTN.
4. LREC (INT2.1): the factors train as LoRA on the frozen packed weights against the
   full-precision teacher: KL(teacher || student) over the vocabulary + response cross-entropy.
   Checkpointed; a killed run resumes.
5. The quantized folder (packed weights, scales/zeros, factors, bit map; see slimforge/quantized.py)
   and a comparison of full precision, RTN, the untrained decomposition and LREC at this format.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import time
from pathlib import Path

import torch

from kernels.quant_linear import padded_width
from slimforge import SlimforgeError
from slimforge.batching import calibration_batches, encode_records
from slimforge.evaluate import evaluate_suite
from slimforge.io import atomic_dir, folder_hash, write_json, write_provenance
from slimforge.modeling import load_model
from slimforge.plots import write_bars
from slimforge.quantized import bits_report, quantize_model, save_quantized, target_linears
from slimforge.tasks.records import load_records
from slimforge.tracking import stage_run
from slimforge.training import finish_training, train_causal_lm
from stages.quantize.allocate import allocate, config_cost, error_table
from stages.quantize.decompose import lq_decompose
from stages.quantize.fisher import fisher_diagonal, rank1_fisher
from stages.quantize.params import QuantizeParams


def lm_loss(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Next-token cross-entropy over every non-padding token (the Fisher's loss)."""
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).loss


def pad_columns(w: torch.Tensor, group: int) -> torch.Tensor:
    """Zero columns up to a multiple of the group: a pruned MLP width (a multiple of the prune
    stage's mlp_round_to) need not divide it. The padded inputs are zeros at run time."""
    extra = padded_width(w.shape[1], group) - w.shape[1]
    return torch.nn.functional.pad(w, (0, extra)) if extra else w


def pad_weight(col: torch.Tensor | None, width: int) -> torch.Tensor | None:
    return None if col is None else torch.nn.functional.pad(col, (0, width - col.shape[0]))


def choose_formats(weights: dict[str, torch.Tensor], factors: dict[str, tuple], choices: list[tuple[int, int]],
                   rank: int, budget: float, iters: int) -> tuple[dict[str, tuple[int, int]], dict]:
    """Exact allocation of (bits, group) per matrix under an average bits-per-weight budget
    (scales, zeros and low-rank factors counted), minimising the summed squared (Fisher-weighted)
    reconstruction error."""
    names = list(weights)
    errors, costs = [], []
    for n in names:
        row, col = factors.get(n, (None, None))
        err, cost = [], []
        for bits, group in choices:
            w = pad_columns(weights[n], group)
            err += error_table(w, [(bits, group)], rank, row_weight=row, col_weight=pad_weight(col, w.shape[1]),
                               iters=iters)
            cost.append(config_cost(tuple(w.shape), bits, group, rank))
        errors.append(err)
        costs.append(cost)
    total = sum(w.numel() for w in weights.values())
    try:
        pick = allocate(errors, costs, budget * total)
    except ValueError as err:  # an infeasible budget: say so in params' terms
        raise SlimforgeError(f"budget {budget} bits/weight: {err}") from None
    chosen = {n: tuple(choices[c]) for n, c in zip(names, pick)}
    return chosen, {"budget_bits_per_weight": budget,
                    "allocated_bits_per_weight": sum(costs[i][c] for i, c in enumerate(pick)) / total}


def _fingerprint(params: QuantizeParams, source: Path) -> str:
    return hashlib.sha256((json.dumps(params.model_dump(), sort_keys=True) + folder_hash(source)).encode()).hexdigest()


def run(params: QuantizeParams, model_dir: str | Path, base_dir: str | Path, data_dir: str | Path,
        out_dir: str | Path, metrics_path: str | Path, plots_dir: str | Path) -> dict:
    model_dir, base_dir, data_dir = Path(model_dir), Path(base_dir), Path(data_dir)
    out_dir, plots_dir = Path(out_dir), Path(plots_dir)
    source = model_dir if params.model == "pruned" else base_dir
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer = load_model(source, device=device)
    linears = target_linears(model, params.targets)  # a model without them fails here, before any work
    rank = params.rank if params.method == "lq_lora" else 0
    ckpt = out_dir.parent / ".checkpoints" / out_dir.name

    with stage_run("quantize", params.model_dump()) as tracker:
        started = time.perf_counter()
        c = params.calibration
        records = [r for f in c.files for r in load_records(data_dir / f)]
        batches = [{k: v.to(device) for k, v in b.items()} for b in
                   calibration_batches(records, tokenizer, c.samples, c.max_len, c.batch_size, params.seed)]
        factors = {}
        if params.fisher:
            fisher = fisher_diagonal(model, batches, lm_loss)
            factors = {n: rank1_fisher(fisher[n]) for n in linears}
        weights = {n: m.weight.detach() for n, m in linears.items()}
        metrics: dict = {"source": params.model}
        if params.budget is not None:
            formats, metrics["allocation"] = choose_formats(weights, factors, params.choices, rank, params.budget,
                                                            params.lq_iters)
        else:
            formats = {n: (params.bits, params.group) for n in linears}

        def decompose(r: int):
            out = {}
            for n, w in weights.items():
                row, col = factors.get(n, (None, None))
                bits, group = formats[n]
                w = pad_columns(w, group)
                out[n] = lq_decompose(w, bits, group, rank=r, iters=params.lq_iters, row_weight=row,
                                      col_weight=pad_weight(col, w.shape[1]))
            return out

        results = {"full_precision": evaluate_suite(model, tokenizer, data_dir, batch_size=params.eval_batch_size,
                                                    speed=False)}
        if params.compare and rank > 0:
            rtn = quantize_model(copy.deepcopy(model), decompose(0), formats)
            results["rtn"] = evaluate_suite(rtn, tokenizer, data_dir, batch_size=params.eval_batch_size, speed=False)
            del rtn
        student = quantize_model(copy.deepcopy(model), decompose(rank), formats)
        quantize_seconds = time.perf_counter() - started
        name = "lq_lora" if rank > 0 else "rtn"
        results[name] = evaluate_suite(student, tokenizer, data_dir, batch_size=params.eval_batch_size, speed=False)

        lrec = params.lrec
        history = {}
        if rank > 0 and lrec.steps > 0:
            teacher = model if lrec.teacher == "input" else load_model(base_dir, device=device)[0]
            teacher.requires_grad_(False)
            student.requires_grad_(False)
            for m in student.modules():  # only the low-rank factors train
                for p in (getattr(m, "down", None), getattr(m, "up", None)):
                    if isinstance(p, torch.nn.Parameter):
                        p.requires_grad_(True)
            train_records = load_records(data_dir / "train.jsonl")
            examples = encode_records(train_records, tokenizer, max_len=c.max_len)
            history = train_causal_lm(
                student, examples, pad_id=tokenizer.pad_token_id, steps=lrec.steps, batch_size=lrec.batch_size,
                lr=lrec.lr, warmup_steps=lrec.warmup_steps, min_lr_ratio=0.1, weight_decay=0.0, grad_clip=1.0,
                seed=params.seed, checkpoint_dir=ckpt, checkpoint_every=lrec.checkpoint_every,
                fingerprint=_fingerprint(params, source), teacher=teacher, kl_weight=lrec.kl_weight,
                ce_weight=lrec.ce_weight, on_log=lambda step, m: tracker.log_step(step, {"lrec_" + k: v
                                                                                      for k, v in m.items()}))
            student.requires_grad_(False)
            name = "lq_lora_lrec"

        with atomic_dir(out_dir) as tmp:
            save_quantized(student, tokenizer, source, tmp)
            write_provenance(tmp, "quantize", params.model_dump(), parent=folder_hash(source))
        results[name] = evaluate_suite(student, tokenizer, data_dir, model_dir=out_dir,
                                       batch_size=params.eval_batch_size)
        bits = bits_report(student)
        metrics.update({"bits": bits, "formats": {f"{b}-bit g{g}": sum(1 for v in formats.values() if v == (b, g))
                                                  for b, g in sorted(set(formats.values()))},
                        "quantize_seconds": quantize_seconds, "lrec_seconds": history.get("seconds", 0.0),
                        "lrec_steps": lrec.steps if history else 0, "final": name, "results": results,
                        "gap_closed": _gap_closed(results)})
        write_json(metrics_path, metrics)
        layers = sorted({int(n.split(".layers.")[1].split(".")[0]) for n in formats})
        bars = {kind: [b for n, (b, _) in sorted(formats.items(), key=lambda x: _layer(x[0])) if n.endswith(kind)]
                for kind in params.targets}
        title = f"quantize: bits per matrix ({bits['bits_per_weight']:.2f} bits/weight in total)"
        for f in write_bars(plots_dir / "bits", [f"layer {i}" for i in layers], bars, "bits (before scales)", title):
            tracker.log_artifact(f, "plots")
        tracker.log_metrics(metrics)
        tracker.log_artifact(metrics_path)
        finish_training(ckpt)
        shutil.rmtree(ckpt, ignore_errors=True)
    return metrics


def _layer(name: str) -> int:
    return int(name.split(".layers.")[1].split(".")[0])


def _gap_closed(results: dict) -> dict:
    """Share of the RTN -> full-precision gap the corrected model closes (accuracy and perplexity)."""
    fp, rtn = results.get("full_precision"), results.get("rtn")
    out = {}
    for name in ("lq_lora", "lq_lora_lrec"):
        if rtn is None or results.get(name) is None:
            continue
        for key in ("accuracy_base", "ppl"):
            gap = fp[key] - rtn[key]
            if abs(gap) > 1e-9:
                out[f"{name}.{key}"] = (results[name][key] - rtn[key]) / gap
    return out
