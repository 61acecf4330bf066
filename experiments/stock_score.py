"""Score a model folder on a suite file with stock transformers (and PEFT for an adapter) only, as a
user would: tokenizer(prompt) + greedy generate, first line of the output against the answer. No
slimforge import, so it runs in a plain environment (torch + transformers + peft) and shows whether
a folder works outside the pipeline.

    python experiments/stock_score.py data/base data/tasks/test.jsonl
    python experiments/stock_score.py data/base data/tasks/lora_test.jsonl --adapter data/lora/adapter
    python experiments/stock_score.py data/pruned data/tasks/test.jsonl --trust-remote-code
"""

import argparse
import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def main(folder: str, test_file: str, adapter: str | None = None, trust_remote_code: bool = False,
         max_new_tokens: int = 8) -> dict:
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=trust_remote_code).eval()
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).eval()
    hits: dict[str, list[bool]] = {}
    with torch.no_grad():
        for line in open(test_file, encoding="utf-8"):
            row = json.loads(line)
            ids = tokenizer(row["prompt"], return_tensors="pt")
            out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
            text = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
            hits.setdefault(row["family"], []).append(text.split("\n")[0].strip() == row["answer"].strip())
    accuracy = {f: sum(h) / len(h) for f, h in sorted(hits.items())}
    return {"n": {f: len(h) for f, h in sorted(hits.items())}, "accuracy": accuracy,
            "macro": sum(accuracy.values()) / len(accuracy)}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", help="a Hugging Face model folder")
    ap.add_argument("test_file", help="a suite JSONL file with answers")
    ap.add_argument("--adapter", help="a PEFT adapter folder to load on the model")
    ap.add_argument("--trust-remote-code", action="store_true", help="for a pruned folder (its own modeling file)")
    args = ap.parse_args()
    print(json.dumps(main(args.folder, args.test_file, args.adapter, args.trust_remote_code)))
