"""The prune stage's run(): the method is described in stages/prune/__init__.py, the command line in
__main__.py (which checks the params before importing this module, so a typo fails in about a second)."""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path

from slimforge.batching import calibration_batches
from slimforge.evaluate import evaluate_suite
from slimforge.evaluate.harness import eval_files
from slimforge.io import write_provenance
from slimforge.modeling import load_model
from slimforge.plots import write_bars, write_curve
from slimforge.pruning import model_dims, prune_model, save_pruned
from slimforge.stage import open_stage
from slimforge.tasks.records import load_records
from stages.prune.calibration import KLProbe, kl_probe
from stages.prune.genome import apply_genome, lora_unit_scores, plan_and_weights
from stages.prune.loraprune import loraprune_importance
from stages.prune.params import PruneParams
from stages.prune.search import coarse_to_fine
from stages.prune.space import SearchSpace, search_space
from stages.prune.supernet import Criterion, build_supernet

HELDOUT_FILE = "val.jsonl"
log = logging.getLogger(__name__)


def probes(dense, tokenizer, params: PruneParams, data: Path, device: str) -> tuple[KLProbe, KLProbe]:
    """KL probes on calibration batches (the search's fitness) and on held-out batches (the report)."""
    c = params.calibration
    to_dev = lambda bs: [{k: v.to(device) for k, v in b.items()} for b in bs]  # noqa: E731
    records = [r for f in c.files for r in load_records(data / f)]
    batches = to_dev(calibration_batches(records, tokenizer, c.samples, c.max_len, c.batch_size, params.seed))
    heldout = to_dev(calibration_batches(load_records(data / HELDOUT_FILE), tokenizer, c.samples, c.max_len,
                                         c.batch_size, params.seed + 1))
    return kl_probe(dense, batches), kl_probe(dense, heldout)


def criterion_for(dense, batches: list[dict], dims: dict, space: SearchSpace, params: PruneParams) -> Criterion:
    """The local criterion; LoRAPrune's importance comes from a short LoRA pass here."""
    g = dims["num_heads"] // dims["num_kv_heads"]
    scores = None
    if params.criterion == "loraprune":
        lp = params.loraprune
        imp = loraprune_importance(dense, batches, lp.rank, lp.steps, lp.lr, lp.ema, params.seed)
        scores = lora_unit_scores(imp, dense.config.num_hidden_layers, dims["head_dim"], g, params.attention_unit,
                                  space.layouts)
    return Criterion(params.criterion, params.refit, params.obs.rounds, params.obs.damp, dims["head_dim"], g,
                     params.attention_unit, scores)


def baseline(dense, tokenizer, work, space: SearchSpace, keeps: list[int], criterion: Criterion, probe: KLProbe,
             heldout: KLProbe, cut, params: PruneParams, data: Path) -> dict:
    """A fixed genome (`keeps`, no search) with the same criterion, sublayers pruned in sequence, scored
    as the searched model is: KL on calibration and held-out batches, the evaluation suite."""
    net = build_supernet(dense, probe.batches, space.sublayers, space.layouts, [[k] for k in keeps], criterion)
    apply_genome(work, net, space.sublayers, keeps)
    return {"kl": probe(work), "kl_heldout": heldout(work),
            "eval": evaluate_suite(cut(net, keeps), tokenizer, data, batch_size=params.eval_batch_size)}


def plot(space: SearchSpace, history: list[float], criterion: str, plots: Path) -> list[Path]:
    n_layers = len(space.sublayers) // 2
    bars = {f"{kind} {which}": space.sparsity_per_layer(keeps, kind)
            for which, keeps in (("searched", space.centre), ("uniform", space.uniform)) for kind in ("attn", "mlp")}
    return [*write_bars(plots / "sparsity", [f"layer {i}" for i in range(n_layers)], bars,
                        "share of weights removed", f"prune: per-layer sparsity ({criterion})"),
            *write_curve(plots / "fitness", list(range(1, len(history) + 1)), {"kl": history}, "generation",
                         "prune: best KL per generation")]


# What `dvc metrics show` compares; timings and per-family accuracy go to the report (--report).
HEADLINE = ["kl_heldout.*", "*.accuracy_base", "*.ci95.accuracy_base.*", "*.params", "sparsity.achieved"]


