"""Entry called by dvc.yaml: python -m stages.rl --params params/rl.yaml --base data/base --lora data/lora ..."""

from slimforge.stage import stage_main
from stages.rl import __doc__ as doc
from stages.rl.params import RlParams


def summary(m: dict) -> str:
    parts = [f"{k} {v['accuracy_rl']:.3f}" for k, v in m["results"].items()]
    return f"rl: rl_test accuracy {', '.join(parts)}; {m['rl']['samples_per_s']:.0f} samples/s"


if __name__ == "__main__":
    stage_main("stages.rl.stage", name="rl", trains=True, params={"params": RlParams},
               paths=["base", "lora", "data", "out", "metrics", "report", "plots"], optional=("report",),
               summary=summary, doc=doc,
               help={"base": "the base model folder (data/base)",
                     "lora": "the lora stage's output (data/lora): its adapter/ is merged into the base with "
                             "start: lora",
                     "out": "output folder: adapter/ (the RL adapter, PEFT)"})
