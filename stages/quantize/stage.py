"""The quantize stage's run(): the method is described in stages/quantize/__init__.py, the command line in
__main__.py (which checks the params before importing this module, so a typo fails in about a second)."""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from pathlib import Path

import torch

from kernels.quant_linear import padded_width
from slimforge import SlimforgeError
from slimforge.batching import calibration_batches, encode_records
from slimforge.cli_util import progress
from slimforge.evaluate import evaluate_suite
from slimforge.evaluate.harness import eval_files
from slimforge.io import write_provenance
from slimforge.losses import distillation_loss
from slimforge.modeling import load_model
from slimforge.plots import write_grid
from slimforge.quantized import bits_report, quantize_model, save_quantized, target_linears
from slimforge.stage import open_stage
from slimforge.tasks.records import load_records
from slimforge.training import train_causal_lm
from stages.quantize.allocate import allocate, config_cost, error_table
from stages.quantize.decompose import lq_decompose
from stages.quantize.fisher import fisher_diagonal, rank1_fisher
from stages.quantize.params import QuantizeParams

log = logging.getLogger(__name__)


LREC_FILE = "train.jsonl"  # the text error correction trains on


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


def check_budget(shapes: list[tuple[int, int]], choices: list[tuple[int, int]], rank: int, budget: float) -> None:
    """Refuse, from the shapes alone (before any Fisher pass), a budget below the cheapest mix."""
    total = sum(n * k for n, k in shapes)
    cheapest = sum(min(config_cost((n, padded_width(k, g)), b, g, rank) for b, g in choices) for n, k in shapes)
    if cheapest > budget * total:
        raise SlimforgeError(f"budget {budget} bits/weight is infeasible: the cheapest of `choices` for every matrix, "
                             f"with rank {rank} factors, needs {cheapest / total:.3f} bits/weight; raise the budget, "
                             f"lower the rank or add cheaper choices")


def choose_formats(weights: dict[str, torch.Tensor], factors: dict[str, tuple], choices: list[tuple[int, int]],
                   rank: int, budget: float, iters: int) -> tuple[dict[str, tuple[int, int]], dict]:
    """Exact allocation of (bits, group) per matrix under an average bits-per-weight budget
    (scales, zeros and low-rank factors counted), minimising the summed squared (Fisher-weighted)
    reconstruction error."""
    names = list(weights)
    errors, costs = [], []
    for n in progress(names, desc=f"error table ({len(choices)} formats)", unit="matrix", log=log):
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


def calibration_batches_for(tokenizer, params: QuantizeParams, data: Path, device: str) -> list[dict]:
    c = params.calibration
    records = [r for f in c.files for r in load_records(data / f)]
    return [{k: v.to(device) for k, v in b.items()} for b in
            calibration_batches(records, tokenizer, c.samples, c.max_len, c.batch_size, params.seed)]


def decompose(weights: dict[str, torch.Tensor], factors: dict[str, tuple], formats: dict[str, tuple[int, int]],
              rank: int, iters: int) -> dict:
    """W ~ Q + L1 L2 per matrix at its format (rank 0: plain round to nearest)."""
    out = {}
    for n, w in progress(weights.items(), desc="decompose", total=len(weights), unit="matrix", log=log):
        row, col = factors.get(n, (None, None))
        bits, group = formats[n]
        w = pad_columns(w, group)
        out[n] = lq_decompose(w, bits, group, rank=rank, iters=iters, row_weight=row,
                              col_weight=pad_weight(col, w.shape[1]))
    return out


