"""The CSV plots dvc.yaml declares draw what they mean: `python -m pytest tests/test_plots.py`.

Each CSV chart declares its x and every series column as y, and DVC's own rendering of the committed
files (`dvc plots show --json`, about 2 s) has rows whose x and y are set and typed as they should be
(a categorical x such as "layer 0" is nominal: typed quantitative, DVC draws an empty chart).
"""

from __future__ import annotations

import csv
import json
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
def test_declared_x_and_y_are_columns_and_every_column_is_drawn(plot_id):
    for path, x, ys in PLOTS[plot_id]:
        header = _header(ROOT / path)
        assert x, f"{plot_id}: no x declared for {path} (DVC would plot against the row index)"
        assert ys, f"{plot_id}: no y declared for {path} (DVC draws only its last column, {header[-1]!r})"
        missing = [c for c in [x, *ys] if c not in header]
        assert not missing, f"{plot_id}: {missing} declared but {path} has columns {header}"
        undrawn = set(header) - {x, *ys}
        assert not undrawn, f"{plot_id}: {path} columns {sorted(undrawn)} are written but not drawn"


def test_each_csv_is_drawn_once():
    files = [path for defs in PLOTS.values() for path, _, _ in defs]
    assert sorted(files) == sorted(set(files)), "a CSV declared twice (a stage's plots: and the top-level) draws twice"
    committed = {p.relative_to(ROOT).as_posix() for p in (ROOT / "plots").rglob("*") if p.suffix in TABLES}
    assert committed <= set(files), f"committed plot tables no chart declares: {sorted(committed - set(files))}"


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, dict]:
    """DVC's vega-lite spec per plot id, rendered from the committed files (images go to a temp folder)."""
    out = tmp_path_factory.mktemp("dvc_plots")
    proc = subprocess.run([sys.executable, "-m", "dvc", "plots", "show", "--json", "-o", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    shown = json.loads(proc.stdout)
    assert not shown.get("errors"), shown["errors"]
    specs = {}
    for plot_id, items in shown["data"].items():
        for item in items:
            if item.get("type") == "vega":
                assert plot_id not in specs, f"{plot_id} rendered twice"
                specs[plot_id] = item["content"]
    return specs


def _channels(node):
    """Every (channel, definition) under an `encoding` anywhere in a spec (layers, facets)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "encoding" and isinstance(value, dict):
                yield from ((c, d) for c, d in value.items() if isinstance(d, dict) and isinstance(d.get("field"), str))
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
def test_dvc_renders_x_and_y_with_matching_types(plot_id, rendered):
    assert plot_id in rendered, f"dvc plots show has no chart for {plot_id} (rendered: {sorted(rendered)})"
    spec = rendered[plot_id]
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


def test_writers_keep_the_layout_dvc_yaml_declares(tmp_path):
    """`name` (or the x label) first, then one column per series, as the declarations above expect."""
    csv_, png = write_bars(tmp_path / "b", ["layer 0", "layer 1"], {"attn": [0.5, 0.0], "mlp": [0.25, 1.0]}, "s", "t")
    assert csv_.read_text().splitlines() == ["name,attn,mlp", "layer 0,0.5,0.25", "layer 1,0,1"]
    csv_, png2 = write_grid(tmp_path / "g", ["layer 0", "layer 1"], {"q_proj": [2, 3], "k_proj": [4, 2]}, "t", "bits",
                            cell_text={"q_proj": ["2/g64", "3/g128"], "k_proj": ["4/g64", "2/g64"]})
    assert csv_.read_text().splitlines() == ["name,q_proj,k_proj", "layer 0,2,4", "layer 1,3,2"]
    csv_, png3 = write_curve(tmp_path / "c", [1, 2], {"loram": [2.0, 1.0], "full_lora": [2.5, 1.5]}, "step", "t")
    assert csv_.read_text().splitlines()[0] == "step,loram,full_lora"
    assert all(p.stat().st_size > 1000 for p in (png, png2, png3))
