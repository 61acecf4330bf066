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

import hashlib
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from slimforge import SlimforgeError
from slimforge.adapters import add_lora, check_targets, load_adapter
from slimforge.batching import encode_records
from slimforge.evaluate import evaluate_suite
from slimforge.io import atomic_dir, folder_hash, write_json, write_provenance
from slimforge.modeling import load_model
from slimforge.plots import write_curve
from slimforge.pruning import PrunePlan, prune_model, save_pruned
from slimforge.quantized import save_quantized
from slimforge.tasks.families import LORA_FAMILY
from slimforge.tasks.records import load_records, resolve
from slimforge.tracking import stage_run
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


def state_bytes(model: torch.nn.Module) -> int:
    """Weights and buffers held during training plus AdamW's two moments of the trainable ones."""
    held = sum(t.numel() * t.element_size() for t in {id(t): t for t in [*model.parameters(), *model.buffers()]}.values())
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return held + 2 * trainable


def train_lora(model: torch.nn.Module, examples: list, pad_id: int, params: LoraParams, ckpt: Path,
               fingerprint: str, on_log=None) -> tuple[torch.nn.Module, dict]:
    """Wrap `model` with fresh adapters and train them. Returns (peft model, training report)."""
    peft_model = add_lora(model, params.rank, params.alpha, params.targets, params.dropout, seed=params.seed)
    t = params.train
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    history = train_causal_lm(
        peft_model, examples, pad_id=pad_id, steps=t.steps, batch_size=min(t.batch_size, len(examples)), lr=t.lr,
        warmup_steps=t.warmup_steps, min_lr_ratio=0.1, weight_decay=0.0, grad_clip=1.0, seed=params.seed,
        checkpoint_dir=ckpt, checkpoint_every=t.checkpoint_every, fingerprint=fingerprint, on_log=on_log)
    report = {"seconds": history["seconds"], "tokens_per_s": history["steady_tokens_per_s"],
              "state_bytes": state_bytes(peft_model), "resumed_from": history["resumed_from"],
              "trainable_params": sum(p.numel() for p in peft_model.parameters() if p.requires_grad),
              "peak_memory_bytes": torch.cuda.max_memory_allocated() if device.type == "cuda" else None,
              "losses": history["losses"]}
    return peft_model, report


def align(model: torch.nn.Module, params: LoraParams, data_dir: Path, tokenizer, ckpt: Path, fingerprint: str,
          teacher: torch.nn.Module, train_rows: list[dict]) -> dict:
    """LoRAM's alignment, full-parameter: continual pre-training (ce_weight) and/or distillation
    from the full model, of its outputs (kl_weight) and of its residual stream after every layer
    (hidden_weight). The adapters act inside the layers, so a pruned model that computes like
    the full one inside trains adapters that transfer: on the embedded model the recovered adapter
    reached 0.938 with hidden_weight alone, 0.906 with KL alone, 0.828 with continual pre-training,
    0.74 with no alignment (full-model LoRA: 0.968)."""
    a = params.align
    rows = [r for f in a.files for r in load_records(data_dir / f)] + (train_rows if a.with_train_rows else [])
    examples = encode_records(rows, tokenizer, max_len=params.train.max_len)
    model.requires_grad_(True)
    history = train_causal_lm(model, examples, pad_id=tokenizer.pad_token_id, steps=a.steps,
                              batch_size=min(a.batch_size, len(examples)), lr=a.lr, warmup_steps=min(10, a.steps),
                              min_lr_ratio=0.1, weight_decay=0.0, grad_clip=1.0, seed=params.seed,
                              checkpoint_dir=ckpt, checkpoint_every=params.train.checkpoint_every,
                              fingerprint=fingerprint, progress=False,
                              teacher=teacher if a.kl_weight or a.hidden_weight else None,
                              kl_weight=a.kl_weight, ce_weight=a.ce_weight, hidden_weight=a.hidden_weight)
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


def _fingerprint(params: LoraParams, *folders: Path | None) -> str:
    text = json.dumps(params.model_dump(), sort_keys=True) + "".join(folder_hash(f) for f in folders if f)
    return hashlib.sha256(text.encode()).hexdigest()


def _summary(result: dict) -> dict:
    return {"accuracy_lora": result["accuracy"].get(LORA_FAMILY), "accuracy_base": result.get("accuracy_base"),
            "ppl": result.get("ppl"), "accuracy": result["accuracy"], "params": result["params"]}


