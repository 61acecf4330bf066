"""Entry called by dvc.yaml: python -m stages.base --model-params params/model.yaml ..."""

from slimforge.stage import stage_main
from stages.base import __doc__ as doc
from stages.base.params import BaseParams, ModelParams


def summary(m: dict) -> str:
    acc = ", ".join(f"{k} {v:.3f}" for k, v in m["accuracy"].items())
    return f"base: {m['params']:,} params; accuracy {acc}; ppl {m.get('ppl', float('nan')):.3f}"


if __name__ == "__main__":
    stage_main("stages.base.stage", name="base", trains=True, params={"model_params": ModelParams, "params": BaseParams},
               paths=["data", "out", "metrics", "report", "plots"], optional=("report",),
               summary=summary, doc=doc,
               help={"model_params": "params/model.yaml", "out": "output model folder (data/base)"})
