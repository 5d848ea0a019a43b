"""Figures shared by the report and the analyses: the accuracy-vs-cost Pareto plot of a harness run,
method display names, and the sizes every figure is written at.

matplotlib is an optional extra (``pip install otprune[analysis]``): this module imports it only
inside the functions that draw, so ``otprune report`` can still write its tables without it.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

__all__ = [
    "AXES",
    "DPI",
    "SELECTOR_NAMES",
    "annotate",
    "display_name",
    "pareto_figure",
    "pareto_front",
    "point_label",
    "separate_labels",
    "style",
    "write_pareto_figures",
]

# Written at 150 dpi with 10–11 pt text: legible when the PNG is viewed at its own size.
DPI = 150
STYLE = {"font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10, "legend.fontsize": 9, "xtick.labelsize": 9, "ytick.labelsize": 9}

# Selector keys (otprune.selectors.SELECTORS, the patch's BASELINE values) -> the paper's names.
SELECTOR_NAMES = {
    "OURS": "OTPrune",
    "DIVPRUNE": "DivPrune",
    "DPP": "DPP",
    "RANDOM": "Random",
    "FIRST": "First-k",
    "LAST": "Last-k",
    "UNIFORM": "Uniform",
    "TRIM": "TrimTokenator",
    "STP": "STP",
    "ORIG": "Original",
    "FASTV": "FastV",
    "VTW": "VTW",
}

# The report's x axes: CSV column -> axis label with its unit.
AXES = {
    "tflop": "LLM prefill (TFLOP)",
    "visual_tokens_after": "kept visual tokens per image",
}


def display_name(key: str) -> str:
    """The paper's name for a selector key (``OURS`` -> ``OTPrune``); unknown keys unchanged."""
    return SELECTOR_NAMES.get(key, key)


def style():
    """A matplotlib ``rc_context`` with the shared font sizes."""
    import matplotlib

    return matplotlib.rc_context(STYLE)


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices (ascending) of the points ``(cost, score)`` no other point dominates: none has
    cost <= and score >= with one of them strict. Equal points are all on the front."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], -math.inf
    for i in order:
        cost, score = points[i]
        if score > best or (front and points[front[-1]] == (cost, score)):
            front.append(i)
            best = max(best, score)
    return sorted(front)


def point_label(row: dict) -> str:
    """``OTPrune 0.098``; the methods without a ratio (Original, VTW) by name alone."""
    if row["method"] in ("Original", "VTW"):
        return row["method"]
    return f"{row['method']} {float(row['ratio']):g}"


def annotate(ax, labelled: Sequence[tuple[tuple[float, float], str]]) -> None:
    """Writes each point's label beside it, level with it (the names of points at one place joined
    on one line); ``separate_labels`` then moves apart the labels of nearby points."""
    names = defaultdict(list)
    for point, text in labelled:
        names[point].append(text)
    for point, texts in names.items():
        # On a white box, so that the Pareto front's dashes do not cross the text; under the points
        # (zorder 3 and up), so that a label moved down by separate_labels never hides one.
        ax.annotate(
            ", ".join(texts),
            point,
            xytext=(6, 0),
            textcoords="offset points",
            fontsize=8,
            va="center",
            zorder=2.5,
            bbox={"boxstyle": "round,pad=0.15", "facecolor": "white", "edgecolor": "none", "alpha": 0.85},
        )


LABEL_GAP = 2  # pixels between two labels


