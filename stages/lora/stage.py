"""The lora stage's run(): the method is described in stages/lora/__init__.py, the command line in
__main__.py (which checks the params before importing this module, so a typo fails in about a second)."""

from __future__ import annotations

import gc
import json
import random
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from slimforge import SlimforgeError
from slimforge.adapters import check_targets, load_adapter, state_bytes, train_lora
from slimforge.batching import encode_records
from slimforge.evaluate import evaluate, evaluate_suite
from slimforge.evaluate.harness import eval_files
from slimforge.io import write_provenance
from slimforge.losses import causal_lm_loss, distillation_loss
from slimforge.modeling import load_model
from slimforge.plots import write_curve
from slimforge.pruning import PrunePlan, prune_model, save_pruned
from slimforge.quantized import save_quantized
from slimforge.stage import open_stage
from slimforge.tasks.records import load_records
from slimforge.training import train_causal_lm
from stages.lora.params import LoraParams
from stages.lora.recover import recover_state
from stages.lora.scores import (BASE_VAL, LORA_VAL, TEST_FILES, headline_families, ratios, summarize,
                                val_records)

ADAPTER_FILE = "adapter_model.safetensors"


def model_kind(folder: Path, base_dir: Path) -> str:
    """What `model` names: quantized (quantization.json), pruned (plan.json) or the base itself."""
    if not folder.is_dir():
        raise SlimforgeError(f"model: {folder} is not a folder (the prune stage writes data/pruned, the quantize "
                             "stage data/quantized)")
    if (folder / "quantization.json").is_file():
        return "quantized"
    if (folder / "plan.json").is_file():
        return "pruned"
    if folder.resolve() == base_dir.resolve():
        return "base"
    raise SlimforgeError(f"model: {folder} is neither the base folder ({base_dir}), a pruned folder (plan.json) "
                         "nor a quantized one (quantization.json)")



def small_model(kind: str, folder: Path, params: LoraParams, base: torch.nn.Module, plan: PrunePlan | None,
                device: str) -> torch.nn.Module:
    """The model the adapters train on."""
    if kind == "base":
        return base
    if kind == "quantized" or params.prune_weights == "refit":
        return load_model(folder, device=device)[0]
    return prune_model(base, plan)  # selection only: the base's own weights at the kept positions


def uses_teacher(params: LoraParams) -> bool:
    """Whether alignment distils from the base model (kl_weight or hidden_weight); CE alone does not."""
    return bool(params.align.kl_weight or params.align.hidden_weight)


def align(model: torch.nn.Module, params: LoraParams, data_dir: Path, tokenizer, ckpt: Path, fingerprint: str,
          teacher: torch.nn.Module | None, train_rows: list[dict]) -> dict:
    """LoRAM's alignment, full-parameter: continual pre-training (ce_weight) and/or distillation
    from the full model, of its outputs (kl_weight) and of its residual stream after every layer
    (hidden_weight). The adapters act inside the layers, so a pruned model that computes like the
    full one inside trains adapters that transfer (README, lora stage, has the measurements).
    `teacher` is needed only with kl_weight or hidden_weight (`uses_teacher`). Returns alignment's
    cost beside LoRA's: seconds, steady tokens/s, state_bytes (the small model's weights and AdamW
    moments of what trains, plus the teacher's weights) and the CUDA peak of this window (teacher
    included: alignment needs it resident)."""
    a = params.align
    if uses_teacher(params) and teacher is None:
        raise SlimforgeError("align: kl_weight/hidden_weight distil from the base model, but no teacher was given")
    rows = [r for f in a.files for r in load_records(data_dir / f)] + (train_rows if a.with_train_rows else [])
    examples = encode_records(rows, tokenizer, max_len=params.train.max_len)
    loss_fn = (distillation_loss(teacher, ce_weight=a.ce_weight, kl_weight=a.kl_weight, hidden_weight=a.hidden_weight)
               if uses_teacher(params) else causal_lm_loss)
    model.requires_grad_(True)
    cuda = next(model.parameters()).device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    history = train_causal_lm(model, examples, a, loss_fn=loss_fn, pad_id=tokenizer.pad_token_id, seed=params.seed,
                              checkpoint_dir=ckpt, fingerprint=fingerprint, desc="align")
    held = state_bytes(model) + (_weight_bytes(teacher) if uses_teacher(params) else 0)
    model.requires_grad_(False)
    return {"steps": a.steps, "seconds": history["seconds"], "tokens_per_s": history["steady_tokens_per_s"],
            "state_bytes": held, "peak_memory_bytes": torch.cuda.max_memory_allocated() if cuda else None,
            "final_loss": history["losses"][-1]}


def _weight_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in {id(t): t for t in [*model.parameters(), *model.buffers()]}.values())


