"""The package stage's fresh-process check: load every deployable the way a user would (stock
transformers and PEFT, no slimforge), then score each on the test split with the shared harness.

    python -m stages.package.check --package data/package --base data/base --data data/tasks

    python stages/package/check.py --package data/package --logits reference.safetensors  # bare venv

Prints one JSON object: {deployable: evaluate()'s result}. Every model is loaded before slimforge is
imported, and the script fails if loading pulled it in, so "loads without slimforge" is checked,
not assumed. Run by the stage in a subprocess; by hand it re-checks a package folder.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# What each deployable is, as a user would load it (the folder names are the package layout).
FULL, LORA, RL, COMPACT = "full", "adapters/lora", "adapters/rl", "compact"
QUANTIZED, CORRECTION = "quantized", "adapters/correction"  # compressed-tensors model + its low-rank correction


def slimforge_modules() -> list[str]:
    """slimforge's packages (slimforge, kernels) imported so far, by where their files lie: another
    distribution's `kernels` (Hugging Face's kernel hub, which transformers may import) is not ours."""
    repo = str(Path(__file__).resolve().parents[2])
    return sorted(name for name, module in list(sys.modules.items())
                  if name.split(".")[0] in ("slimforge", "kernels")
                  and str(getattr(module, "__file__", None) or next(iter(getattr(module, "__path__", [])), "")).startswith(repo))


def load_quantized(package: Path):
    """The compressed-tensors model (transformers dequantizes it) with its correction through PEFT."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(package / QUANTIZED, dtype="auto").eval()
    if (package / CORRECTION).is_dir():
        model = PeftModel.from_pretrained(model, package / CORRECTION).eval()
    return model


def load_all(package: Path, base: Path) -> dict:
    """{name: (model, tokenizer)} for every deployable present, loaded with stock libraries only."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def stock(folder: Path, **kw):
        return AutoModelForCausalLM.from_pretrained(folder, dtype="auto", **kw).eval()

    models = {}
    tokenizer = AutoTokenizer.from_pretrained(package / FULL)
    models[FULL] = (stock(package / FULL), tokenizer)
    if (package / LORA).is_dir():
        models[LORA] = (PeftModel.from_pretrained(stock(base), package / LORA).eval(), tokenizer)
    if (package / RL).is_dir():  # the rl adapter goes on the base with the lora adapter merged
        merged = PeftModel.from_pretrained(stock(base), package / LORA).merge_and_unload()
        models[RL] = (PeftModel.from_pretrained(merged, package / RL).eval(), tokenizer)
    if (package / COMPACT).is_dir():
        models[COMPACT] = (stock(package / COMPACT, trust_remote_code=True), tokenizer)
    if (package / QUANTIZED).is_dir():
        models[QUANTIZED] = (load_quantized(package), tokenizer)
    return models


def quantized_logits_gap(package: Path, reference: Path) -> float:
    """Largest |logit difference| between the compressed-tensors export (+ its correction), loaded
    with stock libraries, and `reference` (a safetensors file with `ids` and the `logits` slimforge's
    own loader computed for them). Runs in a bare environment: torch, transformers, peft and
    compressed-tensors only (.ci/stock_env)."""
    import torch
    from safetensors.torch import load_file

    ref = load_file(reference)
    with torch.no_grad():
        return (load_quantized(package)(input_ids=ref["ids"]).logits.float() - ref["logits"].float()).abs().max().item()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m stages.package.check", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--package", required=True, help="the package stage's output folder")
    ap.add_argument("--base", help="the model the adapters apply to (data/base)")
    ap.add_argument("--data", help="the data stage's suite folder (data/tasks)")
    ap.add_argument("--test-files", nargs="+", default=["test.jsonl", "lora_test.jsonl", "rl_test.jsonl"])
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--logits", help="instead of scoring: compare quantized/ (+ correction) with these reference "
                    "logits (safetensors: ids, logits) and fail above --tolerance")
    ap.add_argument("--tolerance", type=float, default=1e-4)
    args = ap.parse_args(argv)
    if args.logits:
        gap = quantized_logits_gap(Path(args.package), Path(args.logits))
        leaked = slimforge_modules()
        print(json.dumps({"max_abs_logit_gap": gap, "tolerance": args.tolerance, "slimforge_imported": leaked}))
        sys.exit(1 if gap > args.tolerance or leaked else 0)
    if not (args.base and args.data):
        ap.error("--base and --data are required to score the deployables")
    models = load_all(Path(args.package), Path(args.base))
    leaked = slimforge_modules()
    if leaked:
        sys.exit(f"loading the deployables imported {leaked[:3]}: they must load with stock libraries only")
    import torch

    from slimforge.evaluate import evaluate  # only now: scoring uses the shared harness
    from slimforge.tasks.records import load_records

    tests = [r for f in args.test_files for r in load_records(Path(args.data) / f, need_answer=True)]
    scores = {}
    with torch.no_grad():
        for name, (model, tokenizer) in models.items():
            result = evaluate(model, tokenizer, tests, batch_size=args.batch_size)
            scores[name] = {"accuracy": result["accuracy"], "ci95": result["ci95"]["accuracy"], "n": result["n"]}
    print(json.dumps(scores))


if __name__ == "__main__":
    main()
