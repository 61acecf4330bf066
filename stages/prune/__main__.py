"""Entry called by dvc.yaml: python -m stages.prune --params params/prune.yaml --model data/base ..."""

from slimforge.stage import stage_main
from stages.prune import __doc__ as doc
from stages.prune.params import PruneParams


def summary(m: dict) -> str:
    kl, acc = m["kl_heldout"], m["searched"]["accuracy_base"]
    line = f"prune: sparsity {m['sparsity']['achieved']:.3f}; held-out KL searched {kl['searched']:.4f}"
    if "uniform" in kl:
        line += f" vs uniform {kl['uniform']:.4f}; accuracy {acc:.3f} vs {m['uniform']['accuracy_base']:.3f}"
    return line


if __name__ == "__main__":
    stage_main("stages.prune.stage", name="prune", params={"params": PruneParams},
               paths=["model", "data", "out", "metrics", "report", "plots"], optional=("report",),
               summary=summary, doc=doc, help={"model": "the model folder to prune (data/base)",
                                               "out": "output folder for the pruned model"})