def release_memory() -> None:
    """Collect what the caller dropped and hand cached CUDA blocks back, so the next training's
    peak-memory window starts with only what it holds."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


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


def write_adapters(tmp: Path, trained, kind: str, params: LoraParams, plan: PrunePlan | None, tokenizer,
                   base_dir: Path, out: Path, folder: Path) -> None:
    """adapter/ (for the base: the product), and for a pruned run also pruned_adapter/ and the
    (aligned) small model it belongs to, pruned_model/, which is saved nowhere else."""
    if kind == "base":
        trained.save_pretrained(tmp / "adapter")
        _set_base_ref(tmp / "adapter", str(base_dir))
    else:
        trained.save_pretrained(tmp / "pruned_adapter")
        _set_base_ref(tmp / "pruned_adapter", str(out / "pruned_model"))
        write_recovered(tmp / "pruned_adapter", plan, str(base_dir), params, tmp / "adapter")
        small = trained.unload()  # the adapters' layers removed, the frozen modules back
        if kind == "quantized":
            save_quantized(small, tokenizer, folder, tmp / "pruned_model")
        else:
            save_pruned(small, tokenizer, plan, tmp / "pruned_model")
    write_provenance(tmp, "lora", params.model_dump(), parent=base_dir)


# What `dvc metrics show` compares; per-family accuracy, memory and timings go to the report.
HEADLINE = ["results.*.accuracy_lora", "results.*.ci95.accuracy_lora.*", "results.*.accuracy_lora_val",
            "recovered_vs_full_lora", "state_bytes_ratio"]


def run(params: LoraParams, base: str | Path, data: str | Path, out: str | Path, metrics: str | Path,
        plots: str | Path, report: str | Path | None = None) -> dict:
    base_dir, data, out, folder, rows_path = Path(base), Path(data), Path(out), Path(params.model), Path(params.train_rows)
    kind = model_kind(folder, base_dir)
    with open_stage("lora", params.model_dump(), out=out, inputs=[base_dir, folder, rows_path, data],
                    metrics=metrics, report=report) as stage:
        base_model, tokenizer = load_model(base_dir, device=stage.device)
        check_targets(base_model, params.targets)  # everything that can be wrong is checked before training
        plan = None
        if kind != "base":  # a quantized base has no plan: its adapters already fit the base
            plan = (PrunePlan.load(folder / "plan.json") if (folder / "plan.json").is_file()
                    else PrunePlan.identity(base_model.config))
            plan.check_matches(base_model.config)
        rows = load_records(rows_path)
        families = headline_families(rows, data)
        usable = lambda records: [e for e in encode_records(records, tokenizer, max_len=params.train.max_len)  # noqa: E731
                                  if len(e[0]) > e[1]]
        examples = usable(rows)
        if not examples:
            raise SlimforgeError("no usable training rows: every row's prompt fills max_len, leaving no response tokens")
        replay = replay_rows(data, params, len(rows))
        examples += usable(replay)
        val = val_records(data, families)

        def score(model) -> dict:  # test files (reported) and lora_val (what ablations select on)
            with torch.no_grad():
                on_val = evaluate(model, tokenizer, val, batch_size=params.eval_batch_size) if val else None
            return summarize(evaluate_suite(model, tokenizer, data, batch_size=params.eval_batch_size,
                                           test_files=TEST_FILES, macro={"accuracy_lora": families}), families, on_val)

        lora = lambda model, name: train_lora(  # noqa: E731
            model, examples, params.train, rank=params.rank, alpha=params.alpha, targets=params.targets,
            dropout=params.dropout, seed=params.seed, pad_id=tokenizer.pad_token_id,
            checkpoint_dir=stage.checkpoints / name, fingerprint=stage.fingerprint, on_log=stage.logger(f"{name}_"),
            desc=name)
        results, training = ({"base": score(base_model)} if params.baselines else {}), {}
        small = small_model(kind, folder, params, base_model, plan, stage.device)
        small.requires_grad_(False)
        # From here each training holds only what it trains (and alignment its teacher): the base is
        # dropped before LoRA on the small model and loaded again, untouched, for what needs it later,
        # so each CUDA peak is that training's own.
        teacher = base_model if kind != "base" and params.align.steps and uses_teacher(params) else None
        base_model = None
        release_memory()
        if params.align.steps and kind != "base":  # packed weights stay frozen: their factors, norms and
            # embeddings align
            training["align"] = align(small, params, data, tokenizer, stage.checkpoints / "align", stage.fingerprint,
                                      teacher, rows)
        teacher = None
        release_memory()
        name = "loram" if kind != "base" else "lora"
        trained, training[name] = lora(small, name)
        if kind != "base":
            results["pruned_adapter"] = score(trained)
        with stage.output() as tmp:
            write_adapters(tmp, trained, kind, params, plan, tokenizer, base_dir, out, folder)
        trained = small = None
        release_memory()
        fresh, _ = load_model(base_dir, device=stage.device)  # the product: untouched base + the saved adapter
        results["recovered" if kind != "base" else "lora"] = score(load_adapter(fresh, out / "adapter"))
        fresh = None
        release_memory()
        if params.baselines and kind != "base":  # LoRA on the untouched base, read again from its folder
            base_model, _ = load_model(base_dir, device=stage.device)
            base_model.requires_grad_(False)
            trained, training["full_lora"] = lora(base_model, "full_lora")
            results["full_lora"] = score(trained)
            trained = base_model = None
        measured = {"model": kind, "prune_weights": params.prune_weights if kind == "pruned" else None,
                  "families": families, "train_rows": len(examples), "replay_rows": len(replay), "results": results,
                  "training": {k: {m: v for m, v in r.items() if m != "losses"} for k, r in training.items()},
                  **ratios(results, training)}
        curves = {k: r["losses"] for k, r in training.items() if "losses" in r}
        files = write_curve(Path(plots) / "loss", list(range(1, params.train.steps + 1)), curves, "step",
                            "lora: training loss", smooth=10, long=("run", "loss"))
        return stage.finish(measured, plots=files, headline=HEADLINE)


def replay_rows(data: Path, params: LoraParams, n_rows: int) -> list[dict]:
    """`replay.ratio` x n_rows rows drawn (seeded) from the replay files, pooled."""
    n = round(params.replay.ratio * n_rows)
    if not n:
        return []
    pool = [r for f in params.replay.files for r in load_records(data / f)]
    return random.Random(f"{params.seed}:replay").sample(pool, min(n, len(pool)))


def suite_files(params: LoraParams) -> list[str]:
    """The data stage's files this stage reads besides `train_rows`: alignment and replay text, evaluation."""
    return sorted({*params.align.files, *(params.replay.files if params.replay.ratio else []), *eval_files(TEST_FILES),
                   LORA_VAL, BASE_VAL})
