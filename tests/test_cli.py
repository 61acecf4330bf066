"""Command-line entries: bad input gives one line and status 2 before any work; a killed base
stage resumes from its checkpoint and ends with the metrics of an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from tests.conftest import REPO


def _stage(args, cwd, **kw):
    return subprocess.Popen([sys.executable, "-m", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, **kw)


def _base_args(tmp, params, data):
    return ["stages.base", "--model-params", str(REPO / "params/model.yaml"), "--params", str(params),
            "--data", str(data), "--out", str(tmp / "data/base"), "--metrics", str(tmp / "metrics.json"),
            "--plots", str(tmp / "plots")]


def test_unknown_param_key_fails_before_any_work(tmp_path, suite_dir):
    params = yaml.safe_load((REPO / "params/base.yaml").read_text()) | {"lerning_rate": 1}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(params))
    proc = _stage(_base_args(tmp_path, tmp_path / "base.yaml", suite_dir), tmp_path)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert err.strip().splitlines()[-1].startswith("error: ")
    assert "unknown key 'lerning_rate'" in err and "eval_batch_size" in err and "Traceback" not in err
    assert not (tmp_path / "data").exists()


def test_check_data_reports_file_and_line(tmp_path):
    bad = tmp_path / "mine.jsonl"
    bad.write_text('{"prompt": "1+1=", "response": "2", "answer": "2"}\n{"prompt": "2+2="}\n')
    proc = subprocess.run([sys.executable, "-m", "slimforge.cli", "check-data", str(bad)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and f"{bad}:2: missing field(s) response" in proc.stderr


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

    straight = json.loads((straight_dir / "metrics.json").read_text())
    resumed = json.loads((killed_dir / "metrics.json").read_text())
    assert resumed["train"]["resumed_from"] > 0
    assert resumed["accuracy"] == straight["accuracy"]
    assert resumed["ppl"] == pytest.approx(straight["ppl"], rel=1e-6)
    assert resumed["train"]["final_loss"] == pytest.approx(straight["train"]["final_loss"], rel=1e-6)
