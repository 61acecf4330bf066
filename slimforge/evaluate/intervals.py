"""95% intervals for accuracies: a stratified percentile bootstrap over the test problems.

A macro mean over families (`accuracy_base`) is resampled family by family (each family's problems
drawn with replacement, its size kept), so the interval reflects how many problems each family has:
with 94 `mul` problems carrying a third of `accuracy_base`'s weight, that weight is the noisy part.

    lo, hi = macro_interval({"add": [True, False, ...], "mul": [...]}, ["add", "mul"])
"""

from __future__ import annotations

import numpy as np

REPS = 2000  # percentile endpoints move by < 0.002 between seeds at this many resamples


def macro_interval(hits: dict[str, list[bool]], families: list[str], level: float = 0.95,
                   reps: int = REPS, seed: int = 0) -> dict[str, float]:
    """{"lo", "hi"}: the `level` percentile-bootstrap interval of the mean over `families` of each
    family's share of hits. Deterministic (fixed `seed`), so a rerun writes the same numbers."""
    rng = np.random.default_rng(seed)
    means = np.zeros(reps)
    for family in families:
        h = np.asarray(hits[family], dtype=np.float64)
        means += h[rng.integers(0, len(h), size=(reps, len(h)))].mean(axis=1)
    means /= len(families)
    tail = (1 - level) / 2
    lo, hi = np.quantile(means, [tail, 1 - tail])
    return {"lo": float(lo), "hi": float(hi)}


def accuracy_with_intervals(hits: dict[str, list[bool]], macro: dict[str, list[str]]) -> dict:
    """Accuracy per family, each macro mean named in `macro` ({name: families}), the problem count
    per family (`n`) and a 95% interval for every one of them (`ci95`)."""
    out: dict = {"accuracy": {f: sum(h) / len(h) for f, h in sorted(hits.items())},
                 "n": {f: len(h) for f, h in sorted(hits.items())},
                 "ci95": {"accuracy": {f: macro_interval(hits, [f]) for f in sorted(hits)}}}
    for name, families in macro.items():
        present = [f for f in families if f in hits]
        if present:
            out[name] = sum(out["accuracy"][f] for f in present) / len(present)
            out["ci95"][name] = macro_interval(hits, present)
    return out
