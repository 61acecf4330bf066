"""lora stage: LoRAM ("Train Small, Infer Large") — train LoRA on the pruned (or quantized pruned)
model, recover the adapters to the full model's shape, infer with the full model.

    python -m stages.lora --params params/lora.yaml --base data/base --pruned data/pruned \
        --quantized data/quantized --filtered data/filtered --data data/tasks --out data/lora \
        --metrics metrics/lora.json --plots plots/lora

1. The small model: the base cut to plan.json (prune_weights: selection), the prune stage's refit
   weights (refit), the quantize stage's packed model (model: quantized, QLoRAM: the frozen
   weights stay packed and run on the low-bit kernels), or the base itself (model: base).
2. Alignment: a short full-parameter training of the small model towards the full one (by
   default matching its residual stream after every layer), so the adapters learn on a model that
   computes like the one they will serve. A quantized model's packed weights stay frozen; its
   low-rank correction factors, norms and embeddings align.
3. PEFT LoRA on it (checkpointed, resumable).
4. Recovery (recover.py): every adapter matrix expanded along the pruned dimension with the plan,
   saved as a standard PEFT adapter of the base model (`data/lora/adapter`, the product) beside the
   pruned model's own adapter (`data/lora/pruned_adapter`) and that (aligned) pruned model
   (`data/lora/pruned_model`).
5. Metrics for (a) pruned model + its adapter, (b) base + recovered adapter, loaded back with
   PeftModel.from_pretrained, (c) the untouched base, (d) LoRA trained on the full base with the same
   data, steps and seed; training memory and tokens/s of both trainings; loss curves.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from slimforge import SlimforgeError
from slimforge.adapters import check_targets, load_adapter, train_lora
from slimforge.batching import encode_records
from slimforge.evaluate import evaluate_suite
from slimforge.io import folder_hash, write_provenance
from slimforge.losses import causal_lm_loss, distillation_loss
from slimforge.modeling import load_model
from slimforge.plots import write_curve
from slimforge.pruning import PrunePlan, prune_model, save_pruned
from slimforge.quantized import save_quantized
from slimforge.stage import open_stage
from slimforge.tasks.families import LORA_FAMILY
from slimforge.tasks.records import load_records, resolve
from slimforge.training import train_causal_lm
from stages.lora.params import LoraParams
from stages.lora.recover import recover_state

ADAPTER_FILE = "adapter_model.safetensors"


def training_rows(params: LoraParams, data_dir: Path, filtered_dir: Path | None) -> list[dict]:
    if params.data == "filtered":
        if filtered_dir is None:
            raise SlimforgeError("data: filtered needs the filter stage's folder (--filtered data/filtered)")
        return load_records(filtered_dir / "filtered.jsonl")
    return load_records(resolve(data_dir, params.train_file))


def small_model(params: LoraParams, base: torch.nn.Module, plan: PrunePlan | None, pruned_dir: Path,
                quantized_dir: Path | None, device: str) -> torch.nn.Module:
    """The model the adapters train on."""
    if params.model == "base":
        return base
    if params.model == "quantized":
        if quantized_dir is None:
            raise SlimforgeError("model: quantized needs the quantize stage's folder (--quantized data/quantized)")
        model, _ = load_model(quantized_dir, device=device)
        return model
    if params.prune_weights == "refit":
        model, _ = load_model(pruned_dir, device=device)
        return model
    return prune_model(base, plan)  # selection only: the base's own weights at the kept positions


def align(model: torch.nn.Module, params: LoraParams, data_dir: Path, tokenizer, ckpt: Path, fingerprint: str,
          teacher: torch.nn.Module, train_rows: list[dict]) -> dict:
    """LoRAM's alignment, full-parameter: continual pre-training (ce_weight) and/or distillation
    from the full model, of its outputs (kl_weight) and of its residual stream after every layer
    (hidden_weight). The adapters act inside the layers, so a pruned model that computes like the
    full one inside trains adapters that transfer (README, lora stage, has the measurements)."""
    a = params.align
    rows = [r for f in a.files for r in load_records(data_dir / f)] + (train_rows if a.with_train_rows else [])
    examples = encode_records(rows, tokenizer, max_len=params.train.max_len)
    loss_fn = (distillation_loss(teacher, ce_weight=a.ce_weight, kl_weight=a.kl_weight, hidden_weight=a.hidden_weight)
               if a.kl_weight or a.hidden_weight else causal_lm_loss)
    model.requires_grad_(True)
    history = train_causal_lm(model, examples, a, loss_fn=loss_fn, pad_id=tokenizer.pad_token_id, seed=params.seed,
                              checkpoint_dir=ckpt, fingerprint=fingerprint, progress=False)
    model.requires_grad_(False)
    return {"steps": a.steps, "seconds": history["seconds"], "final_loss": history["losses"][-1]}


def write_recovered(pruned_adapter: Path, plan: PrunePlan, base_ref: str, params: LoraParams, out: Path) -> None:
    """The pruned model's saved adapter, expanded to the base model's shape, as a PEFT folder."""
    out.mkdir(parents=True)
    state = recover_state(load_file(pruned_adapter / ADAPTER_FILE), plan, params.recovery.init,
                          params.recovery.std, params.seed)
    save_file({k: v.contiguous() for k, v in state.items()}, out / ADAPTER_FILE, metadata={"format": "pt"})
    shutil.copyfile(pruned_adapter / "adapter_config.json", out / "adapter_config.json")
    _set_base_ref(out, base_ref)


def _set_base_ref(adapter: Path, base_ref: str) -> None:
    """Point adapter_config.json at the model the adapter belongs to. Also sorts target_modules:
    PEFT writes them from a set, in an order that changes with Python's hash seed, and the folder
    must hash the same on every run for dvc.lock."""
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = base_ref
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
    (adapter / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def write_adapters(tmp: Path, trained, params: LoraParams, plan: PrunePlan | None, tokenizer, base_dir: Path,
                   out: Path, quantized_dir: Path | None) -> None:
    """adapter/ (for the base: the product), and for a pruned run also pruned_adapter/ and the
    (aligned) small model it belongs to, pruned_model/, which is saved nowhere else."""
    if params.model == "base":
        trained.save_pretrained(tmp / "adapter")
        _set_base_ref(tmp / "adapter", str(base_dir))
    else:
        trained.save_pretrained(tmp / "pruned_adapter")
        _set_base_ref(tmp / "pruned_adapter", str(out / "pruned_model"))
        write_recovered(tmp / "pruned_adapter", plan, str(base_dir), params, tmp / "adapter")
        small = trained.unload()  # the adapters' layers removed, the frozen modules back
        if params.model == "quantized":
            save_quantized(small, tokenizer, quantized_dir, tmp / "pruned_model")
        else:
            save_pruned(small, tokenizer, plan, tmp / "pruned_model")
    write_provenance(tmp, "lora", params.model_dump(), parent=folder_hash(base_dir))


def _summary(result: dict) -> dict:
    return {"accuracy_lora": result["accuracy"].get(LORA_FAMILY), "accuracy_base": result.get("accuracy_base"),
            "ppl": result.get("ppl"), "accuracy": result["accuracy"], "params": result["params"]}


def run(params: LoraParams, base: str | Path, pruned: str | Path, data: str | Path, out: str | Path,
        metrics: str | Path, plots: str | Path, quantized: str | Path | None = None,
        filtered: str | Path | None = None) -> dict:
    base_dir, pruned_dir, data, out = Path(base), Path(pruned), Path(data), Path(out)
    quantized_dir, filtered_dir = (Path(quantized) if quantized else None), (Path(filtered) if filtered else None)
    inputs = [base_dir, data, *([pruned_dir] if params.model != "base" else []),
              *([quantized_dir] if params.model == "quantized" and quantized_dir else []),
              *([filtered_dir] if params.data == "filtered" and filtered_dir else [])]
    with open_stage("lora", params.model_dump(), out=out, inputs=inputs, metrics=metrics) as stage:
        base_model, tokenizer = load_model(base_dir, device=stage.device)
        check_targets(base_model, params.targets)  # everything that can be wrong is checked before training
        plan = None if params.model == "base" else PrunePlan.load(pruned_dir / "plan.json")
        if plan is not None:
            plan.check_matches(base_model.config)
        rows = training_rows(params, data, filtered_dir)
        examples = [e for e in encode_records(rows, tokenizer, max_len=params.train.max_len) if len(e[0]) > e[1]]
        if not examples:
            raise SlimforgeError("no usable training rows: every row's prompt fills max_len, leaving no response tokens")
        evaluate = lambda m: _summary(evaluate_suite(m, tokenizer, data, batch_size=params.eval_batch_size,  # noqa: E731
                                                     speed=False))
        lora = lambda model, name: train_lora(  # noqa: E731
            model, examples, params.train, rank=params.rank, alpha=params.alpha, targets=params.targets,
            dropout=params.dropout, seed=params.seed, pad_id=tokenizer.pad_token_id,
            checkpoint_dir=stage.checkpoints / name, fingerprint=stage.fingerprint, on_log=stage.logger(f"{name}_"))
        results, training = ({"base": evaluate(base_model)} if params.baselines else {}), {}
        small = small_model(params, base_model, plan, pruned_dir, quantized_dir, stage.device)
        small.requires_grad_(False)
        if params.align.steps and params.model != "base":  # packed weights stay frozen: their factors, norms
            # and embeddings align
            training["align"] = align(small, params, data, tokenizer, stage.checkpoints / "align", stage.fingerprint,
                                      base_model, rows)
        name = "loram" if params.model != "base" else "lora"
        trained, training[name] = lora(small, name)
        if params.model != "base":
            results["pruned_adapter"] = evaluate(trained)
        with stage.output() as tmp:
            write_adapters(tmp, trained, params, plan, tokenizer, base_dir, out, quantized_dir)
        del trained, small
        fresh, _ = load_model(base_dir, device=stage.device)  # the product: untouched base + the saved adapter
        results["recovered" if params.model != "base" else "lora"] = evaluate(load_adapter(fresh, out / "adapter"))
        if params.baselines and params.model != "base":  # the base model is still untouched (only read as teacher)
            base_model.requires_grad_(False)
            trained, training["full_lora"] = lora(base_model, "full_lora")
            results["full_lora"] = evaluate(trained)
            del trained
        report = {"model": params.model, "prune_weights": params.prune_weights if params.model == "pruned" else None,
                  "train_rows": len(examples), "results": results,
                  "training": {k: {m: v for m, v in r.items() if m != "losses"} for k, r in training.items()},
                  **_ratios(results, training)}
        curves = {k: r["losses"] for k, r in training.items() if "losses" in r}
        files = write_curve(Path(plots) / "loss", list(range(1, params.train.steps + 1)), curves, "step",
                            "lora: training loss", smooth=10)
        return stage.finish(report, plots=files)


def _ratios(results: dict, training: dict) -> dict:
    """The headline comparisons: recovered vs full-model LoRA accuracy, memory and speed."""
    out = {}
    full, rec = results.get("full_lora"), results.get("recovered")
    if full and rec and full["accuracy_lora"]:
        out["recovered_vs_full_lora"] = rec["accuracy_lora"] / full["accuracy_lora"]
    small, big = training.get("loram"), training.get("full_lora")
    if small and big:
        out["state_bytes_ratio"] = small["state_bytes"] / big["state_bytes"]
        out["tokens_per_s_ratio"] = small["tokens_per_s"] / big["tokens_per_s"]
        if small["peak_memory_bytes"] and big["peak_memory_bytes"]:
            out["peak_memory_ratio"] = small["peak_memory_bytes"] / big["peak_memory_bytes"]
    return out
