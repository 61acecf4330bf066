"""Entry called by dvc.yaml: python -m stages.data --params params/data.yaml --out data/tasks ..."""

import argparse

from slimforge.cli_util import exit_on_error
from slimforge.config import load_params
from stages.data import run
from stages.data.params import DataParams


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m stages.data", description=__doc__)
    ap.add_argument("--params", required=True, help="params/data.yaml")
    ap.add_argument("--out", required=True, help="folder for the suite's JSONL files")
    ap.add_argument("--labels", required=True, help="folder for the noisy set's sidecar labels")
    ap.add_argument("--metrics", required=True, help="metrics JSON path")
    args = ap.parse_args()
    params = load_params(args.params, DataParams)
    metrics = run(params, args.out, args.labels, args.metrics)
    print(f"data: wrote {sum(metrics['records'].values())} records to {args.out}")


if __name__ == "__main__":
    exit_on_error(main)
