"""The package stage's run(): the method is described in stages/package/__init__.py, the command line
in __main__.py (which checks the params before importing this module)."""

from __future__ import annotations

import json
import logging
import math
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from safetensors import safe_open

from slimforge import SlimforgeError, registry
from slimforge.adapters import load_adapter
from slimforge.evaluate import evaluate
from slimforge.io import content_hash, file_hash, read_json
from slimforge.modeling import count_parameters, load_model
from slimforge.ct_export import ExportUnsupported, export_compressed_tensors
from slimforge.quantized import is_quantized
from slimforge.stage import open_stage
from slimforge.tasks.records import load_records
from slimforge.tracking import workspace_root
from stages.package.card import model_card
from stages.package.check import COMPACT, CORRECTION, FULL, LORA, QUANTIZED, RL
from stages.package.params import PackageParams

log = logging.getLogger(__name__)
VAL_FILES = ("val.jsonl", "lora_val.jsonl", "rl_val.jsonl")  # the champion metric reads these, never test
TEST_FILES = ("test.jsonl", "lora_test.jsonl", "rl_test.jsonl")
PROMPT_FORMAT = ("the raw problem text, e.g. `51+2-29=`; the model continues with the answer and EOS "
                 "(no chat template)")
# vLLM's LoRA loader (vllm/lora/peft_helper.py, PEFTHelper, read on vLLM's main branch): r,
# lora_alpha and target_modules present, no modules_to_save, no DoRA, bias "none" (unless the server
# enables LoRA bias), r <= max_lora_rank, whose largest allowed value is 512; projections by name.
VLLM_MODULES = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
VLLM_MAX_RANK = 512


def adapter_problems(folder: Path, model: torch.nn.Module) -> list[str]:
    """Why `folder` is not a PEFT adapter of `model` that vLLM's loader accepts (empty: it is)."""
    config = json.loads((folder / "adapter_config.json").read_text())
    problems = []
    if not (folder / "adapter_model.safetensors").is_file():
        problems.append("no adapter_model.safetensors")
    if set(config.get("target_modules") or []) - VLLM_MODULES:
        problems.append(f"target modules {sorted(set(config['target_modules']) - VLLM_MODULES)} are not projections")
    missing = [k for k in ("r", "lora_alpha", "target_modules") if k not in config]
    if missing:
        problems.append(f"adapter_config.json lacks {missing}")
    if config.get("r", 0) > VLLM_MAX_RANK:
        problems.append(f"rank {config['r']} exceeds vLLM's largest max_lora_rank {VLLM_MAX_RANK}")
    if config.get("modules_to_save") or config.get("use_dora") or config.get("bias", "none") != "none":
        problems.append("modules_to_save, DoRA or a trained bias (vLLM serves plain LoRA)")
    modules = dict(model.named_modules())
    with safe_open(folder / "adapter_model.safetensors", "pt") as f:
        for key in f.keys():  # base_model.model.<module>.lora_A.weight: A is (r, in), B is (out, r)
            name, _, part = key.removeprefix("base_model.model.").rpartition(".lora_")
            linear, shape = modules.get(name), f.get_slice(key).get_shape()
            if linear is None:
                problems.append(f"{name}: no such module in the base")
                break
            want = linear.in_features if part.startswith("A") else linear.out_features
            if shape[1 if part.startswith("A") else 0] != want:
                problems.append(f"{name}: adapter shape {shape} does not fit the base's {tuple(linear.weight.shape)}")
                break
    return problems


def merged_model(model: torch.nn.Module, lora_adapter: Path, rl_adapter: Path) -> torch.nn.Module:
    """base + lora adapter merged, then + rl adapter merged: the full deployable (`model` is consumed)."""
    model = load_adapter(model, lora_adapter).merge_and_unload()
    return load_adapter(model, rl_adapter).merge_and_unload()


def expected_scores(reports: Path, quantized: bool) -> dict[str, dict]:
    """The pipeline's own test accuracy of what each deployable holds."""
    lora, rl, prune = (read_json(reports / f"{s}.json") for s in ("lora", "rl", "prune"))
    out = {FULL: rl["results"]["rl"]["accuracy"], RL: rl["results"]["rl"]["accuracy"],
           LORA: (lora["results"].get("recovered") or lora["results"]["lora"])["accuracy"],
           COMPACT: prune["searched"]["accuracy"]}
    if quantized:  # the quantize stage's final model (with its low-rank correction)
        quantize = read_json(reports / "quantize.json")
        out[QUANTIZED] = quantize["results"][quantize["final"]]["accuracy"]
    return out


