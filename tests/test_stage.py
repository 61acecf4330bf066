"""The stage skeleton: content fingerprints, checkpoint folders, the stage context, the command line."""

import json
import subprocess
import sys

import pytest
import torch
from pydantic import Field

from slimforge.config import Schedule, Schema, parse_params
from slimforge.io import content_hash, folder_hash
from slimforge.stage import checkpoint_folder, open_stage
from tests.conftest import REPO


def test_content_hash_follows_contents_not_paths(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for folder in (a, b):
        folder.mkdir()
        (folder / "w.bin").write_bytes(b"\x00\x01")
    assert content_hash({"k": 1}, a) == content_hash({"k": 1}, b)  # same bytes elsewhere: same hash
    before = content_hash({"k": 1}, a)
    (a / "w.bin").write_bytes(b"\x00\x02")  # retrained at the same path
    assert content_hash({"k": 1}, a) != before
    assert content_hash({"k": 2}, b) != content_hash({"k": 1}, b)
    assert content_hash(a / "w.bin") != content_hash(a)  # a file and the folder holding it differ
    assert folder_hash(b) == folder_hash(b) and len(folder_hash(b)) == 64


def test_checkpoint_folder_keeps_its_own_state_and_drops_another_runs(tmp_path):
    out = tmp_path / "data" / "pruned"
    folder = checkpoint_folder(out, "run-1")
    assert folder == tmp_path / "data" / ".checkpoints" / "pruned" and not out.exists()
    (folder / "state.pt").write_text("x")
    assert (checkpoint_folder(out, "run-1") / "state.pt").exists()  # the same run resumes
    assert not (checkpoint_folder(out, "run-2") / "state.pt").exists()  # other params or inputs: start over


def test_open_stage_writes_metrics_and_outputs_and_clears_checkpoints_only_on_success(tmp_path):
    out, metrics = tmp_path / "out", tmp_path / "metrics.json"
    with pytest.raises(RuntimeError):
        with open_stage("demo", {"seed": 0}, out=out, inputs=[], metrics=metrics) as stage:
            (stage.checkpoints / "state.pt").write_text("partial")
            with stage.output() as tmp:
                (tmp / "model.bin").write_text("half")
                raise RuntimeError("killed")
    assert not out.exists() and not metrics.exists()
    assert (tmp_path / ".checkpoints" / "out" / "state.pt").read_text() == "partial"  # kept to resume from
    with open_stage("demo", {"seed": 0}, out=out, inputs=[], metrics=metrics) as stage:
        assert (stage.checkpoints / "state.pt").exists() and stage.device in ("cpu", "cuda")
        with stage.output() as tmp:
            (tmp / "model.bin").write_text("whole")
        stage.finish({"accuracy": 0.5})
    assert (out / "model.bin").read_text() == "whole" and json.loads(metrics.read_text()) == {"accuracy": 0.5}
    assert not (tmp_path / ".checkpoints" / "out").exists()


class Lrec(Schedule):
    kl_weight: float = Field(1.0, ge=0)


class Demo(Schema):
    lrec: Lrec = Field(Lrec(steps=400, lr=2e-3, warmup_steps=20))


def test_a_partial_section_keeps_the_stages_own_defaults():
    full = parse_params({}, Demo, "demo.yaml").lrec
    assert (full.steps, full.lr, full.warmup_steps) == (400, 2e-3, 20)
    part = parse_params({"lrec": {"steps": 4, "kl_weight": 0.5}}, Demo, "demo.yaml").lrec
    assert (part.steps, part.lr, part.warmup_steps, part.kl_weight) == (4, 2e-3, 20, 0.5)
    with pytest.raises(Exception, match="unknown key 'lrec.lerning_rate'"):
        parse_params({"lrec": {"lerning_rate": 1}}, Demo, "demo.yaml")


def test_stage_command_line_is_built_from_the_declaration(tmp_path):
    help_text = subprocess.run([sys.executable, "-m", "stages.quantize", "--help"], cwd=REPO, capture_output=True,
                               text=True, timeout=120).stdout
    for flag in ("--params", "--model", "--base", "--data", "--out", "--metrics", "--plots"):
        assert flag in help_text
    assert "the pruned model folder (data/pruned)" in help_text
    missing = subprocess.run([sys.executable, "-m", "stages.lora", "--params", "params/lora.yaml"], cwd=REPO,
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "--base" in missing.stderr and "--quantized" not in missing.stderr.split(
        "required:")[-1]


def test_pick_device_prefers_the_gpu_only_when_there_is_one():
    from slimforge.stage import pick_device

    assert pick_device("cpu") == "cpu"
    assert pick_device() == ("cuda" if torch.cuda.is_available() else "cpu")
