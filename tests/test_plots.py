"""The CSV plots dvc.yaml declares draw what they mean: `python -m pytest tests/test_plots.py`.

Each CSV chart declares its x and y columns, and DVC's own rendering of the committed files (`dvc plots
show --json`, about 2 s) has rows whose x, y and every other column (a long CSV's series column, e.g.
LoRA's `run`, quantize's `matrix`, which the chart's template colours or places by) are set, on a channel
and typed as they should be (a categorical x such as "layer 0" is nominal: typed quantitative, DVC draws
an empty chart). The long CSVs the writers make now are rendered the same way in a scratch copy, so a
layout change is checked before the stages rerun and recommit their plots.
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from slimforge.plots import write_bars, write_curve, write_grid

ROOT = Path(__file__).resolve().parents[1]
TABLES = (".csv", ".tsv")


def _entries(items) -> list[tuple[str, dict]]:
    return [(i, {}) if isinstance(i, str) else (next(iter(i)), next(iter(i.values())) or {}) for i in items or []]


def declared_plots(root: Path = ROOT) -> dict[str, list[tuple[str, str | None, list[str]]]]:
    """Plot id -> [(csv file, x, [y columns])] for every CSV chart in dvc.yaml (stage `plots:` and the
    top-level `plots:`)."""
    spec = yaml.safe_load((root / "dvc.yaml").read_text())
    found: dict[str, list] = {}
    for stage in spec.get("stages", {}).values():
        for path, props in _entries(stage.get("plots")):
            if path.endswith(TABLES):
                found.setdefault(path, []).append((path, props.get("x"), [props["y"]] if props.get("y") else []))
    for plot_id, props in _entries(spec.get("plots")):
        y = props.get("y")
        by_file = y if isinstance(y, dict) else {plot_id: y or []}
        for path, cols in by_file.items():
            if path.endswith(TABLES):
                x = props.get("x")
                found.setdefault(plot_id, []).append((path, x.get(path) if isinstance(x, dict) else x,
                                                      [cols] if isinstance(cols, str) else list(cols)))
    return found


def _header(path: Path) -> list[str]:
    with path.open(newline="") as f:
        return next(csv.reader(f, delimiter="\t" if path.suffix == ".tsv" else ","))


PLOTS = declared_plots()


@pytest.mark.parametrize("plot_id", sorted(PLOTS))
def test_declared_x_and_y_are_columns(plot_id):
    """(That every other column is drawn too, by the template, is checked on DVC's rendering below.)"""
    for path, x, ys in PLOTS[plot_id]:
        header = _header(ROOT / path)
        assert x, f"{plot_id}: no x declared for {path} (DVC would plot against the row index)"
        assert ys, f"{plot_id}: no y declared for {path} (DVC draws only its last column, {header[-1]!r})"
        missing = [c for c in [x, *ys] if c not in header]
        assert not missing, f"{plot_id}: {missing} declared but {path} has columns {header}"


def test_each_csv_is_drawn_once():
    files = [path for defs in PLOTS.values() for path, _, _ in defs]
    assert sorted(files) == sorted(set(files)), "a CSV declared twice (a stage's plots: and the top-level) draws twice"
    committed = {p.relative_to(ROOT).as_posix() for p in (ROOT / "plots").rglob("*") if p.suffix in TABLES}
    assert committed <= set(files), f"committed plot tables no chart declares: {sorted(committed - set(files))}"


def render(root: Path, out: Path) -> dict[str, dict]:
    """DVC's vega-lite spec per plot id, rendered from the plot files under `root` (images go to `out`); a
    plot DVC could not render maps to {"dvc_errors": [...]}, failing only that plot's test."""
    proc = subprocess.run([sys.executable, "-m", "dvc", "plots", "show", "--json", "-o", str(out)], cwd=root,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    shown = json.loads(proc.stdout)
    unnamed = [e for e in shown.get("errors") or [] if not e.get("name")]
    assert not unnamed, unnamed
    specs: dict[str, dict] = {}
    for error in shown.get("errors") or []:
        specs.setdefault(error["name"], {"dvc_errors": []})["dvc_errors"].append(error)
    for plot_id, items in shown["data"].items():
        for item in items:
            if item.get("type") == "vega":
                assert plot_id not in specs, f"{plot_id} rendered twice (or also failed: {specs.get(plot_id)})"
                specs[plot_id] = item["content"]
    return specs


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, dict]:
    """DVC's rendering of the committed files."""
    return render(ROOT, tmp_path_factory.mktemp("dvc_plots"))


def _channels(node):
    """Every (channel, definition) under an `encoding` anywhere in a spec (layers, facets)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "encoding" and isinstance(value, dict):
                for c, d in value.items():  # a channel takes one definition or, like tooltip, a list
                    yield from ((c, e) for e in (d if isinstance(d, list) else [d])
                                if isinstance(e, dict) and isinstance(e.get("field"), str))
            yield from _channels(value)
    elif isinstance(node, list):
        for value in node:
            yield from _channels(value)


def _number(value) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


@pytest.mark.parametrize("plot_id", sorted(PLOTS))
def test_dvc_renders_every_column_with_matching_types(plot_id, rendered):
    check_rendered(plot_id, rendered, ROOT)


def check_rendered(plot_id: str, rendered: dict[str, dict], root: Path) -> None:
    """x and the y values on a channel, every other column of the CSV too (the series a long CSV names
    in a column), none null, each typed as its values allow."""
    assert plot_id in rendered, f"dvc plots show has no chart for {plot_id} (rendered: {sorted(rendered)})"
    spec = rendered[plot_id]
    assert "dvc_errors" not in spec, f"{plot_id}: dvc plots show failed: {spec.get('dvc_errors')}"
    rows = spec["data"]["values"]
    assert rows, f"{plot_id}: no data rows"
    columns = set(rows[0])
    used = {}
    for channel, d in _channels(spec):
        field = d["field"].replace("\\.", ".").replace("\\[", "[").replace("\\]", "]")
        if field not in columns:
            continue  # made by a transform inside the template (smoothing, pivot)
        used.setdefault(field, set()).add(channel)
        assert all(r.get(field) not in (None, "") for r in rows), f"{plot_id}: {channel} field {field!r} has nulls"
        if d.get("type") == "quantitative":
            bad = sorted({r[field] for r in rows if not _number(r[field])})[:3]
            assert not bad, f"{plot_id}: {channel} {field!r} typed quantitative but holds {bad} (use a nominal axis)"
    for path, x, ys in PLOTS[plot_id]:
        assert x in used, f"{plot_id}: x {x!r} is on no channel (channels use {sorted(used)})"
        value = ys[0] if len(ys) == 1 and len(PLOTS[plot_id]) == 1 else "dvc_inferred_y_value"
        assert value in used, f"{plot_id}: the y values ({value!r}) are on no channel (channels use {sorted(used)})"
        if value == "dvc_inferred_y_value":  # several y columns: DVC names each row's column in `field`
            drawn = {r.get("field") for r in rows}
            assert set(ys) <= drawn, f"{plot_id}: y columns {sorted(set(ys) - drawn)} have no rows"
        if not all(_number(r[x]) for r in rows):  # a categorical x must sit on a nominal/ordinal channel
            types = {d.get("type") for c, d in _channels(spec) if d["field"] == x}
            assert types and types <= {"nominal", "ordinal"}, f"{plot_id}: categorical x {x!r} typed {types}"
        if len(ys) == 1:  # one y per file: DVC keeps the rows' own columns, so each must be on a channel
            undrawn = set(_header(root / path)) - set(used)
            assert not undrawn, f"{plot_id}: {path} columns {sorted(undrawn)} are written but on no channel"
        else:  # several y columns: DVC keeps x and each y (checked above); another column would be dropped
            undrawn = set(_header(root / path)) - {x, *ys}
            assert not undrawn, f"{plot_id}: {path} columns {sorted(undrawn)} are written but not drawn"


def _write_long_plots(root: Path) -> None:
    """The two long CSVs as the lora and quantize stages write them, with series other than the committed."""
    write_curve(root / "plots/lora/loss", [1, 2, 3], {"lora": [2.0, 1.5, 1.0]}, "step", "t", long=("run", "loss"))
    write_grid(root / "plots/quantize/bits", ["layer 0", "layer 1"], {"q_proj": [2, 3], "down_proj": [4, 2]}, "t",
               "bits", extra={"group": {"q_proj": [64, 128], "down_proj": [64, 64]}})


def test_writers_keep_the_layout_dvc_yaml_declares(tmp_path):
    """Wide (`name` or the x label first, then one column per series) where a stage's series are fixed;
    long (x, series column, value, ...) where params choose them (LoRA's runs, quantize's matrices)."""
    csv_, png = write_bars(tmp_path / "b", ["layer 0", "layer 1"], {"attn": [0.5, 0.0], "mlp": [0.25, 1.0]}, "s", "t")
    assert csv_.read_text().splitlines() == ["name,attn,mlp", "layer 0,0.5,0.25", "layer 1,0,1"]
    csv_, png2 = write_grid(tmp_path / "g", ["layer 0", "layer 1"], {"q_proj": [2, 3], "k_proj": [4, 2]}, "t", "bits",
                            cell_text={"q_proj": ["2/g64", "3/g128"], "k_proj": ["4/g64", "2/g64"]},
                            extra={"group": {"q_proj": [64, 128], "k_proj": [64, 64]}})
    assert csv_.read_text().splitlines() == ["layer,matrix,bits,group", "layer 0,q_proj,2,64", "layer 0,k_proj,4,64",
                                             "layer 1,q_proj,3,128", "layer 1,k_proj,2,64"]
    csv_, png3 = write_curve(tmp_path / "c", [1, 2], {"loram": [2.0, 1.0], "full_lora": [2.5, 1.5]}, "step", "t",
                             long=("run", "loss"))
    assert csv_.read_text().splitlines() == ["step,run,loss", "1,loram,2", "2,loram,1", "1,full_lora,2.5",
                                             "2,full_lora,1.5"]
    csv_, png4 = write_curve(tmp_path / "k", [1, 2], {"kl": [0.5, 0.25]}, "generation", "t")
    assert csv_.read_text().splitlines() == ["generation,kl", "1,0.5", "2,0.25"]
    assert all(p.stat().st_size > 1000 for p in (png, png2, png3, png4))


LONG = ("plots/lora/loss.csv", "plots/quantize/bits.csv")


@pytest.fixture(scope="module")
def fresh(tmp_path_factory) -> tuple[Path, dict[str, dict]]:
    """A scratch copy of dvc.yaml, params, plots and templates, the long CSVs written now, and DVC's rendering."""
    root = tmp_path_factory.mktemp("fresh_repo")
    for name in ("dvc.yaml", "params", "plots"):
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy)(ROOT / name, root / name)
    shutil.copytree(ROOT / ".dvc" / "plots", root / ".dvc" / "plots")
    (root / ".dvc" / "config").write_text("[core]\n    no_scm = true\n    analytics = false\n")
    _write_long_plots(root)
    return root, render(root, tmp_path_factory.mktemp("fresh_out"))


@pytest.mark.parametrize("plot_id", LONG)
def test_long_csvs_the_writers_make_now_render(plot_id, fresh):
    """dvc.yaml and the templates against CSVs written now with another run's series (a single `lora` run;
    two matrices, mixed groups), so the layout is checked before the stages rerun and recommit their plots."""
    assert plot_id in PLOTS and all(len(ys) == 1 for _, _, ys in PLOTS[plot_id]), f"{plot_id}: declare one y"
    root, specs = fresh
    check_rendered(plot_id, specs, root)
