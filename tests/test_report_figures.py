"""The report's Pareto figures: the front against a brute-force one, what the figures plot for the
recorded runs, and the report without matplotlib."""

from __future__ import annotations

import csv
import random
import sys
from pathlib import Path

import pytest

from otprune import report
from otprune.analysis import figures

pytest.importorskip("matplotlib")

FIXTURES = Path(__file__).parent / "fixtures" / "runs" / "smoke"
UNITS = {"Caption": "CIDEr", "VQA": "EM", "YesNo": "F1"}


def brute_force_front(points):
    """Every point no other point beats on one axis while matching it on the other."""

    def dominates(q, p):
        return q[0] <= p[0] and q[1] >= p[1] and q != p

    return [i for i, p in enumerate(points) if not any(dominates(q, p) for q in points)]


@pytest.mark.parametrize("seed", range(30))
def test_pareto_front_matches_brute_force(seed):
    rng = random.Random(seed)
    # A small grid forces ties in cost, in score and whole duplicate points.
    points = [(rng.randint(0, 5), rng.randint(0, 5)) for _ in range(rng.randint(1, 12))]
    assert figures.pareto_front(points) == brute_force_front(points)


def test_pareto_front_of_a_known_set():
    points = [(1.0, 50.0), (2.0, 40.0), (3.0, 70.0), (3.0, 60.0), (0.5, 10.0), (4.0, 70.0)]
    assert figures.pareto_front(points) == [0, 2, 4]


def scatter_points(ax):
    return sorted(tuple(map(float, xy)) for c in ax.collections for xy in c.get_offsets())


def names(ax):
    """The points' names: each scatter is one row, named by its label."""
    return {c.get_label() for c in ax.collections}


def assert_points_keyed(figure, rows, x_of, y_of):
    """Every visible axes starts at 0 or above and holds no text; every row's point is drawn where
    it belongs in its method's legend colour and its ratio's legend marker, and no two settings
    share a (colour, marker) pair: the legend names every point, and only it."""
    from matplotlib.colors import to_rgba
    from matplotlib.markers import MarkerStyle

    (legend,) = figure.legends
    key = {handle.get_label(): handle for handle in legend.legend_handles}

    def shape(marker):
        style = MarkerStyle(marker)
        return style.get_path().transformed(style.get_transform()).vertices.round(6).tolist()

    for ax in (a for a in figure.axes if a.get_visible()):
        assert ax.get_xlim()[0] >= 0 and ax.get_ylim()[0] >= 0, (ax.get_title(), ax.get_xlim(), ax.get_ylim())
        assert len(ax.texts) == 0
        drawn = {c.get_label(): c for c in ax.collections}
        pairs = {}
        for row in rows:
            label = figures.point_label(row)
            scatter = drawn[label]
            assert tuple(map(float, scatter.get_offsets()[0])) == (x_of(row), y_of(ax, row))
            colour = to_rgba(key[row["method"]].get_color())
            marker = key[figures.marker_key(row)].get_marker()
            assert tuple(scatter.get_facecolor()[0]) == pytest.approx(colour), label
            assert scatter.get_paths()[0].vertices.round(6).tolist() == shape(marker), label
            pairs.setdefault((colour, marker), set()).add(label)
        assert all(len(labels) == 1 for labels in pairs.values()), pairs


