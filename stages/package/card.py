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
}
WHAT = {
    "full": "the base model with the lora stage's recovered adapter and the rl stage's adapter merged in: "
            "a plain Hugging Face model",
    "adapters/lora": "the lora stage's LoRAM adapter, trained on the pruned model and recovered to the base's shape",
    "adapters/rl": "the rl stage's adapter (GRPO-family RL with verifiable rewards), for the base with the lora "
                   "adapter merged first",
    "compact": "the prune stage's model: heads and MLP channels removed per layer (non-uniform widths)",
}


def _family_table(scores: dict) -> str:
    rows = ["| family | accuracy | 95% interval | n |", "|---|---|---|---|"]
    for fam, acc in sorted(scores["accuracy"].items()):
        ci = scores["ci95"][fam]
        rows.append(f"| {fam} | {acc:.3f} | [{ci['lo']:.3f}, {ci['hi']:.3f}] | {scores['n'][fam]} |")
    return "\n".join(rows)


def model_card(kind: str, name: str, scores: dict, size: dict, provenance: dict[str, dict], prompt_format: str) -> str:
    """The README.md of deployable `kind` (a key of WHAT)."""
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

## How it was made (each stage's params, from the slimforge.json records)

{stages}

## Intended use and limitations

A demonstration of the compression pipeline on its embedded arithmetic task suite: families `add`,
`sub`, `mul` (the base), `add3` (taught by the lora stage), `chain` (taught by the rl stage). It is
not a general-purpose language model; outside these task formats its output is meaningless.
"""
