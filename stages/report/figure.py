"""The report's figure: base-family accuracy (with its interval) against size on disk, one point per
model, labelled, so the compression trade-off reads at a glance."""

from __future__ import annotations

from pathlib import Path


def size_accuracy_plot(path_stem: Path, rows: list[dict]) -> list[Path]:
    """`<stem>.png` (no CSV: the numbers are the report's table and metrics)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path_stem.parent.mkdir(parents=True, exist_ok=True)
    png = path_stem.with_suffix(".png")
    points = [(r["model"], r["bytes"] / 1e6, r["base families"]) for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, mb, a in points:
        below, above = max(0.0, a["value"] - a["lo"]), max(0.0, a["hi"] - a["value"])  # bootstrap bounds may sit
        ax.errorbar(mb, a["value"], yerr=[[below], [above]], fmt="o", capsize=3)  # a hair inside the value
        ax.annotate(name, (mb, a["value"]), textcoords="offset points", xytext=(6, 6), fontsize=8)
    ax.set_xlabel("size on disk (MB)")
    ax.set_ylabel("base-family accuracy, test (95% interval)")
    ax.set_title("report: accuracy vs size of each model in the pipeline")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return [png]
