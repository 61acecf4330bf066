"""Plot files DVC declares: a CSV/TSV for `dvc plots show`, and a PNG for people."""

from __future__ import annotations

from pathlib import Path

from slimforge.io import atomic_write_text


def write_curve(path_stem: str | Path, xs: list, series: dict[str, list[float]], xlabel: str,
                title: str, smooth: int = 1) -> tuple[Path, Path]:
    """Write `<stem>.csv` (x plus one column per series) and `<stem>.png`. `smooth` > 1 draws a
    running mean over that many points beside the raw curve (per-step losses are noisy)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stem = Path(path_stem)
    csv, png = stem.with_suffix(".csv"), stem.with_suffix(".png")
    names = list(series)
    rows = [",".join([xlabel, *names])]
    rows += [",".join([str(x), *(f"{series[n][i]:.6g}" for n in names)]) for i, x in enumerate(xs)]
    atomic_write_text(csv, "\n".join(rows) + "\n")

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    for name in names:
        ys = series[name]
        ax.plot(xs, ys, alpha=0.35 if smooth > 1 else 1.0, label=name if smooth <= 1 else f"{name} (raw)")
        if smooth > 1 and len(ys) >= smooth:
            run = [sum(ys[i - smooth + 1:i + 1]) / smooth for i in range(smooth - 1, len(ys))]
            ax.plot(xs[smooth - 1:], run, label=f"{name} (mean of {smooth})")
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    values = [y for ys in series.values() for y in ys]
    if values and all(y > 0 for y in values):  # a 0% prune has KL 0: stay linear
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = png.with_name(f".{png.name}.tmp.png")
    fig.savefig(tmp, metadata={"Software": None})  # no version/timestamp: stable bytes for DVC
    plt.close(fig)
    tmp.replace(png)
    return csv, png


def write_bars(path_stem: str | Path, categories: list[str], series: dict[str, list[float]], ylabel: str,
               title: str) -> tuple[Path, Path]:
    """Grouped bar chart: `<stem>.csv` (category plus one column per series) and `<stem>.png`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stem = Path(path_stem)
    csv, png = stem.with_suffix(".csv"), stem.with_suffix(".png")
    names = list(series)
    rows = [",".join(["name", *names])]
    rows += [",".join([c, *(f"{series[n][i]:.6g}" for n in names)]) for i, c in enumerate(categories)]
    atomic_write_text(csv, "\n".join(rows) + "\n")
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(categories)), 3.5), dpi=100)
    width = 0.8 / len(names)
    for j, name in enumerate(names):
        ax.bar([i + j * width for i in range(len(categories))], series[name], width, label=name)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(categories))], categories, rotation=45, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3, axis="y")
    ax.legend()
    fig.tight_layout()
    tmp = png.with_name(f".{png.name}.tmp.png")
    fig.savefig(tmp, metadata={"Software": None})
    plt.close(fig)
    tmp.replace(png)
    return csv, png