def test_figure_plots_the_rows_and_their_front():
    rows = [
        {"model": "m", "method": "Original", "ratio": 1.0, "tflop": 3.0, "visual_tokens_after": 576, "VQA": 60.0},
        {"model": "m", "method": "OTPrune", "ratio": 0.098, "tflop": 0.4, "visual_tokens_after": 56, "VQA": 55.0},
        {"model": "m", "method": "DivPrune", "ratio": 0.098, "tflop": 0.4, "visual_tokens_after": 56, "VQA": 50.0},
        {"model": "m", "method": "OTPrune", "ratio": 0.25, "tflop": 0.9, "visual_tokens_after": 144, "VQA": 54.0},
        {"model": "m", "method": "VTW", "ratio": 0.0, "tflop": 0.2, "visual_tokens_after": 0, "VQA": None},
    ]
    figure = figures.pareto_figure(rows, {"VQA": "EM", "POPE": "F1"}, x="tflop")
    (ax,) = [a for a in figure.axes if a.get_visible()]
    assert ax.get_ylabel() == "VQA (EM)" and ax.get_xlabel() == "LLM prefill (TFLOP)"
    assert scatter_points(ax) == [(0.4, 50.0), (0.4, 55.0), (0.9, 54.0), (3.0, 60.0)]
    (front,) = [line for line in ax.get_lines() if line.get_label() == "Pareto front"]
    assert sorted(set(zip(front.get_xdata(), front.get_ydata()))) == [(0.4, 55.0), (3.0, 60.0)]
    assert names(ax) == {"Original", "OTPrune 0.098", "DivPrune 0.098", "OTPrune 0.25"}


# The regimes run's yes/no F1 on gradient (README): columns of methods at one cost, some scores
# a point apart, two pairs at one place.
CROWDED = [
    ("Original", 1.0, 94.74), ("VTW", 0.0, 0.0),
    ("OTPrune", 0.098, 68.75), ("DivPrune", 0.098, 82.35), ("DPP", 0.098, 86.49), ("CDPruner", 0.098, 85.71),
    ("FastV", 0.098, 88.89), ("Random", 0.098, 33.33), ("Uniform", 0.098, 40.0), ("POOL", 0.098, 0.0),
    ("OTPrune", 0.25, 74.29), ("DivPrune", 0.25, 88.89), ("DPP", 0.25, 89.47), ("CDPruner", 0.25, 87.18),
    ("FastV", 0.25, 91.89), ("Random", 0.25, 62.07), ("Uniform", 0.25, 62.07), ("POOL", 0.25, 46.15),
]  # fmt: skip


def crowded_rows():
    cost = {0.098: (0.06, 56), 0.25: (0.15, 144), 1.0: (0.55, 576), 0.0: (0.01, 0)}
    return [{"model": "m", "method": m, "ratio": r, "tflop": cost[r][0], "visual_tokens_after": cost[r][1], "SynYesNo": s, "SynAttr": s / 2}
            for m, r, s in CROWDED]  # fmt: skip


@pytest.mark.parametrize("x", ["tflop", "visual_tokens_after"])
def test_pareto_points_keyed_by_the_legend_and_axes_from_zero(x):
    rows = crowded_rows()
    figure = figures.pareto_figure(rows, {"SynYesNo": "F1", "SynAttr": "EM"}, x=x)
    assert_points_keyed(figure, rows, lambda row: float(row[x]), lambda ax, row: float(row[ax.get_title()]))
    # Random 0.25 and Uniform 0.25 at one place: two rings, each its own colour, the same marker.
    (ax,) = [a for a in figure.axes if a.get_title() == "SynYesNo"]
    sizes = {c.get_label(): c.get_sizes()[0] for c in ax.collections}
    assert sizes["Random 0.25"] != sizes["Uniform 0.25"]


def test_hypothesis_panels_in_a_grid_keyed_by_the_legend():
    from otprune.analysis import hypothesis

    points = [
        hypothesis.MethodPoint("m", method, ratio, bench, ot, score - shift, 40, False)
        for bench, shift in [("A", 0), ("B", 5), ("C", 10), ("D", 1), ("E", 2)]
        for method, ratio, ot, score in [("OTPrune", 0.098, 0.114, 68.75), ("DivPrune", 0.098, 0.078, 82.35), ("DPP", 0.098, 0.136, 86.49),
                                         ("CDPruner", 0.098, 0.131, 85.71), ("Random", 0.098, 0.014, 33.33), ("OTPrune", 0.25, 0.060, 74.29)]
    ]  # fmt: skip
    figure = hypothesis.figure(points, {})
    visible = [ax for ax in figure.axes if ax.get_visible()]
    assert len(visible) == 5 and len({round(ax.get_position().y0, 3) for ax in visible}) == 2  # 3 + 2, not one row
    width, height = figure.get_size_inches()
    assert width < 2 * height
    by_panel = {(p.benchmark, f"{p.method} {p.ratio:g}"): p for p in points}
    rows = [{"model": "m", "method": p.method, "ratio": p.ratio} for p in points if p.benchmark == "A"]
    assert_points_keyed(
        figure,
        rows,
        lambda row: by_panel[("A", figures.point_label(row))].ot_distance,
        lambda ax, row: by_panel[(ax.get_title().split(": ")[1], figures.point_label(row))].score,
    )


