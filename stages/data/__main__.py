"""Entry called by dvc.yaml: python -m stages.data --params params/data.yaml --out data/tasks ..."""

from slimforge.stage import stage_main
from stages.data import __doc__ as doc
from stages.data.params import DataParams

if __name__ == "__main__":
    stage_main("stages.data.stage", name="data", params={"params": DataParams},
               paths=["out", "labels", "metrics", "report"], optional=("report",), doc=doc,
               help={"out": "folder for the suite's JSONL files", "labels": "folder for the noisy set's sidecar labels"},
               summary=lambda m: f"data: wrote {sum(m['records'].values())} records")