def run(params: LoraParams, base_dir: str | Path, pruned_dir: str | Path, data_dir: str | Path, out_dir: str | Path,
        metrics_path: str | Path, plots_dir: str | Path, quantized_dir: str | Path | None = None,
        filtered_dir: str | Path | None = None) -> dict:
    base_dir, pruned_dir, data_dir, out_dir = Path(base_dir), Path(pruned_dir), Path(data_dir), Path(out_dir)
    quantized_dir = Path(quantized_dir) if quantized_dir else None
    filtered_dir = Path(filtered_dir) if filtered_dir else None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # Everything that can be wrong is checked before any training.
    base, tokenizer = load_model(base_dir, device=device)
    check_targets(base, params.targets)
    plan = None
    if params.model != "base":
        plan = PrunePlan.load(pruned_dir / "plan.json")
        plan.check_matches(base.config)
    rows = training_rows(params, data_dir, filtered_dir)
    examples = [e for e in encode_records(rows, tokenizer, max_len=params.train.max_len) if len(e[0]) > e[1]]
    if not examples:
        raise SlimforgeError("no usable training rows: every row's prompt fills max_len, leaving no response tokens")
    ckpt = out_dir.parent / ".checkpoints" / out_dir.name
    sources = [base_dir, pruned_dir if params.model == "pruned" else None,
               quantized_dir if params.model == "quantized" else None]
    fingerprint = _fingerprint(params, *sources)
    evaluate = lambda m: evaluate_suite(m, tokenizer, data_dir, batch_size=params.eval_batch_size,  # noqa: E731
                                        speed=False)

    with stage_run("lora", params.model_dump()) as tracker:
        results, training = {}, {}
        if params.baselines:
            results["base"] = _summary(evaluate(base))
        small = small_model(params, base, plan, pruned_dir, quantized_dir, device)
        small.requires_grad_(False)
        if params.align.steps and params.model != "base":  # packed weights stay frozen: their factors, norms
            # and embeddings align
            training["align"] = align(small, params, data_dir, tokenizer, ckpt / "align", fingerprint, base, rows)
        log = lambda name: (lambda step, m: tracker.log_step(step, {f"{name}_{k}": v for k, v in m.items()}))  # noqa: E731
        name = "loram" if params.model != "base" else "lora"
        trained, training[name] = train_lora(small, examples, tokenizer.pad_token_id, params, ckpt / name,
                                             fingerprint, log(name))
        if params.model != "base":
            results["pruned_adapter"] = _summary(evaluate(trained))

        with atomic_dir(out_dir) as tmp:
            if params.model == "base":
                trained.save_pretrained(tmp / "adapter")
                _set_base_ref(tmp / "adapter", str(base_dir))
            else:
                trained.save_pretrained(tmp / "pruned_adapter")
                _set_base_ref(tmp / "pruned_adapter", str(out_dir / "pruned_model"))
                write_recovered(tmp / "pruned_adapter", plan, str(base_dir), params, tmp / "adapter")
                # The small model the pruned adapter belongs to (cut, aligned: saved nowhere else).
                small = trained.unload()  # the adapters' layers removed, the frozen modules back
                if params.model == "quantized":
                    save_quantized(small, tokenizer, quantized_dir, tmp / "pruned_model")
                else:
                    save_pruned(small, tokenizer, plan, tmp / "pruned_model")
            write_provenance(tmp, "lora", params.model_dump(), parent=folder_hash(base_dir))
        del trained, small
        fresh, _ = load_model(base_dir, device=device)  # the product: untouched base + the saved adapter
        results["recovered" if params.model != "base" else "lora"] = _summary(evaluate(load_adapter(fresh, out_dir / "adapter")))

        if params.baselines and params.model != "base":  # `base` is still untouched (only read as teacher)
            base.requires_grad_(False)
            trained, training["full_lora"] = train_lora(base, examples, tokenizer.pad_token_id, params,
                                                        ckpt / "full_lora", fingerprint, log("full_lora"))
            results["full_lora"] = _summary(evaluate(trained))
            del trained

        metrics = {"model": params.model, "prune_weights": params.prune_weights if params.model == "pruned" else None,
                   "train_rows": len(examples), "results": results,
                   "training": {k: {m: v for m, v in r.items() if m != "losses"} for k, r in training.items()}}
        metrics.update(_ratios(results, training))
        write_json(metrics_path, metrics)
        curves = {k: r["losses"] for k, r in training.items() if "losses" in r}
        steps = list(range(1, params.train.steps + 1))
        for f in write_curve(Path(plots_dir) / "loss", steps, curves, "step", "lora: training loss", smooth=10):
            tracker.log_artifact(f, "plots")
        tracker.log_metrics(metrics)
        tracker.log_artifact(metrics_path)
        shutil.rmtree(ckpt, ignore_errors=True)
    return metrics


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
