"""Ablation rows as files: one params file per row under params/ablations/<stage>/, each holding only
the keys that differ from params/<stage>.yaml (nested sections merge key by key; an empty mapping
is the defaults' own row). Each row runs the stage's own command from dvc.yaml — same inputs, the
row's merged params, outputs in the row's folder under --out — and the table prints the columns
the README reports for that stage.

    python -m experiments.ablation prune    [--rows 'params/ablations/prune/*.yaml'] [--out /tmp/ablation] [--json t.json]
    python -m experiments.ablation quantize [--rows ...] [--columns results.rtn.accuracy_base ...]

Run it from the repository root after `dvc repro <stage>` (the rows read the stage's inputs under
data/, as dvc.yaml names them). Every row is validated before any row runs. A killed run resumes:
a row whose report is already in its folder is not run again. Each row's merged params, metrics
and report stay in its folder, so a row can be rerun alone with the command printed in its log.
(The lora stage's rows compare on validation and hide test: experiments/lora_ablation.py.)
"""

from __future__ import annotations

import argparse
import glob
import json
import shlex
import subprocess
import sys
from pathlib import Path

import yaml

from slimforge import SlimforgeError
from slimforge.config import parse_params, read_yaml

# What the README's ablation tables show for each stage (dotted keys into the stage's report).
COLUMNS = {
    "prune": ["kl_heldout.searched", "kl_heldout.uniform", "searched.accuracy_base",
              "searched.ci95.accuracy_base", "uniform.accuracy_base", "search_seconds"],
    "quantize": ["bits.bits_per_weight", "results.full_precision.accuracy_base", "results.rtn.accuracy_base",
                 "results.rtn.bits_per_weight", "results.lq_lora.accuracy_base",
                 "results.lq_lora_lrec.accuracy_base", "results.lq_lora_lrec.ci95.accuracy_base",
                 "results.lq_lora_lrec.ppl", "results.rtn_lrec.accuracy_base"],
}
OUTPUT_FLAGS = {"--out": "out", "--metrics": "metrics.json", "--report": "report.json", "--plots": "plots"}


def merge(base: dict, over: dict) -> dict:
    """`over` on top of `base`, nested mappings merged key by key."""
    out = dict(base)
    for key, value in over.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def row_params(row: Path, defaults: Path, schema: type, fixed: dict | None = None):
    """(merged params as a dict, validated) for one row file; a wrong key fails naming the row.
    `fixed` goes under the row (a row may override it), e.g. the lora rows' `baselines: False`."""
    over = read_yaml(row) or {}
    if not isinstance(over, dict):
        raise SlimforgeError(f"{row}: expected a mapping of the keys that differ from {defaults}")
    merged = merge({**(read_yaml(defaults) or {}), **(fixed or {})}, over)
    return merged, parse_params(merged, schema, f"{row} (on {defaults})")


def stage_command(stage: str, params: Path, folder: Path, dvc_yaml: Path = Path("dvc.yaml")) -> list[str]:
    """The stage's cmd from dvc.yaml with --params pointing at the row's file and every output
    (--out, --metrics, --report, --plots) inside the row's folder; inputs stay as dvc.yaml has them."""
    stages = yaml.safe_load(dvc_yaml.read_text())["stages"]
    if stage not in stages:
        raise SlimforgeError(f"no stage {stage!r} in {dvc_yaml}; stages: {', '.join(stages)}")
    args = shlex.split(stages[stage]["cmd"])
    for i, arg in enumerate(args[:-1]):
        if arg == "--params":
            args[i + 1] = str(params)
        elif arg in OUTPUT_FLAGS:
            args[i + 1] = str(folder / OUTPUT_FLAGS[arg])
    return [sys.executable if args[0] == "python" else args[0], *args[1:]]


def lookup(report: dict, key: str):
    for part in key.split("."):
        if not isinstance(report, dict) or part not in report:
            return None
        report = report[part]
    return report


def run_rows(stage: str, rows: list[Path], out: Path, columns: list[str], defaults: Path) -> list[dict]:
    """Validate every row, then run each (skipping rows already done) and return the table."""
    from importlib import import_module

    schema_name = f"{stage.capitalize()}Params"
    schema = getattr(import_module(f"stages.{stage}.params"), schema_name)
    parsed = [(row, row_params(row, defaults, schema)[0]) for row in rows]
    table = []
    for row, merged in parsed:
        folder = out / row.stem
        folder.mkdir(parents=True, exist_ok=True)
        params_file = folder / "params.yaml"
        params_file.write_text(yaml.safe_dump(merged, sort_keys=False))
        report = folder / "report.json"
        if not report.is_file():
            cmd = stage_command(stage, params_file, folder)
            print(f"[{row.stem}] {shlex.join(cmd)}", flush=True)
            done = subprocess.run(cmd, check=False)
            if done.returncode != 0:
                raise SlimforgeError(f"row {row} failed (exit {done.returncode}); rerun: {shlex.join(cmd)}")
        measured = json.loads(report.read_text())
        table.append({"row": row.stem, **{c: lookup(measured, c) for c in columns}})
    return table


def _fmt(x) -> str:
    if isinstance(x, dict) and {"lo", "hi"} <= x.keys():
        return f"[{x['lo']:.3f}, {x['hi']:.3f}]"
    return "-" if x is None else f"{x:.3f}" if isinstance(x, float) else str(x)


def format_table(table: list[dict], columns: list[str]) -> str:
    lines = ["| row | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    lines += ["| " + " | ".join([t["row"], *(_fmt(t[c]) for c in columns)]) + " |" for t in table]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m experiments.ablation", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=sorted(COLUMNS))
    ap.add_argument("--rows", help="glob of row files (default params/ablations/<stage>/*.yaml)")
    ap.add_argument("--defaults", help="default params/<stage>.yaml")
    ap.add_argument("--out", default="/tmp/ablation", help="one folder per row under <out>/<stage> (outside the repo)")
    ap.add_argument("--columns", nargs="+", help="dotted report keys (default: the README's columns)")
    ap.add_argument("--json", help="also write the table here")
    args = ap.parse_args(argv)
    pattern = args.rows or f"params/ablations/{args.stage}/*.yaml"
    rows = [Path(r) for r in sorted(glob.glob(pattern))]
    if not rows:
        raise SystemExit(f"no row files match {pattern}")
    columns = args.columns or COLUMNS[args.stage]
    try:
        table = run_rows(args.stage, rows, Path(args.out) / args.stage, columns,
                         Path(args.defaults or f"params/{args.stage}.yaml"))
    except SlimforgeError as err:
        raise SystemExit(f"error: {err}") from None
    print(format_table(table, columns))
    if args.json:
        Path(args.json).write_text(json.dumps(table, indent=2) + "\n")


if __name__ == "__main__":
    main()
