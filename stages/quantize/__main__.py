"""Entry called by dvc.yaml: python -m stages.quantize --params params/quantize.yaml --model data/pruned ..."""

from slimforge.stage import stage_main
from stages.quantize import __doc__ as doc
from stages.quantize.params import QuantizeParams


def summary(m: dict) -> str:
    parts = [f"{k} {v['accuracy_base']:.3f}/{v['ppl']:.3f}" for k, v in m["results"].items()]
    return f"quantize: {m['bits']['bits_per_weight']:.2f} bits/weight; accuracy/ppl: " + ", ".join(parts)


if __name__ == "__main__":
    stage_main("stages.quantize.stage", name="quantize", trains=True, params={"params": QuantizeParams},
               paths=["model", "base", "data", "out", "metrics", "report", "plots"], optional=("report",),
               summary=summary, doc=doc,
               help={"model": "the pruned model folder (data/pruned)",
                     "base": "the base model folder (data/base): quantized with model: base, and the teacher "
                             "with lrec.teacher: base",
                     "out": "output folder for the quantized model"})
