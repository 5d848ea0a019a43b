"""The paper's hypothesis (its Fig. 2) tested on harness results: does a method whose kept tokens lie
closer to the full token set, in exact empirical OT distance, score higher?

Input: a harness run folder (``runs/<config>``) whose pruned runs recorded per-image OT distances
(``OTPRUNE_OT=1`` in the method's ``env``) and whose ``table1.csv`` the report step wrote. Per model
and benchmark, each method contributes one point (mean OT distance over its images, score), and
Spearman's rank correlation between the two is computed across methods. The hypothesis predicts a
negative correlation. A run that evaluated several tasks in one lmms-eval call (``group_tasks``)
logged its distances for all of them together; those benchmarks share the pooled mean, and the
report says so. Only runs that prune before the LLM (``LAYER_INDEX`` 0) count: a method pruning at
layer K measures its distances among layer-K hidden states, another space.
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from otprune.analysis.figures import annotate, point_label, separate_labels
from otprune.analysis.report import markdown_table, plt

__all__ = ["MethodPoint", "load_points", "render", "figure", "spearman"]


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


def _ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing their average rank."""
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(1, len(values) + 1)
    for value in np.unique(values):
        tied = values == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def spearman(x, y) -> float:
    """Spearman's rho with average ranks for ties; ``nan`` when either side is constant or n < 3."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan
    return float(np.corrcoef(_ranks(x), _ranks(y))[0, 1])


def _scores(table: Path) -> dict[tuple[str, str, float], dict[str, float]]:
    with table.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        return {}
    benchmarks = [name[: -len("_diff")] for name in rows[0] if name.endswith("_diff")]
    scores = {}
    for row in rows:
        cells = {b: float(row[b]) for b in benchmarks if row.get(b) not in (None, "")}
        scores[(row["model"], row["method"], float(row["ratio"]))] = cells
    return scores


def load_points(runs_dir: Path) -> tuple[list[MethodPoint], list[tuple[Path, str]]]:
    """``(points, skipped)``: one point per (model, method, ratio, benchmark) that has both a score
    and OT distances, from the harness records that can be trusted (``harness.load_records``: a
    finished record's results files unchanged since it was written), and every other record with
    why it was left out."""
    from otprune.harness.records import load_records

    table = runs_dir / "table1.csv"
    if not table.exists():
        raise ValueError(f"{table} does not exist; run the harness (or otprune report {runs_dir}) first")
    scores = _scores(table)
    distances: dict[tuple, list[float]] = defaultdict(list)
    pooled: dict[tuple, bool] = {}
    skipped = []
    for folder in sorted({path.parent for path in runs_dir.glob("*/*/otprune_*.json")}):
        records, bad = load_records(folder)
        skipped += bad
        for record_path, record in records:
            # load_records checked the types of the fields it finds; a point needs these present.
            missing = [name for name in ("method", "ratio", "benchmarks") if name not in record]
            if missing:
                skipped.append((record_path, f"no {', '.join(repr(m) for m in missing)}"))
                continue
            values = [v for v in record.get("ot_distance", []) if math.isfinite(v)]
            if record["status"] != "done" or not values or int(record.get("env", {}).get("LAYER_INDEX", 0)) > 0:
                continue
            # table1.csv names a model by its run folder (the last part of the hub id), as the harness does.
            model = folder.parent.name
            for benchmark in record["benchmarks"]:
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
        "(negative supports the hypothesis; n/a when a side is constant or fewer than 3 methods).",
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
        rho = spearman([p.ot_distance for p in group], [p.score for p in group])
        methods = ", ".join(f"{p.method} {p.ratio:g}: OT {p.ot_distance:.4g} / score {p.score:.4g}" for p in group)
        note = " (OT pooled over the run's tasks)" if any(p.pooled for p in group) else ""
        rows.append([model, benchmark + note, len(group), "n/a" if math.isnan(rho) else f"{rho:+.3f}", methods])
    lines.append(markdown_table(["Model", "Benchmark", "Methods", "Spearman rho", "Mean OT / score"], rows))
    return "\n".join(lines)


def figure(points: list[MethodPoint], units: dict[str, str] | None = None):
    """Score vs mean OT distance, one panel per model and benchmark; ``units``: benchmark -> unit
    (configs/tasks.yaml) for the score axis."""
    groups = _groups(points)
    panels = max(1, len(groups))
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4.2), squeeze=False, layout="constrained")
    for ax, ((model, benchmark), group) in zip(axes[0], sorted(groups.items())):
        for point in group:
            ax.scatter(point.ot_distance, point.score, s=40, zorder=3)
        annotate(ax, [((p.ot_distance, p.score), point_label({"method": p.method, "ratio": p.ratio})) for p in group])
        ax.margins(x=0.25, y=0.15)
        ax.set_title(f"{model}: {benchmark}")
        ax.set_xlabel("mean OT distance, kept to full visual tokens")
        unit = (units or {}).get(benchmark)
        ax.set_ylabel(f"{benchmark} ({unit})" if unit else f"{benchmark} score")
    separate_labels(fig)
    return fig
