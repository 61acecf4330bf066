"""Entry called by dvc.yaml: python -m stages.filter --params params/filter.yaml --model data/base ..."""

from slimforge.stage import stage_main
from stages.filter import __doc__ as doc
from stages.filter.params import FilterParams


def summary(m: dict) -> str:
    line = (f"filter: kept {m['kept_fraction']:.3f} of {m['targets']} by {m['filter_method']}, "
            f"{m['pairs_per_s']:.0f} pairs/s")
    if "detection" in m:
        line += "; F1 " + ", ".join(f"{k} {v['f1']:.3f}" for k, v in m["detection"].items())
    if "downstream_accuracy" in m:
        line += "; LoRA accuracy " + ", ".join(f"{k} {v:.3f}" for k, v in m["downstream_accuracy"].items())
    if "gap_closed" in m:
        line += f"; gap closed {m['gap_closed']:.2f}"
    return line


if __name__ == "__main__":
    stage_main("stages.filter.stage", name="filter", trains=True, params={"params": FilterParams},
               paths=["model", "data", "labels", "out", "metrics", "report"],
               optional=("labels", "report"), summary=summary, doc=doc,
               help={"model": "the base model folder: the judge's base (params judge) and the model of the "
                              "downstream LoRAs",
                     "labels": "the sidecar labels folder, read only to score the methods afterwards",
                     "out": "output folder: filtered.jsonl and scores.jsonl"})
