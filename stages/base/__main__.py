"""Entry called by dvc.yaml: python -m stages.base --model-params params/model.yaml ..."""

import argparse

from slimforge.cli_util import exit_on_error
from slimforge.config import load_params
from stages.base import run
from stages.base.params import BaseParams, ModelParams


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m stages.base", description=__doc__)
    ap.add_argument("--model-params", required=True, help="params/model.yaml")
    ap.add_argument("--params", required=True, help="params/base.yaml")
    ap.add_argument("--data", required=True, help="the data stage's suite folder")
    ap.add_argument("--out", required=True, help="output model folder")
    ap.add_argument("--metrics", required=True, help="metrics JSON path")
    ap.add_argument("--plots", required=True, help="folder for loss.csv / loss.png")
    args = ap.parse_args()
    model_params = load_params(args.model_params, ModelParams)  # both files validated before any work
    params = load_params(args.params, BaseParams)
    m = run(model_params, params, args.data, args.out, args.metrics, args.plots)
    acc = ", ".join(f"{k} {v:.3f}" for k, v in m["accuracy"].items())
    print(f"base: {m['params']:,} params; accuracy {acc}; ppl {m.get('ppl', float('nan')):.3f}")


if __name__ == "__main__":
    exit_on_error(main)
