"""Model cards: the README.md in each deployable folder. Built only from what the pipeline wrote
(each input folder's slimforge.json provenance and the fresh-process test scores), with no
timestamps or commit ids, so the same inputs give the same bytes (dvc.lock stays stable); the
registry version carries the commit."""

from __future__ import annotations

import json

HOW_TO_LOAD = {
    "full": "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
            "model = AutoModelForCausalLM.from_pretrained(FOLDER)\ntokenizer = AutoTokenizer.from_pretrained(FOLDER)",
    "adapters/lora": "from peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n"
                     "model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), FOLDER)",
    "adapters/rl": "from peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n"
                   "base = AutoModelForCausalLM.from_pretrained(BASE)\n"
                   "base = PeftModel.from_pretrained(base, LORA_FOLDER).merge_and_unload()  # lora first\n"
                   "model = PeftModel.from_pretrained(base, FOLDER)",
    "compact": "from transformers import AutoModelForCausalLM\n"
               "model = AutoModelForCausalLM.from_pretrained(FOLDER, trust_remote_code=True)  # its modeling_pruned.py",
    "adapters/correction": "# the low-rank error correction of ../../quantized: load it there (see its README)\n"
                           "model = PeftModel.from_pretrained(quantized_model, FOLDER)",
    "quantized": "# pip install 'transformers>=5.17' 'compressed-tensors>=0.19' peft\n"
                 "from peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n"
                 "model = AutoModelForCausalLM.from_pretrained(FOLDER)  # dequantized at load on CPU\n"
                 "model = PeftModel.from_pretrained(model, CORRECTION_FOLDER)  # ../adapters/correction\n"
                 "# vLLM: LLM(FOLDER, enable_lora=True) + LoRARequest('correction', 1, CORRECTION_FOLDER)",
}
WHAT = {
    "full": "the base model with the lora stage's recovered adapter and the rl stage's adapter merged in: "
            "a plain Hugging Face model",
    "adapters/lora": "the lora stage's LoRAM adapter, trained on the pruned model and recovered to the base's shape",
    "adapters/rl": "the rl stage's adapter (GRPO-family RL with verifiable rewards), for the base with the lora "
                   "adapter merged first",
    "compact": "the prune stage's model: heads and MLP channels removed per layer (non-uniform widths)",
    "adapters/correction": "the quantize stage's low-rank error correction (INT2.1/LQ-LoRA factors) as a PEFT "
                           "LoRA adapter (scale 1) for ../../quantized; the scores below are that model with it",
    "quantized": "the quantize stage's model in the compressed-tensors pack-quantized format (stock architecture; a "
                 "pruned model's layers zero-padded to the widest layer, which leaves its outputs unchanged), its "
                 "low-rank error correction in ../adapters/correction as a PEFT LoRA adapter",
}


def _family_table(scores: dict) -> str:
    rows = ["| family | accuracy | 95% interval | n |", "|---|---|---|---|"]
    for fam, acc in sorted(scores["accuracy"].items()):
        ci = scores["ci95"][fam]
        rows.append(f"| {fam} | {acc:.3f} | [{ci['lo']:.3f}, {ci['hi']:.3f}] | {scores['n'][fam]} |")
    return "\n".join(rows)


def _export_note(export: dict) -> str:
    w = export["target_widths"]
    return (f"\nFormats: {', '.join(export['formats'])} (asymmetric, integer zero points); low-rank correction "
            f"rank {export['correction_rank']}; stock widths {w['heads']} query heads, {w['kv']} key/value heads, MLP "
            f"{w['inter']}{' (zero-padded from the pruned widths)' if export['padded'] else ''}. vLLM's compressed-"
            "tensors kernels serve 4- and 8-bit weights; 2- and 3-bit exports load in transformers (dequantized).\n")


def model_card(kind: str, name: str, scores: dict, size: dict, provenance: dict[str, dict], prompt_format: str,
               export: dict | None = None) -> str:
    """The README.md of deployable `kind` (a key of WHAT); `export` is export_compressed_tensors's result."""
    stages = "\n\n".join(f"**{stage}**\n\n```json\n{json.dumps(p.get('params', {}), indent=1, sort_keys=True)}\n```"
                         for stage, p in provenance.items())
    return f"""# {name} — {kind}

{WHAT[kind][0].upper() + WHAT[kind][1:]}. Made by slimforge's pipeline (`dvc repro package`; the
registry version of `{name}` carries the git commit and the dvc.lock hash to check out for a rerun).

## Load

```python
{HOW_TO_LOAD[kind]}
```

Prompt format: {prompt_format}

## Test accuracy (this folder, loaded in a fresh process with stock libraries)

Exact match, greedy decoding, 95% bootstrap intervals:

{_family_table(scores)}

## Size

{size['parameters']:,} parameters, {size['bytes']:,} bytes on disk, {size['bits_per_weight']:.1f} bits per weight.
{_export_note(export) if kind in ("quantized", "adapters/correction") and export else ""}
## How it was made (each stage's params, from the slimforge.json records)

{stages}

## Intended use and limitations

A demonstration of the compression pipeline on its embedded arithmetic task suite: families `add`,
`sub`, `mul` (the base), `add3` (taught by the lora stage), `chain` (taught by the rl stage). It is
not a general-purpose language model; outside these task formats its output is meaningless.
"""
