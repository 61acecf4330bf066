"""Score a model folder on a suite file with stock transformers only, as a user would: tokenizer(prompt)
+ greedy generate, first line of the output against the answer. No slimforge import, so it runs in
a plain environment (transformers + torch) and shows whether a folder works outside the pipeline.

    python experiments/stock_score.py data/base data/tasks/test.jsonl
"""

import json
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def main(folder: str, test_file: str, max_new_tokens: int = 8) -> dict:
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
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
    print(json.dumps(main(sys.argv[1], sys.argv[2])))
