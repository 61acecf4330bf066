"""The report stage: the cross-stage table from the stages' reports (synthetic ones here; the
end-to-end pipeline test runs it on real ones), its markdown, plot and decode speed."""

from __future__ import annotations

import json

import pytest

from slimforge.io import write_json
from slimforge.tasks.records import load_records
from stages.report.params import ReportParams
from stages.report.stage import markdown, run, table_rows
from tests.helpers import save_tiny


def _result(acc_base, extra=None, lo=0.1, hi=0.9):
    """A stage result as the stages write it: accuracies with their intervals."""
    out = {"accuracy_base": acc_base, "ci95": {"accuracy_base": {"lo": lo, "hi": hi}}, "params": 1000, "ppl": 1.5}
    for key, value in (extra or {}).items():
        out[key], out["ci95"][key] = value, {"lo": lo, "hi": hi}
    return out


@pytest.fixture()
def reports(tmp_path):
    folder = tmp_path / "reports"
    write_json(folder / "base.json", {**_result(0.93), "bytes": 4000})
    write_json(folder / "prune.json", {"searched": {**_result(0.88), "bytes": 2000}})
    write_json(folder / "quantize.json", {"final": "lq_lora_lrec",
                                          "results": {"lq_lora_lrec": {**_result(0.87), "bytes": 500, "bits_per_weight": 3.1}}})
    write_json(folder / "lora.json", {"results": {"base": _result(0.93, {"accuracy_lora": 0.0}),
                                                  "recovered": _result(0.82, {"accuracy_lora": 0.81})}})
    write_json(folder / "rl.json", {"results": {"start": _result(0.82, {"accuracy_rl": 0.01}),
                                                "rl": _result(0.86, {"accuracy_lora": 0.95, "accuracy_rl": 0.48})}})
    write_json(folder / "package.json", {"sizes": {"full": {"parameters": 1000, "bytes": 4100, "bits_per_weight": 32.0},
                                                   "adapters/lora": {"bytes": 300}}})
    return folder


def test_rows_come_from_the_reports_and_render_with_intervals(reports):
    rows = table_rows(reports)
    assert [r["key"] for r in rows] == ["base", "pruned", "quantized", "lora", "full"]
    full = rows[-1]
    assert full["accuracy_base"] == 0.86 and full["chain"]["value"] == 0.48 and full["add3"]["value"] == 0.95
    assert rows[0]["bits"] == pytest.approx(32.0) and rows[2]["bits"] == 3.1 and rows[3]["bytes"] == 4300
    assert rows[1]["add3"] is None and rows[3]["chain"]["value"] == 0.01  # lora's chain: the rl stage's start
    text = markdown(rows)
    assert "| shipped: package/full | 1,000 | 0.00 | 32.00 | 0.860 [0.100, 0.900] | 0.950 [0.100, 0.900] |" in text
    assert "| pruned | 1,000 | 0.00 | 16.00 | 0.880 [0.100, 0.900] | – | – | 1.500 |" in text
    (reports / "rl.json").unlink()
    with pytest.raises(Exception, match="rl.json"):
        table_rows(reports)


def test_stage_writes_markdown_plot_and_measured_speed(reports, tmp_path, tokenizer, suite_dir):
    base = save_tiny("llama", tokenizer, tmp_path / "base")
    package = tmp_path / "package"
    save_tiny("llama", tokenizer, package / "full")
    from slimforge.adapters import add_lora
    from slimforge.modeling import load_model

    add_lora(load_model(base)[0], 2, 4.0, ["q_proj"], seed=0).save_pretrained(package / "adapters" / "lora")
    params = ReportParams(new_tokens=8, repeats=1)
    m = run(params, reports, base, base, base, package, tmp_path / "reports" / "report.md", tmp_path / "m.json",
            tmp_path / "plots", report=tmp_path / "reports" / "report.json", data=suite_dir)
    assert all(r["tokens_per_s"] > 0 for r in m["models"].values())
    n_val = sum(r["family"] in ("add", "sub", "mul") for r in load_records(suite_dir / "val.jsonl"))
    assert all(r["val"]["n"] == n_val and r["val"]["lo"] <= r["val"]["value"] <= r["val"]["hi"]
               for r in m["models"].values())  # scored on val here; the test numbers come from the reports
    assert m["models"]["base"]["val"] == m["models"]["pruned"]["val"]  # the same folder: the same answers
    full = json.loads((tmp_path / "reports" / "report.json").read_text())
    assert full["models"]["full"]["val"] == m["models"]["full"]["val"] and "tokens_per_s" in full["models"]["full"]
    text = (tmp_path / "reports" / "report.md").read_text()
    assert "decode tokens/s" in text and "![accuracy vs size]" in text
    assert (tmp_path / "plots" / "size_accuracy.png").stat().st_size > 1000
    assert not (tmp_path / "plots" / "size_accuracy.csv").exists()  # its numbers live in the report and metrics
    headline = json.loads((tmp_path / "m.json").read_text())
    assert set(headline["models"]["full"]) == {"accuracy_base", "bytes", "bits"}
    assert not (tmp_path / "reports" / ".checkpoints").exists()
