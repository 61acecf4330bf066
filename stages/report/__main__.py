"""Entry called by dvc.yaml: python -m stages.report --params params/report.yaml --reports reports ..."""

from slimforge.stage import stage_main
from stages.report import __doc__ as doc
from stages.report.params import ReportParams


def summary(m: dict) -> str:
    return "report: " + "; ".join(f"{r['model']} {r['accuracy_base']:.3f} at {r['bytes'] / 1e6:.2f} MB"
                                  for r in m["models"].values())


if __name__ == "__main__":
    stage_main("stages.report.stage", name="report", params={"params": ReportParams},
               paths=["reports", "base", "pruned", "quantized", "package", "out", "metrics", "plots", "report", "data"],
               optional=("report", "data"), summary=summary, doc=doc,
               help={"reports": "the stages' report folder (reports/)", "out": "the markdown report (reports/report.md)",
                     "report": "every row in full, decode speeds included (reports/report.json)",
                     "data": "the task suite folder: each model is also scored on val.jsonl (what a sweep selects on)",
                     "base": "the base model folder", "pruned": "the prune stage's folder",
                     "quantized": "the quantize stage's folder", "package": "the package stage's folder"})
