"""Evolutionary search of the per-sublayer sparsity distribution under a fixed parameter budget.

A genome holds one level index per sublayer (index into that sublayer's list of candidate keep
counts, ordered from most kept to least kept, equally spaced within a kind). A mutation moves one
step of sparsity from one sublayer to another of the same kind (Týr-the-Pruner), so every genome
removes exactly the parameters of the starting one. With `cross_type`, a mutation may also trade
sparsity between attention and MLP sublayers: one sublayer is pruned a step further, then others
of any kind are un-pruned a step at a time while the removed total stays at or above the budget
(it overshoots by less than one step). On the embedded model this matters more than anything
else: its 2 key/value groups per layer make attention far more fragile than its MLPs (KL 0.14
keeping attention and pruning MLPs to a third, 1.52 pruning both by half). Offspring are ranked in stages on growing token budgets
(cheap evaluations weed out most of them before the full calibration set is spent); the best
genomes survive to the next generation (elitism). Fitness: KL(dense || pruned), lower is better.

The search state is checkpointed after every generation and resumed from there.
"""

from __future__ import annotations

import json
import logging
import math
import random
from pathlib import Path
from typing import Callable

import torch

from slimforge.cli_util import progress
from slimforge.io import atomic_dir, atomic_write_text
from stages.prune.calibration import KLProbe
from stages.prune.genome import apply_genome
from stages.prune.space import SearchSpace
from stages.prune.supernet import Criterion, build_supernet, load_supernet, save_supernet

log = logging.getLogger(__name__)

# The Search params that `evolve` takes as they are.
EVOLVE_SETTINGS = ("generations", "population", "offspring", "stages", "survive", "max_moves")


def mutate(genome: list[int], kinds: list[str], n_levels: list[int], rng: random.Random, moves: int,
           costs: list[list[int]] | None = None, budget: int | None = None) -> list[int]:
    """`moves` budget-neutral moves. Without `costs`: one sublayer of a kind one level sparser,
    another of the same kind one level less. With `costs` (weights removed per level, per
    sublayer): cross-type moves, see `_cross_type_move`, holding at least `budget` removed
    weights (default: what `genome` removes)."""
    g = list(genome)
    if costs is not None and budget is None:
        budget = sum(c[i] for c, i in zip(costs, g))
    for _ in range(moves):
        if costs is not None:
            g = _cross_type_move(g, n_levels, costs, budget, rng)
            continue
        kind = rng.choice(sorted(set(kinds)))
        same = [i for i, k in enumerate(kinds) if k == kind]
        up = [i for i in same if g[i] + 1 < n_levels[i]]
        down = [i for i in same if g[i] > 0]
        pairs = [(a, b) for a in up for b in down if a != b]
        if not pairs:
            continue
        a, b = rng.choice(pairs)
        g[a] += 1
        g[b] -= 1
    return g


def _cross_type_move(g: list[int], n_levels: list[int], costs: list[list[int]], budget: int,
                     rng: random.Random) -> list[int]:
    """Un-prune one sublayer by a step, prune random others a step at a time until the budget is
    met again, then un-prune random others (never the first) while it stays met. Steps of
    different kinds remove different numbers of weights, so one attention step may be paid for
    by two MLP steps; the final total exceeds the budget by less than one step."""
    g = list(g)
    removed = lambda: sum(c[i] for c, i in zip(costs, g))  # noqa: E731
    down = [b for b in range(len(g)) if g[b] > 0]
    if not down:
        return g
    b = rng.choice(down)
    before = list(g)
    g[b] -= 1
    while removed() < budget:
        up = [a for a in range(len(g)) if a != b and g[a] + 1 < n_levels[a]]
        if not up:
            return before  # nothing left to prune: the move is impossible
        a = rng.choice(up)
        g[a] += 1
    while True:
        spare = [c for c in range(len(g)) if c != b and g[c] > 0
                 and removed() - costs[c][g[c]] + costs[c][g[c] - 1] >= budget]
        if not spare:
            return g
        g[rng.choice(spare)] -= 1


