"""data stage: write the embedded task suite (or your JSONL in its place) under data/.

    python -m stages.data --params params/data.yaml --out data/tasks --labels data/labels \
        --metrics metrics/data.json
"""

from __future__ import annotations

from pathlib import Path

from slimforge.io import atomic_dir, write_json, write_jsonl
from slimforge.tasks.records import load_labels, load_records
from slimforge.tasks.suite import LABELS_FILE, build_suite
from slimforge.tracking import stage_run
from stages.data.params import DataParams

# Files read by exact-match evaluation: a user's replacement must carry answers.
NEEDS_ANSWER = ("val.jsonl", "test.jsonl", "lora_val.jsonl", "lora_test.jsonl", "rl_train.jsonl",
                "rl_test.jsonl")


def run(params: DataParams, out_dir: str | Path, labels_dir: str | Path, metrics_path: str | Path) -> dict:
    with stage_run("data", params.model_dump()) as tracker:
        files, labels = build_suite(
            seed=params.seed, n_train=params.train_per_family, n_val=params.val_per_family,
            n_test=params.test_per_family, n_judge_train=params.judge_train,
            n_judge_test=params.judge_test,
            n_lora=(params.lora.train, params.lora.val, params.lora.test),
            n_rl=(params.rl.train, params.rl.test), noisy_families=tuple(params.noisy.families),
            n_noisy=params.noisy.size, wrong_fraction=params.noisy.wrong_fraction,
            n_references=params.references, gross_fraction=params.gross_fraction,
            judge_families=tuple(params.judge_families))
        user = dict(params.user_files)
        if LABELS_FILE in user:
            labels = load_labels(user.pop(LABELS_FILE))
        elif "noisy.jsonl" in user:
            labels = []  # the generated labels describe the generated set, not the user's
        for name, path in user.items():
            files[name] = load_records(path, need_answer=name in NEEDS_ANSWER)
        with atomic_dir(out_dir) as tmp:
            for name, records in files.items():
                write_jsonl(tmp / name, records)
        with atomic_dir(labels_dir) as tmp:
            write_jsonl(tmp / LABELS_FILE, labels)
        metrics = {"records": {name.removesuffix(".jsonl"): len(r) for name, r in files.items()},
                   "noisy_wrong_fraction": (sum(not l["correct"] for l in labels) / len(labels)) if labels else 0.0}
        write_json(metrics_path, metrics)
        tracker.log_metrics(metrics)
        tracker.log_artifact(metrics_path)
    return metrics

