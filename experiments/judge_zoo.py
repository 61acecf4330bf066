"""A zoo of judge strengths: the embedded base trained for fewer or more steps, each used as the
filter's judge on the same noisy set and pool, to see where Meta Ranking helps most.

    python -m experiments.judge_zoo --data data/tasks --labels data/labels --steps 300,700,1400,2200 \
        [--json zoo.json]

Each judge is the `cpu` preset of params/base.yaml trained from scratch for that many steps (its
learning-rate schedule ends there, as a shorter pretraining run would), on the GPU when there is
one (a few minutes in all on one H100; about 8 minutes per 2200 steps on 2 CPU cores). Per judge:
its accuracy on judge_test.jsonl per format, and for Meta Ranking, direct judging and perplexity
the ranking AUC of right vs wrong rows and the F1 at catching wrong rows with the pool-calibrated
threshold, exactly as the filter stage computes them. It spans the base recipe and the filter
stage, so it is an experiment: experiments may import stages, stages and flows never import them.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from slimforge.config import load_params
from slimforge.evaluate import exact_match, judge_accuracy
from slimforge.evaluate.judging import direct_probs, mean_logprob
from slimforge.pretrain import pretrain
from slimforge.tasks.records import load_records
from stages.base.params import BaseParams
from stages.filter.stage import baseline, filter_rows, load_pool, read_wrong, score_methods
from stages.filter.params import FilterParams


def judge_report(judge, tokenizer, data_dir: Path, labels_dir: Path, params: FilterParams) -> dict:
    # the suite files the params name, read from this data folder
    targets = load_records(data_dir / Path(params.targets).name)
    pool = load_pool(data_dir / Path(params.pool).name)
    with tempfile.TemporaryDirectory() as cache:
        methods = {"meta_ranking": filter_rows(judge, tokenizer, targets, pool, params, Path(cache), 0),
                   "direct": baseline(direct_probs, judge, tokenizer, targets, pool, params.batch_size,
                                      params.min_pool_auc),
                   "perplexity": baseline(mean_logprob, judge, tokenizer, targets, pool, params.batch_size,
                                          params.min_pool_auc)}
    return score_methods(methods, read_wrong(labels_dir, [t["id"] for t in targets]))


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m experiments.judge_zoo", description=__doc__)
    ap.add_argument("--data", default="data/tasks")
    ap.add_argument("--labels", default="data/labels")
    ap.add_argument("--steps", default="300,700,1400,2200", help="comma-separated training lengths")
    ap.add_argument("--base-params", default="params/base.yaml")
    ap.add_argument("--filter-params", default="params/filter.yaml")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args()
    base = load_params(args.base_params, BaseParams)
    params = load_params(args.filter_params, FilterParams)
    data_dir, labels_dir = Path(args.data), Path(args.labels)
    tests = load_records(data_dir / "test.jsonl", need_answer=True)
    judge_items = load_records(data_dir / "judge_test.jsonl")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    for steps in [int(s) for s in args.steps.split(",")]:
        preset = base.presets["cpu"].model_copy(update={"steps": steps, "device": device,
                                                        "warmup_steps": min(base.presets["cpu"].warmup_steps, steps // 10)})
        with tempfile.TemporaryDirectory() as ckpt:
            judge, tokenizer, _, _ = pretrain(preset, base.seed, data_dir, Path(ckpt), fingerprint=f"zoo-{steps}")
        judge.eval()
        acc = exact_match(judge, tokenizer, tests)
        row = {"steps": steps, "task_accuracy": sum(acc.values()) / len(acc),
               "judge_accuracy": judge_accuracy(judge, tokenizer, judge_items),
               "methods": judge_report(judge, tokenizer, data_dir, labels_dir, params)}
        rows.append(row)
        m = row["methods"]
        print(f"steps {steps}: task {row['task_accuracy']:.3f}, judge {row['judge_accuracy']}; AUC / F1 "
              + ", ".join(f"{k} {v['auc']:.3f} / {v['f1']:.3f}" for k, v in m.items()), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
