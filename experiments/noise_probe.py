"""Issue 18 probe: how much does each error mode of the noisy set hurt a LoRA trained on it? For each
mix, the filter stage's downstream recipe (stages/filter/downstream.py) is trained on every row
(keep-all) and on the truly correct rows (oracle), and scored on lora_val.jsonl (validation: the
default mix is chosen here, the test split is scored once by the filter stage).

    python -m experiments.noise_probe --base data/base --data data/tasks --out probe.json
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
from pathlib import Path

from slimforge.tasks.records import load_records
from slimforge.tasks.suite import noisy_records
from stages.filter.downstream import lora_accuracy
from stages.filter.params import FilterParams

MIXES = {"random": None, "no_carry": {"no_carry": 1.0}, "wrong_op": {"wrong_op": 1.0},
         "no_carry+wrong_op": {"no_carry": 0.5, "wrong_op": 0.5}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--mixes", nargs="+", default=list(MIXES))
    ap.add_argument("--wrong-fraction", type=float, default=0.3)
    args = ap.parse_args()
    ds = FilterParams().downstream
    val = load_records(Path(args.data) / "lora_val.jsonl", need_answer=True)
    results = {}
    for name in args.mixes:
        rows, labels = noisy_records(("add3",), 3000, args.wrong_fraction, 0.5, random.Random("0:noisy"), MIXES[name])
        correct = [r for r, lab in zip(rows, labels) if lab["correct"]]
        out = {}
        for method, kept in (("keep_all", rows), ("oracle", correct)):
            with tempfile.TemporaryDirectory() as tmp:
                acc, ci = lora_accuracy(Path(args.base), kept, val, ds, 0, Path(tmp), "probe", "cpu")
            out[method] = {"accuracy": acc, "ci95": ci, "rows": len(kept)}
        out["gap"] = out["oracle"]["accuracy"] - out["keep_all"]["accuracy"]
        results[name] = out
        print(name, json.dumps(out), flush=True)
    Path(args.out).write_text(json.dumps({"command": "python -m experiments.noise_probe", "split": "lora_val.jsonl",
                                          "n": len(val), "results": results}, indent=1))


if __name__ == "__main__":
    main()