def run(params: PruneParams, model: str | Path, data: str | Path, out: str | Path, metrics: str | Path,
        plots: str | Path, report: str | Path | None = None) -> dict:
    data, out = Path(data), Path(out)
    with open_stage("prune", params.model_dump(), out=out, inputs=[Path(model), data], metrics=metrics,
                    report=report) as stage:
        dense, tokenizer = load_model(model, device=stage.device)
        arch, dims = model_dims(dense.config)  # unsupported architectures fail here, before any work
        s = params.search
        space = search_space(dims, dense.config.num_hidden_layers, params.sparsity, params.attention_unit,
                             params.mlp_round_to, s.delta, s.levels)
        started = time.perf_counter()
        probe, heldout = probes(dense, tokenizer, params, data, stage.device)
        criterion = criterion_for(dense, probe.batches, dims, space, params)
        work = copy.deepcopy(dense)  # genomes are applied to this copy; `dense` stays the reference
        supernet, history = coarse_to_fine(dense, work, probe, space, criterion, s.model_dump(), params.seed,
                                           stage.checkpoints, lambda step, kl: stage.tracker.log_step(step, {"search_kl": kl}))
        search_seconds = time.perf_counter() - started

        meta = {"criterion": params.criterion, "sparsity": params.sparsity, "refit": params.refit,
                "attention_unit": params.attention_unit}
        achieved = space.removed(space.centre) / space.total
        meta["achieved_sparsity"] = achieved
        plan, replace = plan_and_weights(dense, dims, arch, params.attention_unit, supernet, space.sublayers,
                                         space.centre, meta)
        pruned = prune_model(dense, plan, replace)
        with stage.output() as tmp:
            save_pruned(pruned, tokenizer, plan, tmp)
            write_provenance(tmp, "prune", params.model_dump(), parent=model)
        apply_genome(work, supernet, space.sublayers, space.centre)
        measured = {"sparsity": {"target": params.sparsity, "achieved": achieved},
                  "kl": {"searched": probe(work)}, "kl_heldout": {"searched": heldout(work)},
                  "search_seconds": search_seconds,
                  "searched": evaluate_suite(pruned, tokenizer, data, model_dir=out, batch_size=params.eval_batch_size)}
        # Controls at the searched model's parameter count, same criterion: `uniform` (every sublayer
        # at the target; the search's budget, which cross-type moves hold to within one step) and
        # `attention_kept` (no attention head removed, MLPs cut as evenly as mlp_round_to allows).
        controls = {}
        if params.uniform_baseline:
            controls["uniform"] = space.uniform
        if params.attention_kept_baseline:
            keeps = space.attention_kept(space.removed(space.centre))
            if keeps is None:
                log.warning("no attention_kept control: at sparsity %s the MLPs alone cannot lose as many "
                            "weights as the searched model", params.sparsity)
            else:
                controls["attention_kept"] = keeps
        cut = lambda net, keeps: prune_model(dense, *plan_and_weights(  # noqa: E731
            dense, dims, arch, params.attention_unit, net, space.sublayers, keeps, meta))
        mlp_widths = lambda keeps: [k for k, kind in zip(keeps, space.kinds) if kind == "mlp"]  # noqa: E731
        measured["removed_weights"] = {"searched": space.removed(space.centre)}
        measured["mlp_widths"] = {"searched": mlp_widths(space.centre)}
        for name, keeps in controls.items():
            b = baseline(dense, tokenizer, work, space, keeps, criterion, probe, heldout, cut, params, data)
            measured["kl"][name], measured["kl_heldout"][name], measured[name] = b["kl"], b["kl_heldout"], b["eval"]
            measured["removed_weights"][name] = space.removed(keeps)
            measured["mlp_widths"][name] = mlp_widths(keeps)
        return stage.finish(measured, plots=plot(space, history, params.criterion, Path(plots)), headline=HEADLINE)


def suite_files(params: PruneParams) -> list[str]:
    """The data stage's files this stage reads: calibration, held-out KL and evaluation."""
    return sorted({*params.calibration.files, HELDOUT_FILE, *eval_files()})