def zero_init_factors(decomposed: dict, rank: int, seed: int) -> dict:
    """The LREC control's start: RTN (rank-0 decompositions) plus rank-r factors initialised as
    PEFT initialises LoRA (down uniform in +-1/sqrt(K), up = 0), so the model starts exactly at RTN
    and only the training moves it; LQ-LoRA's start is the SVD of the weighted RTN residual instead."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, d in decomposed.items():
        n, k = d.q.shape
        down = (2 * torch.rand(rank, k, generator=g) - 1) / k ** 0.5
        out[name] = dataclasses.replace(d, down=down.to(d.down), up=d.up.new_zeros(n, rank))
    return out


def correct_errors(student, teacher, tokenizer, params: QuantizeParams, data: Path, stage,
                   checkpoints: Path | None = None, prefix: str = "lrec") -> dict:
    """INT2.1: only the low-rank factors train, against the teacher (KL over the vocabulary +
    response cross-entropy). Returns the training history. `checkpoints`/`prefix`: where it
    resumes from and how it logs (the control trains a second model with the same recipe)."""
    teacher.requires_grad_(False)
    student.requires_grad_(False)
    for m in student.modules():
        for p in (getattr(m, "down", None), getattr(m, "up", None)):
            if isinstance(p, torch.nn.Parameter):
                p.requires_grad_(True)
    lrec = params.lrec
    examples = encode_records(load_records(data / LREC_FILE), tokenizer, max_len=params.calibration.max_len)
    history = train_causal_lm(student, examples, lrec, pad_id=tokenizer.pad_token_id, seed=params.seed,
                              checkpoint_dir=checkpoints or stage.checkpoints, fingerprint=stage.fingerprint,
                              loss_fn=distillation_loss(teacher, ce_weight=lrec.ce_weight, kl_weight=lrec.kl_weight),
                              on_log=stage.logger(prefix + "_"), desc=prefix)
    student.requires_grad_(False)
    return history


# What `dvc metrics show` compares; timings, per-family accuracy and the allocation go to the report.
HEADLINE = ["bits.bits_per_weight", "results.*.accuracy_base", "results.*.ci95.accuracy_base.*", "results.*.ppl",
            "results.*.bits_per_weight", "gap_closed.*.accuracy_base", "gap_closed.*.ppl"]
# The share of the gap to full precision is measured from RTN at the final model's bits (the ILP
# spends them on weights alone), not from RTN at the same format, which stores fewer bits.
GAP_BASELINE = "rtn_matched"


def run(params: QuantizeParams, model: str | Path, base: str | Path, data: str | Path, out: str | Path,
        metrics: str | Path, plots: str | Path, report: str | Path | None = None) -> dict:
    data, base_dir = Path(data), Path(base)
    source = Path(model) if params.model == "pruned" else base_dir
    with open_stage("quantize", params.model_dump(), out=out, inputs=[source, data], metrics=metrics,
                    report=report) as stage:
        fp_model, tokenizer = load_model(source, device=stage.device)
        linears = target_linears(fp_model, params.targets)  # a model without them fails here, before any work
        rank = params.rank if params.method == "lq_lora" else 0
        if params.budget is not None:
            check_budget([tuple(m.weight.shape) for m in linears.values()], params.choices, rank, params.budget)
        started = time.perf_counter()
        factors = {}
        if params.fisher:
            fisher = fisher_diagonal(fp_model, calibration_batches_for(tokenizer, params, data, stage.device),
                                     lm_loss)
            factors = {n: rank1_fisher(fisher[n]) for n in linears}
        weights = {n: m.weight.detach() for n, m in linears.items()}
        measured: dict = {"source": params.model}
        if params.budget is not None:
            formats, measured["allocation"] = choose_formats(weights, factors, params.choices, rank, params.budget,
                                                           params.lq_iters)
        else:
            formats = {n: (params.bits, params.group) for n in linears}
        evaluate = lambda m, **kw: evaluate_suite(m, tokenizer, data, batch_size=params.eval_batch_size, **kw)  # noqa: E731
        own_bits = lambda m: {"bits_per_weight": bits_report(m)["bits_per_weight"]}  # noqa: E731
        dtype_bits = 8 * next(fp_model.parameters()).element_size()
        results = {"full_precision": {**evaluate(fp_model), "bits_per_weight": float(dtype_bits)}}
        compare = params.compare and rank > 0
        if compare:  # RTN at the same format (rank 0: fewer bits than the corrected model)
            rtn_parts = decompose(weights, factors, formats, 0, params.lq_iters)
            rtn = quantize_model(copy.deepcopy(fp_model), rtn_parts, formats)
            results["rtn"] = {**evaluate(rtn), **own_bits(rtn)}
            del rtn
        student = quantize_model(copy.deepcopy(fp_model), decompose(weights, factors, formats, rank, params.lq_iters),
                                 formats)
        quantize_seconds = time.perf_counter() - started
        name = "lq_lora" if rank > 0 else "rtn"
        bits = bits_report(student)
        results[name] = {**evaluate(student), "bits_per_weight": bits["bits_per_weight"]}
        if compare:  # RTN at matched bits: the ILP spends the corrected model's bits on weights alone
            matched_formats, measured["rtn_matched_allocation"] = choose_formats(
                weights, factors, sorted({*params.choices, *formats.values()}), 0, bits["bits_per_weight"],
                params.lq_iters)
            matched = quantize_model(copy.deepcopy(fp_model),
                                     decompose(weights, factors, matched_formats, 0, params.lq_iters), matched_formats)
            results["rtn_matched"] = {**evaluate(matched), **own_bits(matched)}
            measured["rtn_matched_formats"] = _format_counts(matched_formats)
            del matched
        history = {}
        if rank > 0 and params.lrec.steps > 0:
            teacher = fp_model if params.lrec.teacher == "input" else load_model(base_dir, device=stage.device)[0]
            history, name = correct_errors(student, teacher, tokenizer, params, data, stage), "lq_lora_lrec"
            if compare:  # the control: same recipe from RTN + zero-product factors (initialisation vs training)
                control = quantize_model(copy.deepcopy(fp_model), zero_init_factors(rtn_parts, rank, params.seed),
                                         formats)
                control_history = correct_errors(control, teacher, tokenizer, params, data, stage,
                                                 checkpoints=stage.checkpoints / "rtn_lrec", prefix="rtn_lrec")
                results["rtn_lrec"] = {**evaluate(control), **own_bits(control)}
                measured.update({"rtn_lrec_steps": len(control_history["losses"]),
                                 "rtn_lrec_seconds": control_history["seconds"]})
                del control
        with stage.output() as tmp:
            save_quantized(student, tokenizer, source, tmp)
            write_provenance(tmp, "quantize", params.model_dump(), parent=source)
        results[name] = {**evaluate(student, model_dir=out), "bits_per_weight": bits["bits_per_weight"]}
        measured.update({"bits": bits, "formats": _format_counts(formats),
                         "quantize_seconds": quantize_seconds, "lrec_seconds": history.get("seconds", 0.0),
                         "lrec_steps": len(history["losses"]) if history else 0, "final": name, "results": results,
                         "gap_closed": _gap_closed(results)})
        return stage.finish(measured, plots=bits_plot(formats, params.targets, bits, Path(plots), params.budget),
                            headline=HEADLINE)


def bits_plot(formats: dict[str, tuple[int, int]], targets: list[str], bits: dict, plots: Path,
              budget: float | None = None) -> list[Path]:
    """A layer x matrix grid coloured by each matrix's bits; the title gives the budget and what was spent."""
    layers = sorted({_layer(n) for n in formats})
    by_layer = sorted(formats.items(), key=lambda x: _layer(x[0]))
    grid = {kind: [b for n, (b, _) in by_layer if n.endswith(kind)] for kind in targets}
    groups = sorted({g for _, g in formats.values()})
    # one group size: say it once in the title; several (a budget's ILP mixes them): in each cell
    cells = {kind: [f"{b}/g{g}" for n, (b, g) in by_layer if n.endswith(kind)] for kind in targets} \
        if len(groups) > 1 else None
    chosen = f"budget {budget:g} bits/weight" if budget else f"no budget, one format (group {groups[0]})"
    spent = f"{bits['bits_per_weight']:.2f} bits/weight overall"
    if "quantized_bits_per_weight" in bits and "low_rank_bits_per_weight" in bits:
        spent += (f" = {bits['quantized_bits_per_weight']:.2f} quantized incl. scales"
                  f" + {bits['low_rank_bits_per_weight']:.2f} low-rank")
    title = f"quantize: bits per weight matrix (before scales)\n{chosen}: {spent}"
    group = {kind: [g for n, (_, g) in by_layer if n.endswith(kind)] for kind in targets}
    return write_grid(plots / "bits", [f"layer {i}" for i in layers], grid, title, "bits", cell_text=cells,
                      labels=("layer", "matrix"), extra={"group": group})


