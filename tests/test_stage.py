"""The stage skeleton: content fingerprints, checkpoint folders, the stage context, the command line."""

import json

import pytest
import torch
from pydantic import Field

from slimforge.config import Schedule, Schema, parse_params
from slimforge.io import content_hash
from slimforge.stage import checkpoint_folder, open_stage, select
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
    assert len(content_hash(b)) == 64


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


def test_metrics_file_holds_the_headline_and_the_report_everything(tmp_path):
    measured = {"results": {"a": {"accuracy_lora": 0.9, "ppl": 1.1}, "b": {"accuracy_lora": 0.8, "ppl": 1.2}},
                "seconds": 12.5, "ratio": 0.3}
    assert select(measured, ["results.*.accuracy_lora", "ratio", "missing.*"]) == {
        "results": {"a": {"accuracy_lora": 0.9}, "b": {"accuracy_lora": 0.8}}, "ratio": 0.3}
    metrics, report = tmp_path / "m.json", tmp_path / "reports" / "r.json"
    with open_stage("demo", {}, out=tmp_path / "out", inputs=[], metrics=metrics, report=report) as stage:
        assert stage.finish(measured, headline=["results.*.accuracy_lora"]) == measured
    assert json.loads(metrics.read_text()) == {"results": {"a": {"accuracy_lora": 0.9}, "b": {"accuracy_lora": 0.8}}}
    assert json.loads(report.read_text()) == measured


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


def test_stage_command_line_is_built_from_the_declaration(tmp_path, capsys, monkeypatch):
    import sys

    from slimforge.stage import stage_main

    (tmp_path / "demo_stage_module.py").write_text(
        "calls = []\n\ndef run(params, model, data, out, extra=None):\n"
        "    calls.append((params, model, data, out, extra))\n    return {'ok': 1}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    run = "demo_stage_module"  # imported only once the params are valid
    declare = dict(name="demo", params={"params": Demo}, paths=["model", "data", "out", "extra"], optional=("extra",),
                   help={"model": "the model folder to read"}, summary=lambda m: f"demo: {m['ok']}")
    with pytest.raises(SystemExit) as done:
        stage_main(run, **declare, argv=["--help"])
    shown = capsys.readouterr().out
    assert done.value.code == 0 and "python -m stages.demo" in shown and "the model folder to read" in shown
    assert all(flag in shown for flag in ("--params", "--model", "--data", "--out", "--extra"))
    with pytest.raises(SystemExit) as done:
        stage_main(run, **declare, argv=["--params", "p.yaml"])
    assert done.value.code == 2 and "--model, --data, --out" in capsys.readouterr().err  # --extra is optional
    params = tmp_path / "demo.yaml"
    params.write_text("lrec: {stepz: 7}\n")
    with pytest.raises(SystemExit) as done:  # a bad params file: one line, status 2, the stage's code never loads
        stage_main(run, **declare, argv=["--params", str(params), "--model", "m", "--data", "d", "--out", "o"])
    err = capsys.readouterr().err.strip()
    assert done.value.code == 2 and err.startswith("error: ") and "unknown key 'lrec.stepz'" in err
    assert "demo_stage_module" not in sys.modules and "dvc checkout" not in err
    monkeypatch.setenv("DVC_STAGE", "demo")  # under dvc repro: the outputs are gone, say how to restore them
    with pytest.raises(SystemExit):
        stage_main(run, **declare, argv=["--params", str(params), "--model", "m", "--data", "d", "--out", "o"])
    assert "`dvc checkout demo` restores" in capsys.readouterr().err
    monkeypatch.delenv("DVC_STAGE")
    params.write_text("lrec: {steps: 7}\n")
    stage_main(run, **declare, argv=["--params", str(params), "--model", "m", "--data", "d", "--out", "o"])
    calls = sys.modules["demo_stage_module"].calls
    assert calls == [(Demo(lrec=Lrec(steps=7, lr=2e-3, warmup_steps=20)), "m", "d", "o", None)]
    assert capsys.readouterr().out.strip() == "demo: 1"


def test_every_stage_entry_declares_its_command_line():
    """Each __main__ calls stage_main with the flags dvc.yaml passes (no argparse block of its own)."""
    import yaml

    for stage, spec in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"].items():
        entry = (REPO / "stages" / stage / "__main__.py").read_text()
        assert "stage_main(" in entry and "argparse" not in entry, stage
        for flag in (w for w in spec["cmd"].split() if w.startswith("--")):
            assert f'"{flag[2:].replace("-", "_")}"' in entry, (stage, flag)


def test_pick_device_prefers_the_gpu_only_when_there_is_one():
    from slimforge.stage import pick_device

    assert pick_device("cpu") == "cpu"
    assert pick_device() == ("cuda" if torch.cuda.is_available() else "cpu")
