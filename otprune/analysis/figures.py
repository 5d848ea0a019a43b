"""Figures shared by the report and the analyses: the accuracy-vs-cost Pareto plot of a harness run,
method display names, panels in a grid, points keyed by a legend (a colour per method, a marker per
ratio), axes that stop at 0, and the sizes every figure is written at.

Why a legend and no labels beside the points: a run's methods share one cost per ratio, so its
points stand in columns a score point apart; labels moved apart to be legible end up beside other
points (a label placer included), and the reader takes one method's score for another's.

matplotlib is an optional extra (``pip install otprune[analysis]``): this module imports it only
inside the functions that draw, so ``otprune report`` can still write its tables without it.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from otprune.harness.catalogue import ratio_label, ratio_order

__all__ = [
    "AXES",
    "DPI",
    "SELECTOR_NAMES",
    "clip_at_zero",
    "display_name",
    "grid",
    "keyed_legend",
    "keyed_points",
    "pareto_figure",
    "pareto_front",
    "point_label",
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
    return f"{row['method']} {ratio_label(row['ratio'])}"


def grid(panels: int, columns: int = 3, width: float = 5.0, height: float = 4.2, extra_height: float = 0.0):
    """A figure of ``panels`` axes in rows of at most ``columns`` (the unused ones hidden):
    ``(figure, axes)``, axes in reading order."""
    from matplotlib.figure import Figure

    columns = max(1, min(columns, panels))
    rows = math.ceil(panels / columns)
    figure = Figure(figsize=(width * columns, height * rows + extra_height), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for ax in axes[panels:]:
        ax.set_visible(False)
    return figure, list(axes[:panels])


def clip_at_zero(ax) -> None:
    """Stops both axes at 0 where the margins would run them below it (costs and scores are >= 0)."""
    low, high = ax.get_xlim()
    ax.set_xlim(max(0.0, low), high)
    low, high = ax.get_ylim()
    ax.set_ylim(max(0.0, low), high)


MARKERS = "os^Dv<>phP"
REFERENCE_MARKER = "*"
REFERENCE_METHODS = ("Original", "VTW")
NO_RATIO = "no ratio"


def point_keys(rows: Sequence[dict]) -> tuple[dict[str, str], dict[str, str]]:
    """``(colours, markers)``: a colour per method and a marker per ``marker_key`` of ``rows``
    (dicts with ``model``, ``method``, ``ratio``), so that (colour, marker) names one row's setting."""
    methods = list(dict.fromkeys(row["method"] for row in rows))
    palette = "tab10" if len(methods) <= 10 else "tab20"
    colours = {m: f"C{i}" if palette == "tab10" else _tab20(i) for i, m in enumerate(methods)}
    several = len({row["model"] for row in rows}) > 1
    keys = list(dict.fromkeys(marker_key(row, several) for row in sorted(rows, key=lambda r: (r["method"] not in REFERENCE_METHODS, ratio_order(r["ratio"])))))
    markers, plain = {}, iter(MARKERS * (1 + len(keys) // len(MARKERS)))
    for key in keys:
        markers[key] = REFERENCE_MARKER if key.startswith(NO_RATIO) else next(plain)
    return colours, markers


def _tab20(i: int):
    import matplotlib

    return matplotlib.colormaps["tab20"](i % 20)


def marker_key(row: dict, several_models: bool = False) -> str:
    """The legend's marker entry of a row: its ratio (the methods without one, Original and VTW,
    share one), and its model when the figure holds several."""
    key = f"{NO_RATIO} (Original, VTW)" if row["method"] in REFERENCE_METHODS else f"ratio {ratio_label(row['ratio'])}"
    return key + (f", {row['model']}" if several_models else "")


def keyed_points(ax, placed: Sequence[tuple[tuple[float, float], dict]], colours: dict, markers: dict, several_models: bool = False) -> None:
    """Draws each ``(point, row)`` in its method's colour and its ratio's marker, the scatter named
    by ``point_label``; points at one place drawn largest first, each a ring around the next. Not
    clipped: a score of 0 sits on the axis that stops at 0, whole."""
    together = defaultdict(list)
    for point, row in placed:
        together[point].append(row)
    for point, rows in together.items():
        for depth, row in enumerate(rows):
            ax.scatter(*point, color=colours[row["method"]], marker=markers[marker_key(row, several_models)], zorder=3 + depth,
                       s=40 * (len(rows) - depth) ** 1.5, clip_on=False, label=point_label(row) + (f" ({row['model']})" if several_models else ""))  # fmt: skip


def keyed_legend(figure, colours: dict, markers: dict, extra: Sequence = ()) -> None:
    """The figure's legend under its panels: the methods' colours, then the ratios' markers, then
    ``extra`` handles (a Pareto front's line)."""
    from matplotlib.lines import Line2D

    methods = [Line2D([], [], linestyle="", marker="o", markersize=7, color=colour, label=method) for method, colour in colours.items()]
    ratios = [Line2D([], [], linestyle="", marker=marker, markersize=7, color="0.35", label=key) for key, marker in markers.items()]
    handles = methods + ratios + list(extra)
    figure.legend(handles=handles, loc="outside lower center", ncol=min(6, len(handles)))


def plotted_benchmarks(rows: Sequence[dict], units: dict[str, str], x: str) -> list[str]:
    """The benchmarks of ``units`` for which some row has both a score and a value of ``x``."""
    return [b for b in units if any(row.get(b) is not None and row.get(x) is not None for row in rows)]


def pareto_figure(rows: Sequence[dict], units: dict[str, str], x: str = "tflop"):
    """Score vs cost, one panel per benchmark of ``units`` (benchmark -> unit) that a row has a
    score for; rows are the report's CSV rows (``model``, ``method``, ``ratio``, ``x``, one key per
    benchmark), in a grid of at most three columns. Each model's Pareto front (lower ``x``, higher
    score) is drawn as a step line; each point in its method's colour and its ratio's marker, keyed
    by the legend (``keyed_points``); both axes stop at 0. Returns a ``matplotlib.figure.Figure``."""
    if x not in AXES:
        raise ValueError(f"x must be one of {', '.join(AXES)}; got {x!r}")
    benchmarks = plotted_benchmarks(rows, units, x)
    if not benchmarks:
        raise ValueError(f"no row has both {x} and a score for any of the benchmarks " + ", ".join(units))
    from matplotlib.lines import Line2D

    models = sorted({row["model"] for row in rows})
    colours, markers = point_keys(rows)
    with style():
        figure, axes = grid(len(benchmarks), extra_height=0.6 + 0.25 * math.ceil((len(colours) + len(markers) + 1) / 6))
        for ax, bench in zip(axes, benchmarks):
            for model in models:
                placed = [((float(r[x]), float(r[bench])), r) for r in rows if r["model"] == model and r.get(bench) is not None and r.get(x) is not None]
                keyed_points(ax, placed, colours, markers, several_models=len(models) > 1)
                front = sorted(placed[i][0] for i in pareto_front([point for point, _ in placed]))
                if front:
                    ax.step(*zip(*front), where="post", color="black", linewidth=1, linestyle="--", zorder=2, label="Pareto front")
            ax.set_xlabel(AXES[x])
            ax.set_ylabel(f"{bench} ({units[bench]})")
            ax.set_title(bench)
            ax.margins(x=0.08, y=0.08)
            clip_at_zero(ax)
        keyed_legend(figure, colours, markers, [Line2D([], [], color="black", linewidth=1, linestyle="--", label="Pareto front")])
        figure.suptitle(f"Score vs {AXES[x]}" + (f": {models[0]}" if len(models) == 1 else ""))
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
