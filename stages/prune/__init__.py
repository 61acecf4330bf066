"""prune stage: Týr-the-Pruner global sparsity search with structured, GQA-aware pruning.

    python -m stages.prune --params params/prune.yaml --model data/base --data data/tasks \
        --out data/pruned --metrics metrics/prune.json --plots plots/prune

1. Local criterion scores (obs | loraprune | wanda | magnitude) prune every sublayer (each
   layer's attention and MLP) at several levels around a centre: the supernet, built with
   expectation error accumulation (supernet.py).
2. An evolutionary search picks one level per sublayer under the fixed parameter budget,
   minimising KL(dense || pruned) on calibration tokens (search.py); coarse-to-fine rounds
   re-centre on the best distribution with half the step.
3. The best distribution is cut out physically and saved as a folder that loads with stock
   transformers (trust_remote_code) plus plan.json; a uniform-sparsity prune with the same
   criterion is measured beside it. A killed run resumes from data/.checkpoints/prune.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import time
from pathlib import Path

import torch

from slimforge.evaluate import evaluate_suite
from slimforge.batching import calibration_batches
from slimforge.io import atomic_dir, folder_hash, write_json, write_provenance
from slimforge.modeling import load_model
from slimforge.plots import write_bars, write_curve
from slimforge.pruning import model_dims, prune_model, save_pruned
from slimforge.tasks.records import load_records
from slimforge.tracking import stage_run
from stages.prune.calibration import dense_logits, mean_kl
from stages.prune.genome import (apply_genome, level_grid, lora_unit_scores, plan_and_weights,
                                 removed_weights, uniform_keep)
from stages.prune.loraprune import loraprune_importance
from stages.prune.params import PruneParams
from stages.prune.search import evolve
from stages.prune.supernet import attention_layout, build_supernet, load_supernet, mlp_layout, save_supernet

HELDOUT_FILE = "val.jsonl"


def _fingerprint(params: PruneParams, base_dir: Path) -> str:
    return hashlib.sha256((json.dumps(params.model_dump(), sort_keys=True) + folder_hash(base_dir)).encode()).hexdigest()


def run(params: PruneParams, base_dir: str | Path, data_dir: str | Path, out_dir: str | Path,
        metrics_path: str | Path, plots_dir: str | Path) -> dict:
    base_dir, data_dir, out_dir, plots_dir = Path(base_dir), Path(data_dir), Path(out_dir), Path(plots_dir)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer = load_model(base_dir, device=device)
    arch, dims = model_dims(model.config)  # unsupported architectures fail here, before any work
    n_layers, g = model.config.num_hidden_layers, dims["num_heads"] // dims["num_kv_heads"]
    layouts = {"attn": attention_layout(dims["num_heads"], dims["num_kv_heads"], dims["head_dim"],
                                        dims["hidden_size"], params.attention_unit),
               "mlp": mlp_layout(dims["intermediate_size"], dims["hidden_size"])}
    centre_of = {k: uniform_keep(lay, params.sparsity, params.mlp_round_to) for k, lay in layouts.items()}
    sublayers = [(i, kind) for i in range(n_layers) for kind in ("attn", "mlp")]
    kinds = [kind for _, kind in sublayers]
    ckpt = out_dir.parent / ".checkpoints" / out_dir.name
    fp = _fingerprint(params, base_dir)
    stale = ckpt.exists() and (not (ckpt / "fingerprint").exists() or (ckpt / "fingerprint").read_text() != fp)
    if stale:  # another run's state (other params or base model): never resume into it
        shutil.rmtree(ckpt)
    ckpt.mkdir(parents=True, exist_ok=True)
    (ckpt / "fingerprint").write_text(fp)

    with stage_run("prune", params.model_dump()) as tracker:
        started = time.perf_counter()
        records = [r for f in params.calibration.files for r in load_records(data_dir / f)]
        to_dev = lambda bs: [{k: v.to(device) for k, v in b.items()} for b in bs]  # noqa: E731
        c = params.calibration
        batches = to_dev(calibration_batches(records, tokenizer, c.samples, c.max_len, c.batch_size, params.seed))
        heldout = to_dev(calibration_batches(load_records(data_dir / HELDOUT_FILE), tokenizer, c.samples,
                                             c.max_len, c.batch_size, params.seed + 1))
        reference, reference_heldout = dense_logits(model, batches), dense_logits(model, heldout)
        unit_scores = None
        if params.criterion == "loraprune":
            lp = params.loraprune
            imp = loraprune_importance(model, batches, lp.rank, lp.steps, lp.lr, lp.ema, params.seed)
            unit_scores = lora_unit_scores(imp, n_layers, dims["head_dim"], g, params.attention_unit, layouts)
        build = lambda keeps: build_supernet(  # noqa: E731
            model, batches, sublayers, layouts, keeps, params.criterion, unit_scores, params.refit,
            params.obs.rounds, params.obs.damp, dims["head_dim"], g, params.attention_unit)
        work = copy.deepcopy(model)

        def fitness(supernet, keeps_of):
            def f(genome, frac):
                apply_genome(work, supernet, sublayers, keeps_of(genome))
                return mean_kl(work, batches, reference, frac, params.search.topk_kl)
            return f

        # coarse-to-fine search
        centre = [centre_of[k] for k in kinds]
        step = {"attn": max(1, round(params.search.delta * layouts["attn"].per_block)),
                "mlp": max(params.mlp_round_to, round(params.search.delta * layouts["mlp"].per_block
                                                      / params.mlp_round_to) * params.mlp_round_to)}
        history, gen_offset = [], 0
        budget = sum(removed_weights(layouts[k], centre_of[k]) for k in kinds)  # the uniform prune's
        for r in range(params.search.rounds):
            grid = [level_grid(centre[s], step[k], params.search.levels, 1 if k == "attn" else params.mlp_round_to,
                               layouts[k].per_block) for s, k in enumerate(kinds)]
            supernet = load_supernet(ckpt / f"round{r}")
            if supernet is None:
                supernet = build(grid)
                with atomic_dir(ckpt / f"round{r}") as tmp:
                    save_supernet(supernet, tmp)
            log = lambda gen, best, off=gen_offset: tracker.log_step(off + gen + 1, {"search_kl": best})  # noqa: E731
            costs = [[removed_weights(layouts[k], keep) for keep in grid[s]] for s, k in enumerate(kinds)]
            best, best_kl, hist = evolve(
                [grid[s].index(centre[s]) for s in range(len(sublayers))], kinds, [len(x) for x in grid],
                fitness(supernet, lambda gen, grid=grid: [grid[s][i] for s, i in enumerate(gen)]),
                params.search.generations, params.search.population, params.search.offspring,
                params.search.stages, params.search.survive, params.search.max_moves, params.seed + r,
                checkpoint=ckpt / f"round{r}.search.json", on_generation=log,
                costs=costs if params.search.moves == "cross_type" else None, budget=budget)
            history += [(r, i + 1, kl) for i, kl in enumerate(hist)]
            gen_offset += len(hist)
            centre = [grid[s][i] for s, i in enumerate(best)]
            step = {"attn": max(1, step["attn"] // 2),
                    "mlp": max(params.mlp_round_to, step["mlp"] // 2 // params.mlp_round_to * params.mlp_round_to)}
        search_seconds = time.perf_counter() - started

        meta = {"criterion": params.criterion, "sparsity": params.sparsity, "refit": params.refit,
                "attention_unit": params.attention_unit}
        plan, replace = plan_and_weights(model, dims, arch, params.attention_unit, supernet, sublayers, centre, meta)
        removed = sum(removed_weights(layouts[k], keep) for k, keep in zip(kinds, centre))
        total = n_layers * (layouts["attn"].total_params + layouts["mlp"].total_params)
        plan.meta["achieved_sparsity"] = removed / total
        pruned = prune_model(model, plan, replace)
        with atomic_dir(out_dir) as tmp:
            save_pruned(pruned, tokenizer, plan, tmp)
            write_provenance(tmp, "prune", params.model_dump(), parent=folder_hash(base_dir))
        apply_genome(work, supernet, sublayers, centre)
        metrics = {"sparsity": {"target": params.sparsity, "achieved": removed / total},
                   "kl": {"searched": mean_kl(work, batches, reference)},
                   "kl_heldout": {"searched": mean_kl(work, heldout, reference_heldout)},
                   "search_seconds": search_seconds,
                   "searched": evaluate_suite(pruned, tokenizer, data_dir, model_dir=out_dir,
                                              batch_size=params.eval_batch_size)}
        uniform_keeps = [centre_of[k] for k in kinds]
        if params.uniform_baseline:  # same criterion, every sublayer at the target, pruned in sequence
            uniform = build([[k] for k in uniform_keeps])
            apply_genome(work, uniform, sublayers, uniform_keeps)
            metrics["kl"]["uniform"] = mean_kl(work, batches, reference)
            metrics["kl_heldout"]["uniform"] = mean_kl(work, heldout, reference_heldout)
            uplan, ureplace = plan_and_weights(model, dims, arch, params.attention_unit, uniform, sublayers,
                                               uniform_keeps, meta)
            umodel = prune_model(model, uplan, ureplace)
            metrics["uniform"] = evaluate_suite(umodel, tokenizer, data_dir, batch_size=params.eval_batch_size,
                                                speed=False)
        write_json(metrics_path, metrics)
        share = lambda keeps, kind: [1 - keeps[s] / layouts[kind].per_block  # noqa: E731
                                     for s, k in enumerate(kinds) if k == kind]
        bars = {"attn searched": share(centre, "attn"), "mlp searched": share(centre, "mlp"),
                "attn uniform": share(uniform_keeps, "attn"), "mlp uniform": share(uniform_keeps, "mlp")}
        files = [*write_bars(plots_dir / "sparsity", [f"layer {i}" for i in range(n_layers)], bars,
                             "share of weights removed", f"prune: per-layer sparsity ({params.criterion})"),
                 *write_curve(plots_dir / "fitness", list(range(1, len(history) + 1)),
                              {"kl": [kl for _, _, kl in history]}, "generation", "prune: best KL per generation")]
        for f in files:
            tracker.log_artifact(f, "plots")
        tracker.log_metrics(metrics)
        tracker.log_artifact(metrics_path)
        shutil.rmtree(ckpt)
    return metrics
