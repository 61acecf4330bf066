"""The compression Pareto frontier over a sweep's candidates: which (recipe, model) pairs no other
beats on both accuracy and cost, and the best one under a budget. Pure functions; the sweep flow
(flows/sweep.py) feeds them and draws the plot.

A candidate is a dict with at least "accuracy" (a validation score: the frontier selects) and the
cost keys asked for ("bytes": lower is better; "tokens_per_s": higher is better); "test" ({"value",
"lo", "hi"}), when present, is shown beside it and never used to choose.
"""

from __future__ import annotations

from pathlib import Path

# +1: higher is better, -1: lower is better
DIRECTION = {"accuracy": 1, "bytes": -1, "tokens_per_s": 1}


def dominates(a: dict, b: dict, keys: tuple[str, ...]) -> bool:
    """a is at least as good as b on every key and strictly better on one."""
    better = [DIRECTION[k] * (a[k] - b[k]) for k in keys]
    return all(d >= 0 for d in better) and any(d > 0 for d in better)


def frontier(points: list[dict], cost: str) -> list[bool]:
    """Whether each point is non-dominated on (accuracy, cost). Exact ties are both kept: neither
    dominates the other."""
    keys = ("accuracy", cost)
    return [not any(dominates(q, p, keys) for q in points) for p in points]


def best_under_budget(points: list[dict], max_bytes: float | None = None,
                      min_tokens_per_s: float | None = None) -> int | None:
    """Index of the most accurate point within the budget (ties: fewer bytes, then the first), or
    None when no point fits."""
    fits = [i for i, p in enumerate(points)
            if (max_bytes is None or p["bytes"] <= max_bytes)
            and (min_tokens_per_s is None or p.get("tokens_per_s", 0.0) >= min_tokens_per_s)]
    if not fits:
        return None
    return min(fits, key=lambda i: (-points[i]["accuracy"], points[i]["bytes"], i))


def markdown(points: list[dict], on_size: list[bool], on_speed: list[bool] | None, label_keys: list[str]) -> str:
    """One row per candidate, frontier members marked, most accurate first."""
    speed = on_speed is not None
    test = all("test" in p for p in points)
    head = ["point", *label_keys, "model", "val accuracy [95% CI]", *(["test accuracy [95% CI]"] if test else []),
            "MB", *(["tokens/s"] if speed else []),
            "frontier (size)", *(["frontier (speed)"] if speed else [])]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    order = sorted(range(len(points)), key=lambda i: (-points[i]["accuracy"], points[i]["bytes"]))
    for i in order:
        p = points[i]
        cells = [p["point"], *(str(p["params"].get(k, "")) for k in label_keys), p["model"],
                 f"{p['accuracy']:.3f} [{p['lo']:.3f}, {p['hi']:.3f}]",
                 *([f"{p['test']['value']:.3f} [{p['test']['lo']:.3f}, {p['test']['hi']:.3f}]"] if test else []),
                 f"{p['bytes'] / 1e6:.3f}",
                 *([f"{p['tokens_per_s']:.0f}"] if speed else []), "**yes**" if on_size[i] else "",
                 *((["**yes**" if on_speed[i] else ""]) if speed else [])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(points: list[dict], on_size: list[bool], on_speed: list[bool] | None, path: Path) -> Path:
    """Accuracy vs MB (and vs tokens/s when measured): every candidate as a dot with its 95%
    interval, the frontier joined by a line, its points labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("bytes", on_size, "MB on disk (lower is better)")]
    if on_speed is not None:
        panels.append(("tokens_per_s", on_speed, "decode tokens/s, batch 1 (higher is better)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.8), squeeze=False)
    for ax, (key, on, xlabel) in zip(axes[0], panels):
        scale = 1e-6 if key == "bytes" else 1.0
        xs = [p[key] * scale for p in points]
        ys = [p["accuracy"] for p in points]
        err = [[p["accuracy"] - p["lo"] for p in points], [p["hi"] - p["accuracy"] for p in points]]
        ax.errorbar(xs, ys, yerr=err, fmt="o", color="0.6", ecolor="0.8", label="dominated", zorder=1)
        front = sorted(((x, y, p) for x, y, p, f in zip(xs, ys, points, on) if f), key=lambda t: t[:2])
        ax.plot([x for x, _, _ in front], [y for _, y, _ in front], "o-", color="C3", label="Pareto frontier", zorder=2)
        for x, y, p in front:
            ax.annotate(f"{p['point']}:{p['model']}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("accuracy, base families (val)")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    fig.suptitle("sweep: accuracy vs cost")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
