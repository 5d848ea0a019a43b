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
    assert {t.get_text() for t in ax.texts} == {"Original", "OTPrune 0.098", "DivPrune 0.098", "OTPrune 0.25"}


def test_labels_sit_level_with_their_points_where_there_is_room():
    """Points of one cost far apart in score (methods at one ratio that keep or lose the image):
    each label is drawn beside its own point, not in a block by the highest."""
    rows = [
        {"model": "m", "method": method, "ratio": 0.098, "tflop": 0.4, "visual_tokens_after": 56, "VQA": score}
        for method, score in [("DivPrune", 90.0), ("Random", 46.0), ("OTPrune", 16.0)]
    ]
    figure = figures.pareto_figure(rows, {"VQA": "EM"})
    renderer = figure.canvas.get_renderer()
    (ax,) = [a for a in figure.axes if a.get_visible()]
    for text in ax.texts:
        (score,) = [r["VQA"] for r in rows if f"{r['method']} 0.098" == text.get_text()]
        extent = text.get_window_extent(renderer)
        point_y = ax.transData.transform((0.4, score))[1]
        assert extent.y0 < point_y < extent.y1, (text.get_text(), extent, point_y)


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
    assert {t.get_text() for t in tokens.texts} == {"Original", "DivPrune 0.098, OTPrune 0.098"}


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
    assert sorted(t.get_text() for t in ax.texts) == ["DivPrune 0.098, DPP 0.098", "OTPrune 0.098"]


def test_labels_of_close_columns_do_not_overlap():
    rows = [
        {"model": "m", "method": method, "ratio": ratio, "tflop": tflop, "visual_tokens_after": 0, "VQA": score}
        for method, ratio, tflop, score in [
            ("OTPrune", 0.098, 0.40, 57.0),
            ("DivPrune", 0.098, 0.40, 56.9),
            ("DPP", 0.098, 0.40, 56.8),
            ("OTPrune", 0.11, 0.42, 57.0),
            ("DivPrune", 0.11, 0.42, 56.9),
            ("Original", 1.0, 3.0, 60.0),
        ]
    ]
    figure = figures.pareto_figure(rows, {"VQA": "EM"})
    renderer = figure.canvas.get_renderer()
    (ax,) = [a for a in figure.axes if a.get_visible()]
    extents = [t.get_window_extent(renderer) for t in ax.texts]
    assert len(extents) == len(rows)
    # Not even touching: a pixel apart at least.
    assert not any(a.padded(1).overlaps(b) for i, a in enumerate(extents) for b in extents[i + 1 :])


def test_runs_with_scores_but_no_cost_are_skipped_per_axis(tmp_path):
    """An unpruned run without recorded token counts has scores but no TFLOP: the TFLOP figure is
    skipped with the reason, the token figure (whose counts are known) is still written."""
    rows = [{"model": "m", "method": "Original", "ratio": 1.0, "tflop": None, "visual_tokens_after": 576, "VQA": 60.0}]
    said = figures.write_pareto_figures(rows, {"VQA": "EM"}, tmp_path)
    assert said == f"written: {tmp_path / 'pareto_tokens.png'}; skipped pareto_tflop.png (no run has both a score and LLM prefill (TFLOP))"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pareto_tokens.png"]
    with pytest.raises(ValueError, match="no row has both tflop and a score"):
        figures.pareto_figure(rows, {"VQA": "EM"}, x="tflop")
