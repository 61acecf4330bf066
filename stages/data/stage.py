"""The data stage's run(): the method is described in stages/data/__init__.py, the command line in
__main__.py (which checks the params before importing this module, so a typo fails in about a second)."""

from __future__ import annotations

from pathlib import Path

from slimforge.io import write_jsonl
from slimforge.stage import open_stage
from slimforge.tasks.records import load_labels, load_records
from slimforge.tasks.suite import LABELS_FILE, build_suite
from stages.data.params import DataParams

# Files read by exact-match evaluation: a user's replacement must carry answers.
NEEDS_ANSWER = ("val.jsonl", "test.jsonl", "lora_val.jsonl", "lora_test.jsonl", "rl_train.jsonl",
                "rl_val.jsonl", "rl_test.jsonl")


# What `dvc metrics show` compares; the report (--report) keeps every split's count.
HEADLINE = ["records.train", "records.test", "records.noisy", "noisy_wrong_fraction"]


def run(params: DataParams, out: str | Path, labels: str | Path, metrics: str | Path,
        report: str | Path | None = None) -> dict:
    user = dict(params.user_files)  # read and checked first: a bad file fails before any work
    user_labels = load_labels(user.pop(LABELS_FILE)) if LABELS_FILE in user else None
    user_records = {name: load_records(path, need_answer=name in NEEDS_ANSWER) for name, path in user.items()}
    with open_stage("data", params.model_dump(), out=out, inputs=[], metrics=metrics, report=report) as stage:
        files, label_rows = suite(params)
        if user_labels is not None:
            label_rows = user_labels
        elif "noisy.jsonl" in user:
            label_rows = []  # the generated labels describe the generated set, not the user's
        files.update(user_records)
        with stage.output() as tmp:
            for name, records in files.items():
                write_jsonl(tmp / name, records)
        with stage.output(labels) as tmp:
            write_jsonl(tmp / LABELS_FILE, label_rows)
        wrong = sum(not row["correct"] for row in label_rows)
        return stage.finish({"records": {name.removesuffix(".jsonl"): len(r) for name, r in files.items()},
                             "noisy_wrong_fraction": wrong / len(label_rows) if label_rows else 0.0},
                            headline=HEADLINE)


def suite(params: DataParams) -> tuple[dict[str, list[dict]], list[dict]]:
    """The generated suite the params describe: {file name: records}, and the noisy set's labels."""
    return build_suite(
        seed=params.seed, n_train=params.train_per_family, n_val=params.val_per_family,
        n_test=params.test_per_family, n_judge_train=params.judge_train,
        n_judge_test=params.judge_test,
        n_lora=(params.lora.train, params.lora.val, params.lora.test),
        n_rl=(params.rl.train, params.rl.val, params.rl.test), noisy_families=tuple(params.noisy.families),
        n_noisy=params.noisy.size, wrong_fraction=params.noisy.wrong_fraction,
        n_references=params.references, gross_fraction=params.gross_fraction,
        judge_families=tuple(params.judge_families),
        error_modes=None if params.noisy.error_modes == {"random": 1.0} else params.noisy.error_modes)
