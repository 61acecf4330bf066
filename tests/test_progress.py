"""Progress and logging: long loops say how far they are in a log (one line per interval, not a
line per iteration), entries log in one format at SLIMFORGE_LOG_LEVEL, and the known PEFT and
transformers warnings on our models stay quiet."""

import logging
import os
import re
import subprocess
import sys
import time
import warnings

import pytest

from slimforge import cli_util
from slimforge.cli_util import progress
from slimforge.evaluate import evaluate
from slimforge.tasks.records import load_records
from tests.conftest import REPO
from tests.helpers import tiny_model

LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (INFO|WARNING|ERROR|DEBUG) [\w.]+: ")


@pytest.fixture
def log_mode(monkeypatch):
    """Progress as in a DVC/Prefect/CI log (stderr not a terminal), with the heartbeat set by the test."""
    monkeypatch.setattr(cli_util, "_is_tty", lambda: False)
    monkeypatch.setattr(cli_util, "_last_line", [time.monotonic()])
    return lambda seconds: monkeypatch.setenv("SLIMFORGE_PROGRESS_SECONDS", str(seconds))


def test_evaluation_loops_log_their_progress(tokenizer, suite_dir, log_mode, caplog):
    log_mode(0)  # every update may write a line
    records = load_records(suite_dir / "test.jsonl", need_answer=True)
    with caplog.at_level(logging.INFO, logger="slimforge"):
        evaluate(tiny_model("llama", tokenizer), tokenizer, records, ppl_records=records, batch_size=16)
    generate = [r.getMessage() for r in caplog.records if r.name == "slimforge.evaluate.generation"]
    n = len(records)
    assert any(m.startswith(f"generate: 16/{n} prompt") for m in generate), generate
    assert generate[-1].startswith(f"generate: {n}/{n} prompt (100%)"), generate
    assert any(r.name == "slimforge.evaluate.scoring" and r.getMessage().startswith("log-likelihood: ")
               for r in caplog.records)


def test_a_log_gets_one_line_per_interval_not_one_per_iteration(log_mode, caplog):
    log = logging.getLogger("slimforge.test")
    log_mode(15)
    with caplog.at_level(logging.INFO, logger="slimforge"):
        for _ in progress(range(2000), desc="fast", log=log):
            pass
    assert caplog.records == []  # shorter than the interval since the last line: silent

    log_mode(0.1)
    with caplog.at_level(logging.INFO, logger="slimforge"):
        for _ in progress(range(12), desc="slow", unit="batch", log=log):
            time.sleep(0.05)  # 0.6 s in all: about 6 heartbeats, and the final line
    lines = [r.getMessage() for r in caplog.records]
    assert 3 <= len(lines) <= 9, lines
    assert lines[-1].startswith("slow: 12/12 batch (100%)"), lines


def _python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "SLIMFORGE_PROGRESS_SECONDS": "0", **env})


SCRIPT = """
import logging
from slimforge.cli_util import exit_on_error, progress, setup_logging
exit_on_error(setup_logging)
for _ in progress(range(3), desc="loop", unit="batch", log=logging.getLogger("stages.demo")):
    pass
logging.getLogger("mlflow.store").info("another library's info: not ours to show")
logging.getLogger("slimforge.demo").warning("a warning")
print("the command's output")
"""


def test_entries_log_to_stderr_in_one_format_at_the_level_asked():
    run = _python(SCRIPT)
    assert run.returncode == 0, run.stderr
    assert run.stdout == "the command's output\n"  # results stay on stdout, alone
    lines = run.stderr.splitlines()
    assert lines and all(LINE.match(line) for line in lines), lines
    assert any(re.search(r" INFO stages\.demo: loop: 3/3 batch \(100%\), 00:00 elapsed, ~00:00 left, ", line)
               for line in lines), lines
    assert "another library" not in run.stderr and "WARNING slimforge.demo: a warning" in run.stderr

    quiet = _python(SCRIPT, SLIMFORGE_LOG_LEVEL="warning")
    assert "INFO" not in quiet.stderr and "WARNING slimforge.demo: a warning" in quiet.stderr

    bad = _python(SCRIPT, SLIMFORGE_LOG_LEVEL="loud")
    assert bad.returncode == 2 and bad.stderr.startswith("error: SLIMFORGE_LOG_LEVEL='LOUD'"), bad.stderr


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_the_known_peft_and_transformers_warnings_stay_quiet(tokenizer, tmp_path):
    """PEFT's FutureWarning on `is_gradient_checkpointing` (transformers 5) when wrapping, and
    transformers' "model of type `llama` ... `slimforge_pruned_llama`" when PEFT saves a pruned
    model's adapter (it reads the base folder's config with the pruned config class)."""
    from transformers import LlamaConfig

    from slimforge.adapters import add_lora
    from slimforge.pruning import PrunePlan, prune_model
    from slimforge.pruning.modeling_pruned import PrunedLlamaConfig

    base = tiny_model("llama", tokenizer)
    base.save_pretrained(tmp_path / "base")
    base.config._name_or_path = str(tmp_path / "base")  # as load_model leaves it: PEFT's save looks there
    collect = _Collect()
    logging.getLogger("transformers").addHandler(collect)  # transformers' loggers do not propagate to root
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            adapted = add_lora(prune_model(base, PrunePlan.identity(base.config)), 4, 8, ["q_proj", "down_proj"])
            adapted.save_pretrained(tmp_path / "adapter")
        assert not [str(w.message) for w in caught if "is_gradient_checkpointing" in str(w.message)]
        assert (tmp_path / "adapter" / "adapter_config.json").is_file()
        PrunedLlamaConfig.from_pretrained(tmp_path / "base")  # what PEFT's save does, directly
        assert not [m for m in collect.messages if "slimforge_pruned" in m], collect.messages
        tiny_model("qwen2", tokenizer).config.save_pretrained(tmp_path / "qwen2")
        LlamaConfig.from_pretrained(tmp_path / "qwen2")  # any other mismatch still warns
        assert any("model of type `qwen2` to instantiate a model of type `llama`" in m for m in collect.messages)
    finally:
        logging.getLogger("transformers").removeHandler(collect)
