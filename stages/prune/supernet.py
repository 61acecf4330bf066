"""The Týr-the-Pruner supernet: every prunable sublayer pruned locally at several sparsity levels.

Sublayers are the attention block and the MLP of every layer, visited in forward order. For each
sublayer the statistics of its output projection's input are taken with all earlier sublayers
set to their *expected* pruned weights -- the mean of their candidates over the levels -- so the
pruning error that a searched model will carry into this layer is already in its inputs
(expectation error accumulation), rather than the dense model's inputs.

A candidate is the sublayer's output projection in dense shape: removed units' columns zero,
kept columns as selected (or least-squares refit). Masking the output projection is exactly
equivalent to cutting the unit out, so the search evaluates candidates without any surgery.
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from slimforge.cli_util import progress
from slimforge.pruning.surgery import head_index
from stages.prune.calibration import input_stats
from stages.prune.criteria import magnitude_scores, obs_select, refit, top_units, wanda_scores

log = logging.getLogger(__name__)


@dataclass
class Layout:
    """How one sublayer splits into prunable units."""

    kind: str                    # "attn" | "mlp"
    units: list[torch.Tensor]    # the output-projection columns each unit owns
    blocks: list[list[int]]      # unit ids per block; every block keeps the same number
    unit_params: int             # weights removed with one unit
    total_params: int            # weights of the whole sublayer

    @property
    def per_block(self) -> int:
        return len(self.blocks[0])


def attention_layout(num_heads: int, num_kv_heads: int, head_dim: int, hidden: int, unit: str) -> Layout:
    """unit 'group': a key/value head with every query head reading it; 'query': single query
    heads, the same number kept inside every group (key/value heads all stay)."""
    g = num_heads // num_kv_heads
    total = num_kv_heads * (2 * g + 2) * head_dim * hidden
    if unit == "group":
        units = [head_index(list(range(kv * g, (kv + 1) * g)), head_dim) for kv in range(num_kv_heads)]
        return Layout("attn", units, [list(range(num_kv_heads))], (2 * g + 2) * head_dim * hidden, total)
    units = [head_index([h], head_dim) for h in range(num_heads)]
    blocks = [list(range(kv * g, (kv + 1) * g)) for kv in range(num_kv_heads)]
    return Layout("attn", units, blocks, 2 * head_dim * hidden, total)


def mlp_layout(intermediate: int, hidden: int) -> Layout:
    return Layout("mlp", [torch.tensor([c]) for c in range(intermediate)], [list(range(intermediate))],
                  3 * hidden, 3 * hidden * intermediate)


def output_proj(model: torch.nn.Module, layer: int, kind: str) -> torch.nn.Linear:
    block = model.model.layers[layer]
    return block.self_attn.o_proj if kind == "attn" else block.mlp.down_proj


def unit_weight_slices(model: torch.nn.Module, layer: int, layout: Layout, head_dim: int, group: int,
                       unit_mode: str) -> list[list[torch.Tensor]]:
    """Every weight slice each unit owns (for magnitude scores)."""
    block = model.model.layers[layer]
    if layout.kind == "mlp":
        m = block.mlp
        return [[m.gate_proj.weight[c], m.up_proj.weight[c], m.down_proj.weight[:, c]] for c in range(len(layout.units))]
    a = block.self_attn
    out = []
    for u, cols in enumerate(layout.units):
        slices = [a.q_proj.weight[cols], a.o_proj.weight[:, cols]]
        if unit_mode == "group":
            kv = head_index([u], head_dim)
            slices += [a.k_proj.weight[kv], a.v_proj.weight[kv]]
        out.append(slices)
    return out


@dataclass
class Candidate:
    kept: list[int]          # kept unit ids
    weight: torch.Tensor     # output projection, dense shape, removed columns zero


@dataclass
class Criterion:
    """How a sublayer's units are ranked, and what the kept units' output projection becomes."""

    name: str                     # obs | loraprune | wanda | magnitude
    refit: bool                   # least-squares refit of the kept output-projection columns
    obs_rounds: int               # OBS removal rounds (costs recomputed after each)
    damp: float                   # Hessian damping, share of its mean diagonal
    head_dim: int
    group: int                    # query heads per key/value head
    attention_unit: str           # group | query
    unit_scores: dict[tuple[int, str], torch.Tensor] | None = None  # loraprune's importance per sublayer


def build_supernet(model: torch.nn.Module, batches: list[dict], sublayers: list[tuple[int, str]],
                   layouts: dict[str, Layout], keeps: list[list[int]], criterion: Criterion
                   ) -> list[dict[int, Candidate]]:
    """Candidates {units kept per block: Candidate} for every sublayer, in `sublayers` order."""
    work = copy.deepcopy(model)
    supernet = []
    for s, (layer, kind) in enumerate(progress(sublayers, desc=f"supernet ({criterion.name})", unit="sublayer",
                                               log=log)):
        layout = layouts[kind]
        proj = output_proj(work, layer, kind)
        dense_w = output_proj(model, layer, kind).weight.detach()
        h, norms = input_stats(work, proj, batches)
        c = criterion
        if c.name == "wanda":
            scores = wanda_scores(dense_w.float(), norms.float(), layout.units)
        elif c.name == "magnitude":
            scores = magnitude_scores(unit_weight_slices(model, layer, layout, c.head_dim, c.group, c.attention_unit))
        elif c.name == "loraprune":
            scores = c.unit_scores[(layer, kind)]
        cands = {}
        for keep in keeps[s]:
            if c.name == "obs":
                kept = obs_select(dense_w, h, layout.units, keep, layout.blocks, c.obs_rounds, c.damp)
            else:
                kept = top_units(scores, keep, layout.blocks)
            cols = torch.cat([layout.units[u] for u in kept])
            w = torch.zeros_like(dense_w)
            everything = len(kept) == len(layout.units)  # nothing removed, nothing to compensate
            w[:, cols] = refit(dense_w, h, cols, c.damp) if c.refit and not everything else dense_w[:, cols]
            cands[keep] = Candidate(kept, w)
        with torch.no_grad():  # expected weights feed every later sublayer's statistics
            proj.weight.copy_(torch.stack([c.weight for c in cands.values()]).mean(0))
        supernet.append(cands)
    return supernet


def save_supernet(supernet: list[dict[int, Candidate]], folder: Path) -> None:
    """Write into `folder` (the caller makes it appear atomically)."""
    tensors = {f"{s}.{k}": c.weight.contiguous() for s, cands in enumerate(supernet) for k, c in cands.items()}
    save_file(tensors, str(folder / "candidates.safetensors"))
    (folder / "kept.json").write_text(json.dumps([{str(k): c.kept for k, c in cands.items()} for cands in supernet]))


def load_supernet(folder: Path) -> list[dict[int, Candidate]] | None:
    if not (folder / "kept.json").exists():
        return None
    tensors = load_file(str(folder / "candidates.safetensors"))
    kept = json.loads((folder / "kept.json").read_text())
    return [{int(k): Candidate(v, tensors[f"{s}.{k}"]) for k, v in cands.items()} for s, cands in enumerate(kept)]
