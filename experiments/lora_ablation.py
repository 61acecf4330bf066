"""The lora stage's ablation table, selected on validation: one params file per row under
params/ablations/lora/, each holding only the keys that differ from params/lora.yaml (nested sections
merge key by key; an empty mapping is the defaults' own row). Every row runs the lora stage's run()
into its own folder under --out and the table prints each row's accuracy on lora_val.jsonl; test
accuracy is not printed: it is reported once, for the chosen default (`dvc repro lora`,
metrics/lora.json). Each row's full params file, metrics and report stay in its folder, so a row can
be rerun alone with `python -m stages.lora --params <out>/<row>/params.yaml ...`.

    python -m experiments.lora_ablation [--rows 'params/ablations/lora/*.yaml'] [--out /tmp/lora-ablation] \
        [--base data/base] [--data data/tasks] [--json table.json]

Run it from the repository root after `dvc repro quantize` (the rows name data/pruned,
data/quantized and data/tasks, as params/lora.yaml does). Rows run without the stage's baselines
(the untouched base and full-model LoRA do not change between rows) unless a row sets
`baselines: true`. A killed run resumes: each row's checkpoints live beside its folder, and a row
whose metrics are already there is skipped.
"""

from __future__ import annotations

import argparse
import glob
import json
from pathlib import Path

import yaml

from experiments import ablation
from stages.lora.params import LoraParams

DEFAULTS = "params/lora.yaml"
ROWS = "params/ablations/lora/*.yaml"


def row_params(row: Path, defaults: Path = Path(DEFAULTS)) -> tuple[dict, LoraParams]:
    """(the merged params as a dict, validated) for one row file; a wrong key fails naming the row.
    Rows run without the baselines unless the row turns them back on."""
    return ablation.row_params(row, defaults, LoraParams, fixed={"baselines": False})


def run_rows(rows: list[Path], out: Path, base: Path, data: Path, defaults: Path = Path(DEFAULTS)) -> list[dict]:
    """Run every row (validated first, all of them, before any training) and return the table."""
    from stages.lora.stage import run

    parsed = [(Path(r), *row_params(Path(r), defaults)) for r in rows]
    table = []
    for row, merged, params in parsed:
        folder = out / row.stem
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "params.yaml").write_text(yaml.safe_dump(merged, sort_keys=False))
        report = folder / "report.json"
        if report.is_file():
            measured = json.loads(report.read_text())
        else:
            measured = run(params, base, data, folder / "lora", folder / "metrics.json", folder / "plots", report)
        table.append(table_row(row.stem, measured))
    return table


def table_row(name: str, measured: dict) -> dict:
    """Validation accuracy of the variants a row trains (the product: recovered, or lora for plain LoRA)."""
    res = measured["results"]
    product = res.get("recovered") or res.get("lora")
    return {"row": name, "model": measured["model"], "prune_weights": measured.get("prune_weights"),
            "align_steps": measured["training"].get("align", {}).get("steps", 0),
            "val_recovered": product["accuracy_lora_val"],
            "val_pruned_adapter": res.get("pruned_adapter", {}).get("accuracy_lora_val")}


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def format_table(table: list[dict]) -> str:
    lines = ["| row | small model | align steps | (a) pruned + adapter, val | (b) recovered, val |",
             "|---|---|---|---|---|"]
    for t in table:
        small = t["model"] + (f" ({t['prune_weights']})" if t["prune_weights"] else "")
        lines.append(f"| {t['row']} | {small} | {t['align_steps']} | {_fmt(t['val_pruned_adapter'])} | "
                     f"{_fmt(t['val_recovered'])} |")
    scored = [t for t in table if t["val_recovered"] is not None]
    if scored:
        best = max(scored, key=lambda t: t["val_recovered"])
        lines.append(f"\nbest on lora_val: {best['row']} ({best['val_recovered']:.3f}); score it on test once, "
                     "as the default (`dvc repro lora`)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m experiments.lora_ablation", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default=ROWS, help="glob of row files (only the keys that differ from --defaults)")
    ap.add_argument("--defaults", default=DEFAULTS)
    ap.add_argument("--out", default="/tmp/lora-ablation", help="one folder per row (outside the repo)")
    ap.add_argument("--base", default="data/base")
    ap.add_argument("--data", default="data/tasks")
    ap.add_argument("--json", help="also write the table here")
    args = ap.parse_args(argv)
    rows = sorted(glob.glob(args.rows))
    if not rows:
        raise SystemExit(f"no row files match {args.rows}")
    table = run_rows([Path(r) for r in rows], Path(args.out), Path(args.base), Path(args.data), Path(args.defaults))
    print(format_table(table))
    if args.json:
        Path(args.json).write_text(json.dumps(table, indent=2) + "\n")


if __name__ == "__main__":
    main()
