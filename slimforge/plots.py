"""Plot files DVC declares: a CSV/TSV for `dvc plots show`, and a PNG for people.

A CSV whose series follow params (LoRA's runs, quantize's target matrices) is long: one row per point,
a column naming its series (`run`, `matrix`) and one value column, so dvc.yaml declares one x and one y
whatever the params; a template in .dvc/plots colours or places by that column. The others are one x
column then one column per series (DVC draws several y columns of one file as several series).
dvc.yaml declares each chart's x, y and template; tests/test_plots.py renders them.
"""

from __future__ import annotations

from pathlib import Path

from slimforge.io import atomic_write_text


def _write_table(csv: Path, xlabel: str, xs: list, series: dict[str, list[float]]) -> None:
    names = list(series)
    rows = [",".join([xlabel, *names])]
    rows += [",".join([str(x), *(f"{series[n][i]:.6g}" for n in names)]) for i, x in enumerate(xs)]
    atomic_write_text(csv, "\n".join(rows) + "\n")


def _cell(value) -> str:
    return value if isinstance(value, str) else f"{value:.6g}"


def _write_long(csv: Path, header: list[str], rows: list[list]) -> None:
    """One row per point: `header` names the columns, each row holds labels (str) or numbers."""
    lines = [",".join(header)] + [",".join(_cell(v) for v in row) for row in rows]
    atomic_write_text(csv, "\n".join(lines) + "\n")


def _save(fig, png: Path) -> None:
    import matplotlib.pyplot as plt

    tmp = png.with_name(f".{png.name}.tmp.png")
    fig.savefig(tmp, metadata={"Software": None})  # no version/timestamp: stable bytes for DVC
    plt.close(fig)
    tmp.replace(png)


def write_curve(path_stem: str | Path, xs: list, series: dict[str, list[float]], xlabel: str,
                title: str, smooth: int = 1, long: tuple[str, str] | None = None) -> tuple[Path, Path]:
    """Write `<stem>.csv` (x plus one column per series) and `<stem>.png`. `smooth` > 1 draws a
    running mean over that many points beside the raw curve (per-step losses are noisy). `long` =
    (series column, value column), e.g. ("run", "loss"): the CSV is `x,run,loss` instead, one row per x
    per series, series after series, so its columns stay the same whichever series a run has."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stem = Path(path_stem)
    csv, png = stem.with_suffix(".csv"), stem.with_suffix(".png")
    names = list(series)
    if long:
        _write_long(csv, [xlabel, *long], [[x, n, series[n][i]] for n in names for i, x in enumerate(xs)])
    else:
        _write_table(csv, xlabel, xs, series)

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
    _save(fig, png)
    return csv, png


def write_bars(path_stem: str | Path, categories: list[str], series: dict[str, list[float]], ylabel: str,
               title: str) -> tuple[Path, Path]:
    """Grouped bar chart: `<stem>.csv` (`name` plus one column per series) and `<stem>.png`, the legend
    beside the axes so it covers no bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stem = Path(path_stem)
    csv, png = stem.with_suffix(".csv"), stem.with_suffix(".png")
    names = list(series)
    _write_table(csv, "name", categories, series)
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(categories)) + 1.6, 3.5), dpi=100)
    width = 0.8 / len(names)
    for j, name in enumerate(names):
        ax.bar([i + j * width for i in range(len(categories))], series[name], width, label=name)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(categories))], categories, rotation=45, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    _save(fig, png)
    return csv, png


def write_grid(path_stem: str | Path, rows: list[str], columns: dict[str, list[float]], title: str,
               value_label: str, cell_text: dict[str, list[str]] | None = None,
               labels: tuple[str, str] = ("layer", "matrix"),
               extra: dict[str, dict[str, list[float]]] | None = None) -> tuple[Path, Path]:
    """A rows x columns table coloured by value (one colour per distinct value, e.g. bits per matrix):
    `<stem>.csv`, long: one row per cell, `<row label>,<column label>,<value_label>` then one column per
    entry of `extra` (name -> the same layout as `columns`, e.g. each matrix's group size), rows in
    order, each row's columns in order (e.g. `layer,matrix,bits,group`); and `<stem>.png` with each cell
    labelled (`cell_text`, default the value) and the legend, with how many cells take each value,
    beside the grid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import BoundaryNorm, ListedColormap
    from matplotlib.patches import Patch

    stem = Path(path_stem)
    csv, png = stem.with_suffix(".csv"), stem.with_suffix(".png")
    names = list(columns)
    extra = extra or {}
    _write_long(csv, [*labels, value_label, *extra], [[row, c, columns[c][r], *(e[c][r] for e in extra.values())]
                                                      for r, row in enumerate(rows) for c in names])
    grid = [[columns[c][r] for c in names] for r in range(len(rows))]
    levels = sorted({v for row in grid for v in row})
    # one colour per level, evenly along a light-to-dark map: 2, 3 and 4 bits are told apart at a glance
    base = plt.get_cmap("YlGnBu")
    colours = [base(0.25 + 0.6 * i / max(1, len(levels) - 1)) for i in range(len(levels))]
    index = [[levels.index(v) for v in row] for row in grid]
    fig, ax = plt.subplots(figsize=(1.6 + 0.75 * len(names) + 1.8, 1.3 + 0.4 * len(rows)), dpi=100)
    ax.imshow(index, cmap=ListedColormap(colours), norm=BoundaryNorm([i - 0.5 for i in range(len(levels) + 1)],
                                                                       len(levels)), aspect="auto")
    for r in range(len(rows)):
        for c, name in enumerate(names):
            text = cell_text[name][r] if cell_text else f"{grid[r][c]:g}"
            dark = index[r][c] > (len(levels) - 1) / 2 and len(levels) > 1
            ax.text(c, r, text, ha="center", va="center", fontsize=9, color="white" if dark else "black")
    ax.set_xticks(range(len(names)), names)
    ax.xaxis.tick_top()
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xticks([i - 0.5 for i in range(1, len(names))], minor=True)
    ax.set_yticks([i - 0.5 for i in range(1, len(rows))], minor=True)
    ax.grid(which="minor", color="white", linewidth=1.5)
    ax.tick_params(which="both", length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    counts = [sum(row.count(i) for row in index) for i in range(len(levels))]
    ax.legend([Patch(color=colours[i]) for i in range(len(levels))],
              [f"{v:g} {value_label}: {n} of {sum(counts)}" for v, n in zip(levels, counts)],
              loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
    fig.suptitle(title, fontsize=10)  # above the column labels, which sit on top of the grid
    fig.tight_layout()
    _save(fig, png)
    return csv, png
