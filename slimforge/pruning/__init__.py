"""Structured pruning helpers: plans, physical surgery, and the modeling file pruned folders ship."""

from slimforge.pruning.plan import LayerPlan, PrunePlan, model_dims
from slimforge.pruning.surgery import is_slimforge_pruned, prune_model, pruned_state_dict, save_pruned

__all__ = ["LayerPlan", "PrunePlan", "is_slimforge_pruned", "model_dims", "prune_model",
           "pruned_state_dict", "save_pruned"]