def evolve(start: list[int], kinds: list[str], n_levels: list[int],
           fitness: Callable[[list[int], float], float], generations: int, population: int,
           offspring: int, stages: list[float], survive: float, max_moves: int, seed: int,
           checkpoint: Path | None = None, on_generation: Callable[[int, float], None] | None = None,
           costs: list[list[int]] | None = None, budget: int | None = None, desc: str = "search"
           ) -> tuple[list[int], float, list[float]]:
    """(best genome, its full-budget fitness, best fitness per generation). `costs` switches on
    cross-type moves (see `mutate`) that keep at least `budget` weights removed. Progress: a bar
    `desc` over generations, with the best fitness and the evaluations so far."""
    rng = random.Random(f"{seed}:evolve")
    state = json.loads(checkpoint.read_text()) if checkpoint is not None and checkpoint.exists() else None
    bar = progress(desc=desc, total=generations, initial=state["generation"] + 1 if state else 0, unit="generation",
                   log=log)
    shown, inner = {"best": "-", "evaluations": 0}, fitness

    def fitness(genome: list[int], fraction: float) -> float:  # `inner`, counted on the bar: a slow
        shown["evaluations"] += 1                               # generation still shows movement
        bar.set_postfix(shown)
        return inner(genome, fraction)

    if state is not None:
        pop = [(list(g), f) for g, f in state["population"]]
        history, first = state["history"], state["generation"] + 1
        rng.setstate(_to_rng_state(state["rng"]))
    else:
        pop, history, first = [(list(start), fitness(start, 1.0))], [], 0
        while len(pop) < population:  # seed the population around the start
            child = mutate(start, kinds, n_levels, rng, rng.randint(1, max_moves), costs, budget)
            pop.append((child, fitness(child, 1.0)))
        pop.sort(key=lambda x: x[1])
    for gen in range(first, generations):
        parents = [g for g, _ in pop[:max(2, population // 2)]]
        seen = {tuple(g) for g, _ in pop}
        children = []
        for _ in range(offspring * 4):
            if len(children) == offspring:
                break
            child = mutate(rng.choice(parents), kinds, n_levels, rng, rng.randint(1, max_moves), costs, budget)
            if tuple(child) not in seen:
                seen.add(tuple(child))
                children.append(child)
        scored = [(c, 0.0) for c in children]
        for i, frac in enumerate(stages):  # staged ranking on growing token budgets
            scored = sorted(((c, fitness(c, frac)) for c, _ in scored), key=lambda x: x[1])
            if i + 1 < len(stages):
                scored = scored[:max(1, math.ceil(len(scored) * survive))]
        pop = sorted(pop + scored, key=lambda x: x[1])[:population]
        history.append(pop[0][1])
        shown["best"] = f"{pop[0][1]:.4g}"
        bar.set_postfix(shown, refresh=False)
        bar.update(1)
        if on_generation is not None:
            on_generation(gen, pop[0][1])
        if checkpoint is not None:
            atomic_write_text(checkpoint, json.dumps({"generation": gen, "population": pop,
                                                      "history": history, "rng": rng.getstate()}))
    bar.close()
    return pop[0][0], pop[0][1], history


def _to_rng_state(saved) -> tuple:
    """JSON turned random's state tuple into lists; restore the tuple shape."""
    version, internal, gauss = saved
    return version, tuple(internal), gauss


def coarse_to_fine(dense: torch.nn.Module, work: torch.nn.Module, probe: KLProbe, space: SearchSpace,
                   criterion: Criterion, search: dict, seed: int, checkpoints: Path,
                   on_generation: Callable[[int, float], None] | None = None) -> tuple[list, list[float]]:
    """Týr's coarse-to-fine search: each round builds the supernet of candidate widths around the
    space's centre (checkpointed), evolves one level per sublayer against KL(dense || `work` with
    that genome applied), and re-centres on the best with half the step. `search` holds evolve's
    settings and `rounds`, `moves`, `topk_kl`. Returns (the last round's supernet, best KL per
    generation); the space ends centred on the best distribution."""
    history: list[float] = []
    for r in range(search["rounds"]):
        grid = space.grid()
        supernet = load_supernet(checkpoints / f"round{r}")
        if supernet is None:
            supernet = build_supernet(dense, probe.batches, space.sublayers, space.layouts, grid, criterion)
            with atomic_dir(checkpoints / f"round{r}") as tmp:
                save_supernet(supernet, tmp)

        def fitness(genome: list[int], fraction: float, grid=grid, supernet=supernet) -> float:
            apply_genome(work, supernet, space.sublayers, [grid[s][i] for s, i in enumerate(genome)])
            return probe(work, fraction, search["topk_kl"])

        offset = len(history)
        best, _, hist = evolve(
            [grid[s].index(space.centre[s]) for s in range(len(grid))], space.kinds, [len(x) for x in grid], fitness,
            **{k: search[k] for k in EVOLVE_SETTINGS}, seed=seed + r, checkpoint=checkpoints / f"round{r}.search.json",
            on_generation=None if on_generation is None else lambda gen, kl: on_generation(offset + gen + 1, kl),
            costs=space.costs(grid) if search["moves"] == "cross_type" else None, budget=space.budget,
            desc=f"search round {r + 1}/{search['rounds']}")
        history += hist
        space.refine([grid[s][i] for s, i in enumerate(best)])
    return supernet, history
