"""The search's state in one object: which sublayers are pruned, how each splits into units, the
parameter budget, and the coarse-to-fine grid of candidate widths around the current centre.

    space = search_space(dims, n_layers, sparsity=0.5, attention_unit="group", mlp_round_to=16,
                         delta=0.125, levels=2)
    grid = space.grid()          # candidate keep counts per sublayer, this round
    space.refine(best_keeps)     # next round: centred on the best, half the step
"""

from __future__ import annotations

from dataclasses import dataclass

from stages.prune.genome import level_grid, removed_weights, uniform_keep
from stages.prune.supernet import Layout, attention_layout, mlp_layout


@dataclass
class SearchSpace:
    sublayers: list[tuple[int, str]]   # (layer, "attn" | "mlp"), each layer's attention then MLP
    layouts: dict[str, Layout]         # how a sublayer of each kind splits into prunable units
    uniform: list[int]                 # keep count per sublayer of the uniform prune at the target
    centre: list[int]                  # keep counts this round's grid is centred on
    step: dict[str, int]               # distance between grid levels, per kind
    levels: int                        # grid levels each side of the centre
    round_to: int                      # MLP keep counts are multiples of this

    @property
    def kinds(self) -> list[str]:
        return [kind for _, kind in self.sublayers]

    @property
    def budget(self) -> int:
        """Weights every genome must remove: what the uniform prune removes."""
        return self.removed(self.uniform)

    @property
    def total(self) -> int:
        """Weights of every prunable sublayer."""
        return sum(self.layouts[k].total_params for k in self.kinds)

    def removed(self, keeps: list[int]) -> int:
        return sum(removed_weights(self.layouts[k], keep) for k, keep in zip(self.kinds, keeps))

    def lowest(self, kind: str) -> int:
        return 1 if kind == "attn" else self.round_to

    def grid(self) -> list[list[int]]:
        """Candidate keep counts per sublayer (most kept first) around the centre."""
        return [level_grid(c, self.step[k], self.levels, self.lowest(k), self.layouts[k].per_block)
                for c, k in zip(self.centre, self.kinds)]

    def costs(self, grid: list[list[int]]) -> list[list[int]]:
        """Weights removed at each grid level, per sublayer (for budget-keeping cross-type moves)."""
        return [[removed_weights(self.layouts[k], keep) for keep in levels] for k, levels in zip(self.kinds, grid)]

    def refine(self, keeps: list[int]) -> None:
        """Centre the next round on `keeps` with half the step (MLP steps stay multiples of round_to)."""
        self.centre = list(keeps)
        self.step = {"attn": max(1, self.step["attn"] // 2),
                     "mlp": max(self.round_to, self.step["mlp"] // 2 // self.round_to * self.round_to)}

    def attention_kept(self, budget: int) -> list[int] | None:
        """The control genome: every attention head kept, MLPs pruned as uniformly as `round_to`
        allows to remove `budget` weights. Widths are multiples of `round_to` (or the full width)
        and differ between layers by at most one step; of the totals reachable that way the one
        nearest `budget` is taken (a tie goes to removing more, as the search's budget rule), so it
        misses `budget` by at most half of one layer's rounding step (3 * hidden * round_to
        weights). None when no such genome comes that close (the MLPs alone cannot carry the budget)."""
        mlp, n = self.layouts["mlp"], self.kinds.count("mlp")
        widths = sorted({mlp.per_block, *range(self.round_to, mlp.per_block + 1, self.round_to)})
        mean = mlp.per_block - budget / (mlp.unit_params * n)  # the exact (unrounded) uniform width
        options = []  # (|miss|, -removed, keeps): `wide` layers at `hi`, the rest at `lo`, spread evenly
        for lo, hi in zip(widths, widths[1:] + widths[-1:]):
            if lo - self.round_to <= mean <= hi + self.round_to:
                for wide in range(n + 1):
                    keeps = [hi if (i + 1) * wide // n > i * wide // n else lo for i in range(n)]
                    removed = sum(removed_weights(mlp, k) for k in keeps)
                    options.append((abs(removed - budget), -removed, keeps))
        if not options:
            return None
        miss, _, keeps = min(options)
        if 2 * miss > mlp.unit_params * self.round_to:
            return None  # attention alone is too large a share: MLPs cannot carry the budget
        mlp_keeps = iter(keeps)
        return [self.layouts["attn"].per_block if k == "attn" else next(mlp_keeps) for k in self.kinds]

    def sparsity_per_layer(self, keeps: list[int], kind: str) -> list[float]:
        """Share of each layer's `kind` sublayer that `keeps` removes (for the plot)."""
        return [1 - keep / self.layouts[kind].per_block for keep, k in zip(keeps, self.kinds) if k == kind]


def search_space(dims: dict[str, int], n_layers: int, sparsity: float, attention_unit: str, mlp_round_to: int,
                 delta: float, levels: int) -> SearchSpace:
    """The space of a model with `dims` (slimforge.pruning.model_dims), centred on the uniform prune."""
    layouts = {"attn": attention_layout(dims["num_heads"], dims["num_kv_heads"], dims["head_dim"],
                                        dims["hidden_size"], attention_unit),
               "mlp": mlp_layout(dims["intermediate_size"], dims["hidden_size"])}
    sublayers = [(i, kind) for i in range(n_layers) for kind in ("attn", "mlp")]
    uniform = [uniform_keep(layouts[k], sparsity, mlp_round_to) for _, k in sublayers]
    step = {"attn": max(1, round(delta * layouts["attn"].per_block)),
            "mlp": max(mlp_round_to, round(delta * layouts["mlp"].per_block / mlp_round_to) * mlp_round_to)}
    return SearchSpace(sublayers, layouts, uniform, list(uniform), step, levels, mlp_round_to)
