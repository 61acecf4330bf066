"""Entry called by dvc.yaml: python -m stages.lora --params params/lora.yaml --base data/base ..."""

import argparse

from slimforge.cli_util import exit_on_error
from slimforge.config import load_params
from stages.lora import run
from stages.lora.params import LoraParams


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m stages.lora", description=__doc__)
    ap.add_argument("--params", required=True, help="params/lora.yaml")
    ap.add_argument("--base", required=True, help="the full base model folder (data/base): the recovered "
                    "adapter's target")
    ap.add_argument("--pruned", required=True, help="the prune stage's folder (data/pruned) with plan.json")
    ap.add_argument("--quantized", help="the quantize stage's folder (data/quantized), for model: quantized")
    ap.add_argument("--filtered", help="the filter stage's folder (data/filtered), for data: filtered")
    ap.add_argument("--data", required=True, help="the data stage's suite folder")
    ap.add_argument("--out", required=True, help="output folder: adapter/ (recovered) and pruned_adapter/")
    ap.add_argument("--metrics", required=True, help="metrics JSON path")
    ap.add_argument("--plots", required=True, help="folder for the loss curves")
    args = ap.parse_args()
    params = load_params(args.params, LoraParams)
    m = run(params, args.base, args.pruned, args.data, args.out, args.metrics, args.plots,
            quantized_dir=args.quantized, filtered_dir=args.filtered)
    parts = [f"{k} {v['accuracy_lora']:.3f}" for k, v in m["results"].items() if v["accuracy_lora"] is not None]
    print("lora: held-out LoRA-family accuracy: " + ", ".join(parts))


if __name__ == "__main__":
    exit_on_error(main)
