"""Genome helpers for the prune search: a genome is one kept-unit count per sublayer.

Used by stages/prune/__init__.py; turns keep counts into budgets, grids, masked weights and the
physical plan.
"""

from __future__ import annotations

import torch

from slimforge import SlimforgeError
from slimforge.pruning import LayerPlan, PrunePlan
from slimforge.pruning.surgery import head_index
from stages.prune.supernet import Candidate, Layout, output_proj


def uniform_keep(layout: Layout, sparsity: float, round_to: int) -> int:
    """Units kept per block when this sublayer alone loses `sparsity` of its weights (MLP widths
    rounded to a multiple of `round_to`)."""
    remove = round(sparsity * layout.total_params / (layout.unit_params * len(layout.blocks)))
    keep = layout.per_block - remove
    if layout.kind == "mlp":
        keep = round(keep / round_to) * round_to
    if keep < 1:
        what = "head group" if layout.kind == "attn" else "MLP channel"
        raise SlimforgeError(f"sparsity {sparsity} would remove every {what} of a layer (each block has "
                             f"{layout.per_block} units); lower the sparsity"
                             + (" or use attention_unit: group" if layout.kind == "attn" else ""))
    return keep


def removed_weights(layout: Layout, keep: int) -> int:
    """Weights a sublayer loses when every block keeps `keep` units."""
    return layout.unit_params * (layout.per_block - keep) * len(layout.blocks)


def level_grid(centre: int, step: int, levels: int, lowest: int, highest: int) -> list[int]:
    """Keep counts centre + j*step for |j| <= levels within [lowest, highest], most kept first."""
    return sorted({centre + j * step for j in range(-levels, levels + 1) if lowest <= centre + j * step <= highest},
                  reverse=True)


def apply_genome(model: torch.nn.Module, supernet: list[dict[int, Candidate]], sublayers, keeps: list[int]) -> None:
    """Put each sublayer's candidate at `keeps[s]` into `model`'s output projections (masking)."""
    for (layer, kind), cands, keep in zip(sublayers, supernet, keeps):
        output_proj(model, layer, kind).weight.data = cands[keep].weight


def lora_unit_scores(imp: dict[str, torch.Tensor], n_layers: int, head_dim: int, group: int, unit: str,
                     layouts: dict[str, Layout]) -> dict[tuple[int, str], torch.Tensor]:
    """Sum element importances over every weight each head/group/channel owns."""
    out = {}
    for i in range(n_layers):
        p = f"model.layers.{i}."
        q, k, v, o = (imp[p + f"self_attn.{n}_proj"] for n in "qkvo")
        heads = torch.stack([q[head_index([h], head_dim)].sum() + o[:, head_index([h], head_dim)].sum()
                             for h in range(q.shape[0] // head_dim)])
        if unit == "group":
            kv = torch.stack([k[head_index([j], head_dim)].sum() + v[head_index([j], head_dim)].sum()
                              for j in range(k.shape[0] // head_dim)])
            heads = heads.view(-1, group).sum(1) + kv
        out[(i, "attn")] = heads
        gate, up, down = (imp[p + f"mlp.{n}_proj"] for n in ("gate", "up", "down"))
        out[(i, "mlp")] = gate.sum(1) + up.sum(1) + down.sum(0)
    assert all(len(out[(0, k)]) == len(layouts[k].units) for k in layouts)
    return out


def plan_and_weights(model, dims: dict, arch: str, unit: str, supernet, sublayers, keeps: list[int],
                     meta: dict) -> tuple[PrunePlan, dict[str, torch.Tensor]]:
    """The physical plan of a genome, and the kept columns of its output projections."""
    g, hd, n_layers = dims["num_heads"] // dims["num_kv_heads"], dims["head_dim"], model.config.num_hidden_layers
    layers = [LayerPlan([], [], []) for _ in range(n_layers)]
    replace = {}
    for (layer, kind), cands, keep in zip(sublayers, supernet, keeps):
        cand = cands[keep]
        lp = layers[layer]
        if kind == "attn":
            if unit == "group":
                lp.kv_heads = cand.kept
                lp.q_heads = [h for kv in cand.kept for h in range(kv * g, (kv + 1) * g)]
            else:
                lp.q_heads, lp.kv_heads = cand.kept, list(range(dims["num_kv_heads"]))
            cols, name = head_index(lp.q_heads, hd), f"model.layers.{layer}.self_attn.o_proj.weight"
        else:
            lp.channels = cand.kept
            cols, name = torch.tensor(cand.kept), f"model.layers.{layer}.mlp.down_proj.weight"
        replace[name] = cand.weight[:, cols.to(cand.weight.device)].contiguous()
    return PrunePlan(arch=arch, layers=layers, meta=meta, **dims), replace