def separate_labels(figure) -> None:
    """Moves each axes' labels down, top first, until each is ``LABEL_GAP`` pixels clear of the
    others: blocks of nearby columns (two close ratios) would otherwise be drawn over each other,
    or touch and read as one. Lays the figure out to measure the labels, so call it once
    everything is drawn."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    if not isinstance(figure.canvas, FigureCanvasAgg):
        FigureCanvasAgg(figure)
    figure.draw_without_rendering()
    renderer = figure.canvas.get_renderer()
    for ax in figure.axes:
        placed = []
        for text in sorted(ax.texts, key=lambda t: -t.get_window_extent(renderer).y1):
            extent = text.get_window_extent(renderer)
            shift = 0.0
            while clash := next((p for p in placed if extent.translated(0, -shift).padded(LABEL_GAP).overlaps(p)), None):
                shift = extent.y1 + LABEL_GAP - clash.y0 + 1
            text.xyann = (text.xyann[0], text.xyann[1] - shift * 72 / figure.dpi)
            placed.append(extent.translated(0, -shift))


def plotted_benchmarks(rows: Sequence[dict], units: dict[str, str], x: str) -> list[str]:
    """The benchmarks of ``units`` for which some row has both a score and a value of ``x``."""
    return [b for b in units if any(row.get(b) is not None and row.get(x) is not None for row in rows)]


def pareto_figure(rows: Sequence[dict], units: dict[str, str], x: str = "tflop"):
    """Score vs cost, one panel per benchmark of ``units`` (benchmark -> unit) that a row has a
    score for; rows are the report's CSV rows (``model``, ``method``, ``ratio``, ``x``, one key per
    benchmark). Each model's Pareto front (lower ``x``, higher score) is drawn as a step line;
    points at the same place share one label. Returns a ``matplotlib.figure.Figure``."""
    if x not in AXES:
        raise ValueError(f"x must be one of {', '.join(AXES)}; got {x!r}")
    from matplotlib.figure import Figure

    benchmarks = plotted_benchmarks(rows, units, x)
    if not benchmarks:
        raise ValueError(f"no row has both {x} and a score for any of the benchmarks " + ", ".join(units))
    models = sorted({row["model"] for row in rows})
    methods = list(dict.fromkeys(row["method"] for row in rows))
    columns = min(3, len(benchmarks))
    lines = math.ceil(len(benchmarks) / columns)
    with style():
        figure = Figure(figsize=(5.0 * columns, 4.2 * lines + 0.6), layout="constrained")
        axes = figure.subplots(lines, columns, squeeze=False).ravel()
        colours = {m: f"C{i % 10}" for i, m in enumerate(methods)}
        markers = {m: "osD^v<>"[i % 7] for i, m in enumerate(models)}
        for ax, bench in zip(axes, benchmarks):
            for model in models:
                placed = [r for r in rows if r["model"] == model and r.get(bench) is not None and r.get(x) is not None]
                points = [(float(r[x]), float(r[bench])) for r in placed]
                labels = defaultdict(list)
                for row, point in zip(placed, points):
                    labels[point].append(row)
                for point, together in labels.items():
                    # Points at one place drawn largest first, so each shows as a ring around the next.
                    for depth, row in enumerate(together):
                        ax.scatter(
                            *point,
                            color=colours[row["method"]],
                            marker=markers[model],
                            zorder=3 + depth,
                            s=40 * (len(together) - depth) ** 1.5,
                            label=row["method"] + (f" ({model})" if len(models) > 1 else ""),
                        )
                annotate(ax, [(point, point_label(row)) for point, row in zip(points, placed)])
                front = sorted(points[i] for i in pareto_front(points))
                if front:
                    ax.step(*zip(*front), where="post", color="black", linewidth=1, linestyle="--", zorder=2, label="Pareto front")
            ax.set_xlabel(AXES[x])
            ax.set_ylabel(f"{bench} ({units[bench]})")
            ax.set_title(bench)
            ax.margins(x=0.25, y=0.15)
        for ax in axes[len(benchmarks) :]:
            ax.set_visible(False)
        handles = dict(zip(*reversed(axes[0].get_legend_handles_labels())))
        legend = figure.legend(handles.values(), handles.keys(), loc="outside lower center", ncol=min(6, len(handles)))
        for handle in legend.legend_handles:
            if hasattr(handle, "set_sizes"):
                handle.set_sizes([40])
        figure.suptitle(f"Score vs {AXES[x]}" + (f": {models[0]}" if len(models) == 1 else ""))
        separate_labels(figure)
    return figure


def write_pareto_figures(rows: Sequence[dict], units: dict[str, str], out_dir: Path) -> str:
    """Writes ``pareto_tflop.png`` and ``pareto_tokens.png`` into ``out_dir``; returns what was
    written, or why nothing was (no matplotlib, no scores)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return "skipped pareto_tflop.png, pareto_tokens.png: matplotlib is not installed (pip install 'otprune[analysis]')"
    written, skipped = [], []
    for x, name in (("tflop", "pareto_tflop.png"), ("visual_tokens_after", "pareto_tokens.png")):
        if not plotted_benchmarks(rows, units, x):
            skipped.append(f"{name} (no run has both a score and {AXES[x]})")
            continue
        path = Path(out_dir) / name
        pareto_figure(rows, units, x).savefig(path, dpi=DPI, bbox_inches="tight")
        written.append(str(path))
    return "; ".join(filter(None, ["written: " + ", ".join(written) if written else "", "skipped " + ", ".join(skipped) if skipped else ""]))
