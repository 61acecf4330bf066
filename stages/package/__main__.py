"""Entry called by dvc.yaml: python -m stages.package --params params/package.yaml --base data/base ..."""

from slimforge.stage import stage_main
from stages.package import __doc__ as doc
from stages.package.params import PackageParams


def summary(m: dict) -> str:
    reg = m.get("registry") or {}
    where = f"; registered {reg['name']} v{reg['version']} ({', '.join(reg['aliases'])})" if reg else ""
    return f"package: {len(m['deployables'])} deployables checked in a fresh process{where}"


if __name__ == "__main__":
    stage_main("stages.package.stage", name="package", params={"params": PackageParams},
               paths=["base", "lora", "rl", "compact", "quantized", "data", "reports", "out", "metrics", "report"],
               optional=("report", "quantized"),
               summary=summary, doc=doc,
               help={"base": "the base model folder (data/base)", "lora": "the lora stage's output (data/lora)",
                     "rl": "the rl stage's output (data/rl)",
                     "compact": "the compact model folder: the prune stage's data/pruned",
                     "quantized": "the quantize stage's data/quantized, exported to compressed-tensors "
                                  "pack-quantized + its correction as a PEFT adapter (omit: no export)",
                     "reports": "the stages' report folder (reports/): lora.json, rl.json and prune.json hold the "
                                "test accuracy each deployable must reproduce",
                     "out": "output folder: full/, adapters/lora, adapters/rl, compact/, quantized/, adapters/correction"})
