"""Shared fixtures: a small suite on disk, tiny tokenizer/models, isolated MLflow and Prefect."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from slimforge.io import write_jsonl
from slimforge.tasks.judge import VERDICTS
from slimforge.tasks.suite import build_suite
from slimforge.tokenizer import build_tokenizer

REPO = Path(__file__).resolve().parents[1]

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True, scope="session")
def _isolated_tracking(tmp_path_factory):
    """Every test logs into a sqlite file under pytest's tmp folder, never the repo's mlflow.db;
    slimforge.tracking puts a sqlite store's artifacts beside it (mlartifacts/), so no test leaves
    mlruns/ or mlartifacts/ in the repo or the working directory."""
    db = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{db}"
    yield
    if old is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = old


def small_suite(seed: int = 0):
    return build_suite(seed=seed, n_train={"add": 200, "sub": 200, "mul": 200}, n_val=10, n_test=20,
                       n_judge_train=100, n_judge_test=40, n_lora=(20, 10, 20), n_rl=(20, 10, 20),
                       noisy_families=("add3",), n_noisy=100, wrong_fraction=0.3, n_references=20)


@pytest.fixture(scope="session")
def suite_dir(tmp_path_factory) -> Path:
    """A small embedded suite written as the data stage would write it."""
    folder = tmp_path_factory.mktemp("suite")
    files, _labels = small_suite()
    for name, records in files.items():
        write_jsonl(folder / name, records)
    return folder


@pytest.fixture(scope="session")
def tokenizer():
    return small_tokenizer()


def small_tokenizer():
    """The tests' tokenizer, trained on the small suite (a function too: scripts build it outside pytest)."""
    files, _ = small_suite()
    texts = [r["prompt"] + r["response"] for r in files["train.jsonl"] + files["judge_train.jsonl"]]
    return build_tokenizer(texts, 300, must_be_single=[v for pair in VERDICTS.values() for v in pair])
