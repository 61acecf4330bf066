"""Compare rl-stage configurations on validation splits only, several at once, without MLflow or DVC
(so it also runs on a many-core machine that has neither): warm-up, then RL, each config in its own
process; accuracy on rl_val (chain), val.jsonl (base families) and lora_val.jsonl (add3) after the
warm-up and after RL, plus the RL run's throughput and staleness. Test files are never read: the
chosen default is scored on test once, by `dvc repro rl`.

    python -m experiments.rl_probe --configs '[{}, {"loss_type": "grpo"}, {"max_staleness": 2}]' \
        [--base data/base] [--lora data/lora] [--data data/tasks] [--jobs 4] [--threads 2] [--json out.json]

Each config holds only the keys that differ from params/rl.yaml (nested sections merge key by key).
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

from experiments.ablation import merge
from slimforge.config import parse_params, read_yaml
from stages.rl.params import RlParams

VAL_FILES = {"chain": "rl_val.jsonl", "base": "val.jsonl", "add3": "lora_val.jsonl"}


def _val_scores(model, tokenizer, data: Path) -> dict:
    import torch

    from slimforge.evaluate import evaluate
    from slimforge.tasks.records import load_records

    out = {}
    with torch.no_grad():
        for name, file in VAL_FILES.items():
            m = evaluate(model, tokenizer, load_records(data / file, need_answer=True))
            out[name] = m["accuracy_base"]
            out[f"{name}_ci95"] = m["ci95"]["accuracy_base"]
    return out


def probe(config: dict, base: str, lora: str, data: str, threads: int, checkpoints: str,
          cores: list[int] | None = None) -> dict:
    """Warm-up + RL for one config; validation accuracy after each (runs in a worker process).
    `cores`: pin this config (and its rollout process, which inherits it) to these CPU cores."""
    import functools
    import os

    import torch

    from slimforge.modeling import load_model
    from slimforge.rl.trainer import train_rl
    from slimforge.training import train_causal_lm
    from stages.rl.stage import build_policy, ptx_args, rollout_spec, warmup_examples

    params = parse_params(merge(read_yaml("params/rl.yaml"), config), RlParams, json.dumps(config))
    if cores:
        os.sched_setaffinity(0, cores)
    # asynchronous: the rollout process takes one thread, so the trainer keeps the others
    torch.set_num_threads(max(1, threads - 1) if params.max_staleness else threads)
    data_dir, started = Path(data), time.perf_counter()
    adapter = str(Path(lora) / "adapter") if params.start == "lora" else None
    make = functools.partial(build_policy, base, adapter, params.rank, params.alpha, tuple(params.targets), params.seed)
    policy, tokenizer = make(), load_model(base, device="cpu")[1]
    tag = str(abs(hash(json.dumps(config, sort_keys=True))))
    result: dict = {"config": config}
    if params.warmup.rows and params.warmup.steps:
        train_causal_lm(policy, warmup_examples(params, data_dir, tokenizer), params.warmup,
                        pad_id=tokenizer.pad_token_id, seed=params.seed, checkpoint_dir=Path(checkpoints) / tag / "w",
                        fingerprint=tag, progress=False)
    result["warmup"], result["warmup_seconds"] = _val_scores(policy, tokenizer, data_dir), time.perf_counter() - started
    spec = rollout_spec(params, data_dir)
    rl = train_rl(policy, tokenizer, spec, params.train, checkpoint_dir=Path(checkpoints) / tag / "r", fingerprint=tag,
                  loss_type=params.loss_type, epsilon=params.epsilon, epsilon_high=params.epsilon_high,
                  beta=params.beta, num_iterations=params.num_iterations, scale_rewards=params.scale_rewards,
                  dynamic_sampling=params.dynamic_sampling, max_staleness=params.max_staleness,
                  behaviour_cap=params.behaviour_cap, build_policy=make, tokenizer_dir=base,
                  **ptx_args(params, data_dir, tokenizer))
    result["rl"] = _val_scores(policy, tokenizer, data_dir)
    history = rl.pop("history")
    result["train"] = {**rl, "correct_first10": sum(h["correct"] for h in history[:10]) / max(1, len(history[:10])),
                       "correct_last10": sum(h["correct"] for h in history[-10:]) / max(1, len(history[-10:])),
                       "pass_at_g_mean": sum(h["pass_at_g"] for h in history) / max(1, len(history)),
                       "distinct_mean": sum(h["distinct"] for h in history) / max(1, len(history)),
                       "correct_curve": [round(h["correct"], 4) for h in history]}
    result["seconds"] = time.perf_counter() - started
    return result


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m experiments.rl_probe", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", required=True, help="JSON list of overrides of params/rl.yaml")
    ap.add_argument("--base", default="data/base")
    ap.add_argument("--lora", default="data/lora")
    ap.add_argument("--data", default="data/tasks")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2, help="torch threads per config")
    ap.add_argument("--checkpoints", default="/tmp/rl_probe")
    ap.add_argument("--pin", action="store_true", help="pin config i to cores [i*threads, (i+1)*threads) "
                    "(a fair per-config machine: e.g. 2 cores each, as on the CI machine)")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    configs = json.loads(args.configs)
    for c in configs:  # all validated before any runs
        parse_params(merge(read_yaml("params/rl.yaml"), c), RlParams, json.dumps(c))
    with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(probe, c, args.base, args.lora, args.data, args.threads, args.checkpoints,
                               list(range(i % args.jobs * args.threads, (i % args.jobs + 1) * args.threads))
                               if args.pin else None)
                   for i, c in enumerate(configs)]
        results = []
        for f in futures:
            r = f.result()
            results.append(r)
            print(json.dumps({"config": r["config"], "warmup": {k: round(v, 3) for k, v in r["warmup"].items()
                                                                if not k.endswith("ci95")},
                              "rl": {k: round(v, 3) for k, v in r["rl"].items() if not k.endswith("ci95")},
                              "samples_per_s": round(r["train"]["samples_per_s"], 1),
                              "seconds": round(r["seconds"])}), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
