"""The paper's hypothesis (its Fig. 2) tested on harness results: does a method whose kept tokens lie
closer to the full token set, in exact empirical OT distance, score higher?

Input: a harness run folder (``runs/<config>``) whose pruned runs recorded per-image OT distances
(``OTPRUNE_OT=1`` in the method's ``env``) and whose ``table1.csv`` the report step wrote. Per model
and benchmark, each method contributes one point (mean OT distance over its images, score), and
Spearman's rank correlation between the two is computed across methods, with its permutation p-value
and n (``analysis.uncertainty``: exact up to 9 methods). The hypothesis predicts a negative correlation. Only each
run folder's newest trusted record per task counts (``analysis.records``). A run that evaluated
several tasks in one lmms-eval call (``group_tasks``) logged its distances for all of them
together; those benchmarks share the pooled mean, and the report says so. Only runs that prune
before the LLM count (K = 0 in their resolved ``setting.json``; a method left at its default K has
it there, not in its env): a method pruning at layer K measures its distances among layer-K hidden
states, another space.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from otprune.analysis.figures import clip_at_zero, grid, keyed_legend, keyed_points, point_keys, style
from otprune.analysis.records import read_run_folder, table_scores
from otprune.analysis.report import markdown_table
from otprune.analysis.uncertainty import PAIRINGS, spearman_test
from otprune.harness.catalogue import ADAPTIVE

__all__ = ["MethodPoint", "load_points", "render", "figure"]


@dataclass(frozen=True)
class MethodPoint:
    model: str
    method: str
    ratio: float
    benchmark: str
    ot_distance: float
    score: float
    images: int
    pooled: bool


def load_points(runs_dir: Path) -> tuple[list[MethodPoint], list[tuple[Path, str]]]:
    """``(points, skipped)``: one point per (model, method, ratio, benchmark) that has both a score
    and OT distances, from each run folder's newest trusted record per task (``analysis.records``),
    and every record left out with why."""
    table = runs_dir / "table1.csv"
    if not table.exists():
        raise ValueError(f"{table} does not exist; run the harness (or otprune report {runs_dir}) first")
    scores = table_scores(table)
    distances: dict[tuple, list[float]] = defaultdict(list)
    pooled: dict[tuple, bool] = {}
    skipped = []
    for folder in sorted({path.parent for path in runs_dir.glob("*/*/otprune_*.json")}):
        run = read_run_folder(folder)
        skipped += run.skipped
        for current in run.current:
            record_path, record = current.path, current.record
            # load_records checked the types of the fields it finds; a point needs these present.
            missing = [name for name in ("method", "ratio", "benchmarks") if name not in record]
            if missing:
                skipped.append((record_path, f"no {', '.join(repr(m) for m in missing)}"))
                continue
            if record["ratio"] == ADAPTIVE:
                # Its counts vary per image: no fixed ratio to set it among the others at.
                skipped.append((record_path, "an adaptive run (each image's count its own): the analysis compares fixed ratios"))
                continue
            values = [v for v in record.get("ot_distance", []) if math.isfinite(v)]
            if not values:
                continue
            if run.layer_index is None:
                skipped.append((record_path, f"its setting.json names no layer_index K >= 0 ({run.setting!r:.80})"))
                continue
            if run.layer_index > 0:
                continue
            # table1.csv names a model by its run folder (the last part of the hub id), as the harness does.
            model = folder.parent.name
            for benchmark in current.benchmarks():
                key = (model, record["method"], float(record["ratio"]), benchmark)
                distances[key] += values
                pooled[key] = len(record["benchmarks"]) > 1
    points = []
    for (model, method, ratio, benchmark), values in sorted(distances.items()):
        score = scores.get((model, method, ratio), {}).get(benchmark)
        if score is None:
            continue
        points.append(MethodPoint(model, method, ratio, benchmark, float(np.mean(values)), score, len(values), pooled[(model, method, ratio, benchmark)]))
    return points, skipped


def _groups(points: list[MethodPoint]) -> dict[tuple[str, str], list[MethodPoint]]:
    groups: dict[tuple[str, str], list[MethodPoint]] = defaultdict(list)
    for point in points:
        groups[(point.model, point.benchmark)].append(point)
    return groups


def render(points: list[MethodPoint], source: Path, skipped: list[tuple[Path, str]] = ()) -> str:
    lines = [
        "# Hypothesis: lower OT distance, higher score? (paper Fig. 2)",
        "",
        f"Source: `{source}`. Per model and benchmark: each method's mean exact OT distance between its kept "
        "and full visual tokens (over the images it logged) and its score; Spearman's rho across methods "
        "(negative supports the hypothesis; n/a when a side is constant or fewer than 3 methods), with its "
        f"two-sided permutation p-value ({PAIRINGS}): with n this small, p < 0.05 needs |rho| near 1.",
        "",
    ]
    if skipped:
        lines += ["Records left out, and why:", ""]
        lines += [f"- `{path.relative_to(source) if path.is_relative_to(source) else path}`: {reason}" for path, reason in skipped]
        lines.append("")
    if not points:
        return "\n".join(lines + ["No run recorded OT distances (set OTPRUNE_OT=1 in the methods' env)."])
    if any("tiny" in p.model for p in points):
        lines += ["**Tiny random-weight models: their scores are meaningless, so is rho; the machinery is what runs.**", ""]
    rows = []
    for (model, benchmark), group in sorted(_groups(points).items()):
        test = spearman_test([p.ot_distance for p in group], [p.score for p in group])
        methods = ", ".join(f"{p.method} {p.ratio:g}: OT {p.ot_distance:.4g} / score {p.score:.4g}" for p in group)
        note = " (OT pooled over the run's tasks)" if any(p.pooled for p in group) else ""
        rho, p = ("n/a", "n/a") if math.isnan(test.rho) else (f"{test.rho:+.3f}", f"{'' if test.exact else '~ '}{test.p:.3f}")
        rows.append([model, benchmark + note, test.n, rho, p, methods])
    lines.append(markdown_table(["Model", "Benchmark", "n (methods)", "Spearman rho", "p", "Mean OT / score"], rows))
    return "\n".join(lines)


def figure(points: list[MethodPoint], units: dict[str, str] | None = None):
    """Score vs mean OT distance, one panel per model and benchmark in a grid of at most three
    columns, each point in its method's colour and its ratio's marker (the legend keys them), both
    axes from 0; ``units``: benchmark -> unit (configs/tasks.yaml) for the score axis."""
    groups = sorted(_groups(points).items())
    rows = [{"model": p.model, "method": p.method, "ratio": p.ratio} for p in points]
    colours, markers = point_keys(rows)
    with style():
        fig, axes = grid(max(1, len(groups)), extra_height=0.6 + 0.25 * math.ceil((len(colours) + len(markers)) / 6))
        for ax, ((model, benchmark), group) in zip(axes, groups):
            placed = [((p.ot_distance, p.score), {"model": p.model, "method": p.method, "ratio": p.ratio}) for p in group]
            keyed_points(ax, placed, colours, markers, several_models=len({p.model for p in points}) > 1)
            ax.set_title(f"{model}: {benchmark}")
            ax.set_xlabel("mean OT distance, kept to full visual tokens")
            unit = (units or {}).get(benchmark)
            ax.set_ylabel(f"{benchmark} ({unit})" if unit else f"{benchmark} score")
            ax.margins(x=0.08, y=0.08)
            clip_at_zero(ax)
        if points:
            keyed_legend(fig, colours, markers)
    return fig
