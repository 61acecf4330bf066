"""Ablation rows are params files that validate, run the stage's dvc.yaml command, and resume."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from experiments import ablation
from slimforge import SlimforgeError
from slimforge.config import load_params
from stages.prune.params import PruneParams
from stages.quantize.params import QuantizeParams
from tests.conftest import REPO


@pytest.mark.parametrize("stage,schema,minimum", [("prune", PruneParams, 8), ("quantize", QuantizeParams, 9)])
def test_every_row_is_a_valid_params_file_and_the_first_is_the_default(stage, schema, minimum):
    rows = sorted((REPO / "params" / "ablations" / stage).glob("*.yaml"))
    assert len(rows) >= minimum
    defaults = REPO / "params" / f"{stage}.yaml"
    parsed = {r.stem: ablation.row_params(r, defaults, schema)[1] for r in rows}
    assert parsed[rows[0].stem] == load_params(defaults, schema)  # row 01 is the shipped default
    assert len({p.model_dump_json() for p in parsed.values()}) == len(rows)  # no two rows alike


def test_rows_override_nested_keys_one_by_one():
    defaults = REPO / "params" / "quantize.yaml"
    _, kl_only = ablation.row_params(REPO / "params/ablations/quantize/04_2bit_lrec_kl_only.yaml", defaults,
                                     QuantizeParams)
    assert kl_only.lrec.ce_weight == 0.0 and kl_only.lrec.steps == load_params(defaults, QuantizeParams).lrec.steps


def test_a_wrong_key_in_a_row_fails_naming_the_row(tmp_path):
    row = tmp_path / "bad.yaml"
    row.write_text("sparsty: 0.3\n")
    with pytest.raises(SlimforgeError, match="bad.yaml.*sparsty"):
        ablation.row_params(row, REPO / "params" / "prune.yaml", PruneParams)


def test_stage_command_keeps_inputs_and_moves_outputs_into_the_row_folder(tmp_path):
    cmd = ablation.stage_command("quantize", tmp_path / "p.yaml", tmp_path / "row", REPO / "dvc.yaml")
    assert cmd[0] == sys.executable and cmd[1:3] == ["-m", "stages.quantize"]
    flags = dict(zip(cmd[3::2], cmd[4::2]))
    assert flags["--params"] == str(tmp_path / "p.yaml")
    assert flags["--model"] == "data/pruned" and flags["--data"] == "data/tasks"  # inputs as dvc.yaml has them
    for flag in ("--out", "--metrics", "--report", "--plots"):
        assert flags[flag].startswith(str(tmp_path / "row")), flag
    with pytest.raises(SlimforgeError, match="no stage 'nope'"):
        ablation.stage_command("nope", tmp_path / "p.yaml", tmp_path, REPO / "dvc.yaml")


def test_rows_run_in_order_print_the_columns_and_a_rerun_skips_finished_rows(tmp_path, monkeypatch, capsys):
    # A stand-in stage command that writes a report from its params and counts its runs.
    script = tmp_path / "fake_stage.py"
    script.write_text(
        "import json, sys, yaml\n"
        "a = dict(zip(sys.argv[1::2], sys.argv[2::2]))\n"
        "p = yaml.safe_load(open(a['--params']))\n"
        "open(a['--report'], 'w').write(json.dumps({'kl': {'searched': p['sparsity'] / 10}}))\n"
        "open(%r, 'a').write('run\\n')\n" % str(tmp_path / "runs.log"))
    monkeypatch.chdir(tmp_path)
    Path("dvc.yaml").write_text(yaml.safe_dump({"stages": {"prune": {
        "cmd": f"python {script} --params params/prune.yaml --model data/base --report r.json --out o"}}}))
    Path("defaults.yaml").write_text((REPO / "params" / "prune.yaml").read_text())
    (tmp_path / "rows").mkdir()
    Path("rows/a.yaml").write_text("{}\n")
    Path("rows/b.yaml").write_text("sparsity: 0.3\n")
    args = ["prune", "--rows", "rows/*.yaml", "--defaults", "defaults.yaml", "--out", "out",
            "--columns", "kl.searched", "--json", "t.json"]
    ablation.main(args)
    table = json.loads(Path("t.json").read_text())
    assert [(t["row"], t["kl.searched"]) for t in table] == [("a", 0.05), ("b", 0.03)]
    assert "| b | 0.030 |" in capsys.readouterr().out
    ablation.main(args)  # both reports exist: nothing runs again
    assert Path("runs.log").read_text().count("run") == 2