def mismatches(expected: dict[str, dict], measured: dict[str, dict]) -> list[str]:
    """Deployable/family pairs whose pipeline accuracy lies outside the fresh-process interval."""
    out = []
    for kind, accuracy in expected.items():
        for fam, acc in accuracy.items():
            ci = measured[kind]["ci95"][fam]
            if not ci["lo"] - 1e-9 <= acc <= ci["hi"] + 1e-9:
                out.append(f"{kind} {fam}: pipeline {acc:.3f}, packaged {measured[kind]['accuracy'][fam]:.3f} "
                           f"[{ci['lo']:.3f}, {ci['hi']:.3f}]")
    return out


def fresh_process_scores(package: Path, base: Path, data: Path, batch_size: int) -> dict:
    """stages/package/check.py in a new interpreter: stock loading, then the shared harness."""
    done = subprocess.run([sys.executable, "-m", "stages.package.check", "--package", str(package), "--base",
                           str(base), "--data", str(data), "--batch-size", str(batch_size)],
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2])
    if done.returncode != 0:
        raise SlimforgeError(f"a deployable failed to load in a fresh process: {done.stderr.strip()[-600:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def size_of(folder: Path) -> dict:
    """Parameters, bytes of the folder, bits per weight of its safetensors. A compressed-tensors
    linear counts the weights of its `weight_shape`, its packed words, scales and zeros count as bytes."""
    parameters, weight_bytes = 0, 0
    for f in folder.glob("*.safetensors"):
        with safe_open(f, "pt") as st:
            for k in st.keys():
                if k.endswith((".weight_packed", ".weight_scale", ".weight_zero_point")):
                    continue
                parameters += math.prod(st.get_tensor(k).tolist()) if k.endswith(".weight_shape") else \
                    math.prod(st.get_slice(k).get_shape())
        weight_bytes += f.stat().st_size
    total = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    return {"parameters": parameters, "bytes": total, "bits_per_weight": 8 * weight_bytes / max(parameters, 1)}


def run(params: PackageParams, base: str | Path, lora: str | Path, rl: str | Path, compact: str | Path,
        data: str | Path, reports: str | Path, out: str | Path, metrics: str | Path,
        report: str | Path | None = None, quantized: str | Path | None = None) -> dict:
    base, data, compact, reports = Path(base), Path(data), Path(compact), Path(reports)
    lora_adapter, rl_adapter = Path(lora) / "adapter", Path(rl) / "adapter"
    if quantized is not None and not is_quantized(quantized):
        raise SlimforgeError(f"{quantized}: not a quantized folder (no quantization.json; run the quantize stage first)")
    for folder in (base, lora_adapter, rl_adapter, compact):
        if not (folder / "config.json").is_file() and not (folder / "adapter_config.json").is_file():
            raise SlimforgeError(f"{folder}: missing (run the stage that makes it first: dvc repro package does)")
    if is_quantized(compact):
        raise SlimforgeError(f"{compact}: a quantized folder is not a compact model; pass it as --quantized (exported "
                             "to compressed-tensors) and the pruned model as --compact")
    merge_first = read_json(rl_adapter / "merge_first.json")["merge_first"]
    if merge_first is None or Path(merge_first).resolve() != lora_adapter.resolve():
        raise SlimforgeError(f"{rl_adapter} was trained on the base with {merge_first} merged, not {lora_adapter} "
                             "(rerun the rl stage with start: lora)")
    if params.register_model:
        registry.check_compatible(params.name)
    provenance = {p["stage"]: p for p in (read_json(f / "slimforge.json") for f in (base, compact, Path(lora), Path(rl))
                                          if (f / "slimforge.json").is_file())}
    inputs = [base, lora_adapter, rl_adapter, compact, data, *([Path(quantized)] if quantized else [])]
    with open_stage("package", params.model_dump(), out=out, inputs=inputs,
                    metrics=metrics, report=report, device="cpu") as stage:
        model, tokenizer = load_model(base, device=stage.device)
        for adapter in (lora_adapter, rl_adapter):  # merging keeps every shape, so the base checks both
            problems = adapter_problems(adapter, model)
            if problems:
                raise SlimforgeError(f"{adapter}: {'; '.join(problems)}")
        model = merged_model(model, lora_adapter, rl_adapter)
        val = [r for f in VAL_FILES for r in load_records(data / f, need_answer=True)]
        families = sorted({r["family"] for r in val})
        with torch.no_grad():
            on_val = evaluate(model, tokenizer, val, batch_size=params.eval_batch_size,
                              macro={"accuracy_macro": families})
        with stage.output() as tmp:
            model.save_pretrained(tmp / FULL, max_shard_size=params.max_shard_size)
            tokenizer.save_pretrained(tmp / FULL)
            shutil.copytree(lora_adapter, tmp / LORA, ignore=shutil.ignore_patterns("merge_first.json"))
            shutil.copytree(rl_adapter, tmp / RL)
            shutil.copytree(compact, tmp / COMPACT)
            export = standard_export(params, quantized, tmp) if quantized else None
            measured = fresh_process_scores(tmp, base, data, params.eval_batch_size) if params.check else {}
            exported = bool(export) and "skipped" not in export
            wrong = mismatches(expected_scores(reports, exported), measured) if params.check else []
            if wrong:
                raise SlimforgeError("packaged models do not reproduce the pipeline's accuracy: " + "; ".join(wrong))
            sizes = {kind: size_of(tmp / kind) for kind in (FULL, LORA, RL, COMPACT, QUANTIZED, CORRECTION)
                     if (tmp / kind).is_dir()}
            for kind in sizes:
                scored = QUANTIZED if kind == CORRECTION else kind  # the correction is scored on its model
                if scored in measured:
                    (tmp / kind / "README.md").write_text(model_card(kind, params.name, measured[scored], sizes[kind],
                                                                    provenance, PROMPT_FORMAT, export))
            registered = _register(params, tmp, on_val, data) if params.register_model else None
        result = {"deployables": sorted(sizes), "sizes": sizes, "test": measured, "compressed_tensors": export, "val": {
            "accuracy": on_val["accuracy"], "accuracy_macro": on_val["accuracy_macro"],
            "ci95": on_val["ci95"]["accuracy_macro"]}, "registry": registered,
            "parameters_full": count_parameters(model)}
        return stage.finish(result, headline=["val.accuracy_macro", "val.ci95.*", "test.full.accuracy.*",
                                              "sizes.*.bytes", "registry.version", "registry.promoted"])


def standard_export(params: PackageParams, quantized: Path, tmp: Path) -> dict | None:
    """The compressed-tensors export into tmp (quantized/, adapters/correction), or {"skipped": why}."""
    if params.quantized_export == "off":
        return {"skipped": "quantized_export: off"}
    try:
        return export_compressed_tensors(quantized, tmp / QUANTIZED, tmp / CORRECTION)
    except ExportUnsupported as err:
        if params.quantized_export == "required":
            raise
        for folder in (tmp / QUANTIZED, tmp / CORRECTION):
            shutil.rmtree(folder, ignore_errors=True)
        log.warning("package: no compressed-tensors export: %s", err)
        return {"skipped": str(err)}


def suite_files(params: PackageParams) -> list[str]:
    """The data stage's files this stage reads: validation (the champion metric) and test (the checks)."""
    return sorted({*VAL_FILES, *(TEST_FILES if params.check else ())})


def _register(params: PackageParams, package: Path, on_val: dict, data: Path) -> dict:
    """The full model into the registry, the other deployables as artifacts of the same version."""
    import transformers

    workspace = workspace_root()
    lock = workspace / "dvc.lock"
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=workspace, capture_output=True, text=True).stdout.strip()
    tags = {"slimforge.git_commit": commit or "unknown", "slimforge.dvc_lock": file_hash(lock) if lock.is_file() else "none",
            "slimforge.data": content_hash(data)}
    requirements = [f"torch=={torch.__version__.split('+')[0]}", f"transformers=={transformers.__version__}"]
    return registry.register(package / FULL, params.name, metric=on_val["accuracy_macro"],
                             metric_hi=on_val["ci95"]["accuracy_macro"]["hi"], tags=tags,
                             artifacts={"adapters": package / "adapters", "compact": package / COMPACT},
                             pip_requirements=requirements)
