"""Entry called by dvc.yaml: python -m stages.filter --params params/filter.yaml --model data/base ..."""

import argparse

from slimforge.cli_util import exit_on_error
from slimforge.config import load_params
from stages.filter import run
from stages.filter.params import FilterParams


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m stages.filter", description=__doc__)
    ap.add_argument("--params", required=True, help="params/filter.yaml")
    ap.add_argument("--model", required=True, help="the base model folder: the judge unless params name one, "
                    "and the model of the downstream LoRAs")
    ap.add_argument("--data", required=True, help="the data stage's suite folder")
    ap.add_argument("--labels", help="the sidecar labels folder, read only to score the methods afterwards")
    ap.add_argument("--out", required=True, help="output folder: filtered.jsonl and scores.jsonl")
    ap.add_argument("--metrics", required=True, help="metrics JSON path")
    args = ap.parse_args()
    params = load_params(args.params, FilterParams)
    m = run(params, args.model, args.data, args.out, args.metrics, args.labels)
    line = f"filter: kept {m['kept_fraction']:.3f} of {m['targets']}, {m['pairs_per_s']:.0f} pairs/s"
    if "detection" in m:
        line += "; F1 " + ", ".join(f"{k} {v['f1']:.3f}" for k, v in m["detection"].items())
    if "downstream_accuracy" in m:
        line += "; LoRA accuracy " + ", ".join(f"{k} {v:.3f}" for k, v in m["downstream_accuracy"].items())
    print(line)


if __name__ == "__main__":
    exit_on_error(main)
