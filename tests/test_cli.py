"""Command-line entries: bad input gives one line and status 2 before any work; `serve` is not the
scheduler (`schedule` is); --version and --help say what a user needs; a killed base stage resumes
from its checkpoint and ends with the metrics of an uninterrupted run.

    python -m pytest -q tests/test_cli.py
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from tests.conftest import REPO


def _stage(args, cwd, env=None):
    """`python -m <args>` (args may start with interpreter flags such as -X importtime)."""
    flags = args[:2] if args[0] == "-X" else []
    return subprocess.Popen([sys.executable, *flags, "-m", *args[len(flags):]], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env or {**os.environ, "PYTHONPATH": str(REPO)})


def _base_args(tmp, params, data):
    return ["stages.base", "--model-params", str(REPO / "params/model.yaml"), "--params", str(params),
            "--data", str(data), "--out", str(tmp / "data/base"), "--metrics", str(tmp / "metrics.json"),
            "--report", str(tmp / "report.json"),
            "--plots", str(tmp / "plots")]


def test_unknown_param_key_fails_before_any_work(tmp_path, suite_dir):
    params = yaml.safe_load((REPO / "params/base.yaml").read_text()) | {"lerning_rate": 1}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(params))
    proc = _stage(["-X", "importtime", *_base_args(tmp_path, tmp_path / "base.yaml", suite_dir)], tmp_path,
                  env={**os.environ, "PYTHONPATH": str(REPO), "DVC_STAGE": "base"})
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    said = [line for line in err.splitlines() if not line.startswith("import time:")]
    assert len(said) == 1 and said[0].startswith("error: ")
    assert "unknown key 'lerning_rate'" in err and "eval_batch_size" in err and "Traceback" not in err
    assert "`dvc checkout base` restores" in err  # under DVC the outputs are already gone: say how to get them back
    imported = {line.rpartition("|")[2].strip() for line in err.splitlines() if line.startswith("import time:")}
    assert "torch" not in imported and "transformers" not in imported  # refused before the heavy imports
    assert not (tmp_path / "data").exists()


def test_check_data_reports_file_and_line(tmp_path):
    bad = tmp_path / "mine.jsonl"
    bad.write_text('{"prompt": "1+1=", "response": "2", "answer": "2"}\n{"prompt": "2+2="}\n')
    proc = subprocess.run([sys.executable, "-m", "slimforge.cli", "check-data", str(bad)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and f"{bad}:2: missing field(s) response" in proc.stderr


def test_serve_is_not_the_scheduler():
    proc = subprocess.run([sys.executable, "-m", "slimforge.cli", "serve", "--port", "8000"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("error: ") and "not implemented" in line and "`slimforge schedule`" in line


def test_schedule_without_a_prefect_server_is_refused(tmp_path):
    env = {**os.environ, "PREFECT_HOME": str(tmp_path), "PYTHONPATH": str(REPO)}  # no profile, no server
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.run([sys.executable, "-m", "slimforge.cli", "schedule", "--cron", "0 3 * * *", "data"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "error: a schedule needs a Prefect server" in proc.stderr


def test_version_is_the_package_version(capsys):
    import tomllib

    from slimforge.cli import main

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    expected = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert done.value.code == 0 and capsys.readouterr().out.startswith(f"slimforge {expected}")


def test_help_names_the_stages_and_explains_every_option(capsys, monkeypatch, tmp_path):
    import argparse

    from slimforge.cli import main, parser

    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert all(s in out for s in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"])
    assert all(c in out for c in ("run", "schedule", "eval", "check-data", "serve", "--version"))
    (sub,) = [a for a in parser()._actions if isinstance(a, argparse._SubParsersAction)]
    for name, command in sub.choices.items():
        for action in command._actions:
            assert action.help, f"slimforge {name}: {action.option_strings or action.dest} has no help"
    monkeypatch.chdir(tmp_path)  # no dvc.yaml here: a hint instead of the names
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    assert "run from the repo root" in capsys.readouterr().out


@pytest.mark.slow
def test_killed_base_stage_resumes_to_the_same_metrics(tmp_path, suite_dir):
    params = yaml.safe_load((REPO / "params/base.yaml").read_text())
    params["preset"] = "test"
    params["presets"]["test"].update(steps=80, checkpoint_every=10)
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(params))

    straight_dir = tmp_path / "straight"
    straight_dir.mkdir()
    proc = _stage(_base_args(straight_dir, tmp_path / "base.yaml", suite_dir), straight_dir)
    assert proc.wait(timeout=300) == 0, proc.stderr.read()

    killed_dir = tmp_path / "killed"
    killed_dir.mkdir()
    ckpt = killed_dir / "data/.checkpoints/base/state.pt"
    proc = _stage(_base_args(killed_dir, tmp_path / "base.yaml", suite_dir), killed_dir)
    deadline = time.time() + 300
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert ckpt.exists(), "no checkpoint appeared before the run ended"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed_dir / "data/base").exists()  # nothing half-written was left as output
    proc = _stage(_base_args(killed_dir, tmp_path / "base.yaml", suite_dir), killed_dir)
    assert proc.wait(timeout=300) == 0, proc.stderr.read()

    straight = json.loads((straight_dir / "report.json").read_text())
    resumed = json.loads((killed_dir / "report.json").read_text())
    assert resumed["train"]["resumed_from"] > 0
    assert resumed["accuracy"] == straight["accuracy"]
    assert resumed["ppl"] == pytest.approx(straight["ppl"], rel=1e-6)
    assert resumed["train"]["final_loss"] == pytest.approx(straight["train"]["final_loss"], rel=1e-6)
