"""Entry called by dvc.yaml: python -m stages.prune --params params/prune.yaml --model data/base ..."""

import argparse

from slimforge.cli_util import exit_on_error
from slimforge.config import load_params
from stages.prune import run
from stages.prune.params import PruneParams


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m stages.prune", description=__doc__)
    ap.add_argument("--params", required=True, help="params/prune.yaml")
    ap.add_argument("--model", required=True, help="the model folder to prune (data/base)")
    ap.add_argument("--data", required=True, help="the data stage's suite folder")
    ap.add_argument("--out", required=True, help="output folder for the pruned model")
    ap.add_argument("--metrics", required=True, help="metrics JSON path")
    ap.add_argument("--plots", required=True, help="folder for sparsity/fitness plots")
    args = ap.parse_args()
    params = load_params(args.params, PruneParams)
    m = run(params, args.model, args.data, args.out, args.metrics, args.plots)
    kl, acc = m["kl_heldout"], m["searched"]["accuracy_base"]
    line = f"prune: sparsity {m['sparsity']['achieved']:.3f}; held-out KL searched {kl['searched']:.4f}"
    if "uniform" in kl:
        line += f" vs uniform {kl['uniform']:.4f}; accuracy {acc:.3f} vs {m['uniform']['accuracy_base']:.3f}"
    print(line)


if __name__ == "__main__":
    exit_on_error(main)