def _layer(name: str) -> int:
    return int(name.split(".layers.")[1].split(".")[0])


def _format_counts(formats: dict[str, tuple[int, int]]) -> dict[str, int]:
    return {f"{b}-bit g{g}": sum(1 for v in formats.values() if v == (b, g)) for b, g in sorted(set(formats.values()))}


def _gap_closed(results: dict, baseline: str = GAP_BASELINE) -> dict:
    """{baseline: {column.metric: share}}: the share of the baseline -> full-precision gap each
    column closes (accuracy and perplexity); 1 is full precision, above 1 beats it. Empty without
    the baseline (compare off)."""
    fp, base = results.get("full_precision"), results.get(baseline)
    out = {}
    for name in ("lq_lora", "lq_lora_lrec", "rtn_lrec"):
        if base is None or results.get(name) is None:
            continue
        for key in ("accuracy_base", "ppl"):
            gap = fp[key] - base[key]
            if abs(gap) > 1e-9:
                out[f"{name}.{key}"] = (results[name][key] - base[key]) / gap
    return {baseline: out} if out else {}


def suite_files(params: QuantizeParams) -> list[str]:
    """The data stage's files this stage reads: calibration, error-correction text and evaluation."""
    return sorted({*params.calibration.files, LREC_FILE, *eval_files()})
