"""Entry called by dvc.yaml: python -m stages.lora --params params/lora.yaml --base data/base ..."""

from slimforge.stage import stage_main
from stages.lora import __doc__ as doc
from stages.lora.params import LoraParams


def summary(m: dict) -> str:
    parts = [f"{k} {v['accuracy_lora']:.3f}" for k, v in m["results"].items() if v["accuracy_lora"] is not None]
    return "lora: held-out LoRA-family accuracy: " + ", ".join(parts)


if __name__ == "__main__":
    stage_main("stages.lora.stage", name="lora", trains=True, params={"params": LoraParams},
               paths=["base", "data", "out", "metrics", "report", "plots"], optional=("report",),
               summary=summary, doc=doc,
               help={"base": "the full base model folder (data/base): the recovered adapter's target",
                     "out": "output folder: adapter/ (recovered) and pruned_adapter/"})
