"""Entry called by dvc.yaml: python -m stages.quantize --params params/quantize.yaml --model data/pruned ..."""

import argparse

from slimforge.cli_util import exit_on_error
from slimforge.config import load_params
from stages.quantize import run
from stages.quantize.params import QuantizeParams


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m stages.quantize", description=__doc__)
    ap.add_argument("--params", required=True, help="params/quantize.yaml")
    ap.add_argument("--model", required=True, help="the pruned model folder (data/pruned)")
    ap.add_argument("--base", required=True, help="the base model folder (data/base): quantized with "
                    "model: base, and the teacher with lrec.teacher: base")
    ap.add_argument("--data", required=True, help="the data stage's suite folder")
    ap.add_argument("--out", required=True, help="output folder for the quantized model")
    ap.add_argument("--metrics", required=True, help="metrics JSON path")
    ap.add_argument("--plots", required=True, help="folder for the bit-allocation plot")
    args = ap.parse_args()
    params = load_params(args.params, QuantizeParams)
    m = run(params, args.model, args.base, args.data, args.out, args.metrics, args.plots)
    r = m["results"]
    parts = [f"{k} {v['accuracy_base']:.3f}/{v['ppl']:.3f}" for k, v in r.items()]
    print(f"quantize: {m['bits']['bits_per_weight']:.2f} bits/weight; accuracy/ppl: " + ", ".join(parts))


if __name__ == "__main__":
    exit_on_error(main)