def test_figure_refuses_an_unknown_axis():
    with pytest.raises(ValueError, match="x must be one of tflop, visual_tokens_after; got 'latency'"):
        figures.pareto_figure([], UNITS, x="latency")


def test_report_writes_the_figures_of_the_recorded_runs(tmp_path, monkeypatch, capsys):
    drawn = {}
    real = figures.pareto_figure

    def keep(rows, units, x="tflop"):
        drawn[x] = real(rows, units, x)
        return drawn[x]

    monkeypatch.setattr(figures, "pareto_figure", keep)
    _, csv_path, _ = report.write_report(FIXTURES, tmp_path)
    assert (tmp_path / "pareto_tflop.png").stat().st_size > 0 and (tmp_path / "pareto_tokens.png").stat().st_size > 0
    assert "written: " in capsys.readouterr().err
    rows = list(csv.DictReader(open(csv_path)))
    for x in ("tflop", "visual_tokens_after"):
        axes = {ax.get_title(): ax for ax in drawn[x].axes if ax.get_visible()}
        assert set(axes) == set(UNITS)
        for bench, ax in axes.items():
            assert scatter_points(ax) == sorted((float(r[x]), float(r[bench])) for r in rows)
    tokens = {ax.get_title(): ax for ax in drawn["visual_tokens_after"].axes}["VQA"]
    assert names(tokens) == {"Original", "DivPrune 0.098", "OTPrune 0.098"}


def test_report_without_matplotlib_writes_tables_and_says_why(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    md_path, csv_path, _ = report.write_report(FIXTURES, tmp_path)
    assert md_path.exists() and len(list(csv.DictReader(open(csv_path)))) == 3
    assert not list(tmp_path.glob("*.png"))
    assert "skipped pareto_tflop.png, pareto_tokens.png: matplotlib is not installed" in capsys.readouterr().err


def test_hypothesis_figure_names_methods_and_units():
    from otprune.analysis import hypothesis

    points = [
        hypothesis.MethodPoint("m", method, ratio, "GQA", ot, score, 4, False)
        for method, ratio, ot, score in [("OTPrune", 0.098, 0.8, 57.0), ("DivPrune", 0.098, 1.2, 56.5), ("DPP", 0.098, 1.2, 56.5)]
    ]
    (ax,) = hypothesis.figure(points, {"GQA": "EM"}).axes
    assert ax.get_ylabel() == "GQA (EM)"
    assert scatter_points(ax) == [(0.8, 57.0), (1.2, 56.5), (1.2, 56.5)]
    assert names(ax) == {"DivPrune 0.098", "DPP 0.098", "OTPrune 0.098"}


def test_runs_with_scores_but_no_cost_are_skipped_per_axis(tmp_path):
    """An unpruned run without recorded token counts has scores but no TFLOP: the TFLOP figure is
    skipped with the reason, the token figure (whose counts are known) is still written."""
    rows = [{"model": "m", "method": "Original", "ratio": 1.0, "tflop": None, "visual_tokens_after": 576, "VQA": 60.0}]
    said = figures.write_pareto_figures(rows, {"VQA": "EM"}, tmp_path)
    assert said == f"written: {tmp_path / 'pareto_tokens.png'}; skipped pareto_tflop.png (no run has both a score and LLM prefill (TFLOP))"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pareto_tokens.png"]
    with pytest.raises(ValueError, match="no row has both tflop and a score"):
        figures.pareto_figure(rows, {"VQA": "EM"}, x="tflop")
