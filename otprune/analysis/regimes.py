"""Pruning across redundancy regimes, the loading: how each method's score moves as the images'
visual tokens grow less redundant, from the synthetic benchmark's background levels
(``bench.LEVELS``). ``regimes_stats`` compares the methods with their uncertainty,
``regimes_report`` writes the Markdown and CSV, ``regimes_figure`` draws.

Input: a harness run folder (``runs/<config>``) whose ``table1.csv`` holds synthetic-benchmark
columns per (kind, level) (``bench.task_benchmark``), whose runs logged their questions' answers
(lmms-eval's ``--log_samples``, which the harness passes) and whose pruned runs logged, with
``OTPRUNE_OT=1``, each image's exact OT distance (kept vs full tokens) and its near-duplicate share
(the share of its full visual tokens whose nearest other token, the image's mean token subtracted,
has cosine > 0.95, ``otprune.measures.near_duplicate_share``). Only each run folder's newest trusted
record per task counts (``analysis.records``). Per model:

- a level's **redundancy** is the mean near-duplicate share over the images of the runs that
  prune before the LLM (K = 0 in their resolved setting) and evaluated only that level's tasks;
  levels are ordered by it, most redundant first, and a level without a measurement is "not
  measured", never given a value;
- a method's **mean OT distance** at a level is pooled the same way (over the kinds of the level a
  run evaluated together);
- a method's **questions** per (kind, level): each question's logged answer, from which
  ``regimes_stats`` bootstraps the score's interval and, paired, a difference's.

A run that evaluated tasks of several levels (or other benchmarks) in one process logged its values
for all of them together: they cannot be attributed to a level and are left out, its scores (from
``table1.csv``) are not. A run pruning at layer K > 0 (``setting.json``'s resolved ``layer_index``:
a method left at its default K has it there, not in its env) measures among layer-K hidden states,
another space: its values are left out too, its scores kept.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from otprune import synthetic_benchmark as bench
from otprune.analysis.records import question_items, read_run_folder, table_scores
from otprune.analysis.uncertainty import METRICS
from otprune.harness.catalogue import ADAPTIVE

__all__ = ["OURS", "REFERENCES", "THEIRS", "Redundancy", "Regimes", "load_regimes"]

# Ratio-free reference rows, drawn in every panel.
REFERENCES = ("Original", "VTW")
OURS, THEIRS = "OTPrune", "DivPrune"


@dataclass(frozen=True)
class Redundancy:
    """A level's measured redundancy for one model: ``share`` the mean near-duplicate share (0-1)
    over every image its runs logged; ``images`` the most one run logged; ``runs`` how many runs;
    ``low``/``high`` the smallest and largest per-run mean (equal when the runs saw the same images)."""

    share: float
    images: int
    runs: int
    low: float
    high: float


@dataclass
class Regimes:
    """What ``load_regimes`` read from a harness run folder.

    ``scores``: (model, method, ratio) -> (kind, level) -> score, in table1.csv's row order;
    ``redundancy``: (model, level) -> Redundancy, measured levels only; ``ot``: (model, method,
    ratio, level) -> (mean exact OT distance, images); ``questions``: (model, method, ratio, kind,
    level) -> {question id: logged item}; ``metrics``: kind -> (item key, scale to the score's
    unit); ``skipped``: records left out entirely, with why; ``unattributed``: records whose values
    span several levels (or other benchmarks), with their benchmarks' levels; ``inside_llm``:
    records pruning at a layer K > 0 whose values were left out."""

    source: Path
    scores: dict = field(default_factory=dict)
    redundancy: dict = field(default_factory=dict)
    ot: dict = field(default_factory=dict)
    questions: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    skipped: list = field(default_factory=list)
    unattributed: list = field(default_factory=list)
    inside_llm: list = field(default_factory=list)

    def models(self) -> list[str]:
        return list(dict.fromkeys(model for model, _, _ in self.scores))

    def rows(self, model: str) -> list[tuple[str, float]]:
        """(method, ratio) of the model's table1.csv rows: Original and VTW first, then by ratio, in
        the table's order within one."""
        rows = [(method, ratio) for m, method, ratio in self.scores if m == model]
        return sorted(rows, key=lambda row: (row[0] not in REFERENCES, row[1] if row[0] not in REFERENCES else 0))

    def kinds(self, model: str) -> list[str]:
        present = {kind for (m, _, _), cells in self.scores.items() if m == model for kind, _ in cells}
        return [kind for kind in bench.TASK_KINDS if kind in present]

    def levels(self, model: str) -> list[str]:
        """The model's levels with a score: measured ones by redundancy, most redundant first, then
        the unmeasured in the benchmark's order."""
        present = {level for (m, _, _), cells in self.scores.items() if m == model for _, level in cells}
        measured = sorted((level for level in bench.LEVELS if level in present and (model, level) in self.redundancy),
                          key=lambda level: -self.redundancy[(model, level)].share)  # fmt: skip
        return measured + [level for level in bench.LEVELS if level in present and level not in measured]

    def measured_levels(self, model: str) -> list[str]:
        return [level for level in self.levels(model) if (model, level) in self.redundancy]

    def pruned_ratios(self, model: str) -> list[float]:
        return sorted({ratio for method, ratio in self.rows(model) if method not in REFERENCES})

    def score(self, model: str, method: str, ratio: float, kind: str, level: str) -> float | None:
        return self.scores.get((model, method, ratio), {}).get((kind, level))

    def share(self, model: str, level: str) -> float | None:
        measured = self.redundancy.get((model, level))
        return measured.share if measured else None


def _level_scores(table: Path) -> dict:
    scores = {}
    for key, cells in table_scores(table).items():
        by_level = {bench.task_level(b): value for b, value in cells.items() if bench.task_level(b) and math.isfinite(value)}
        if by_level:
            scores[key] = by_level
    return scores


def _finite(values) -> list[float]:
    return [float(v) for v in values if math.isfinite(v)]


def _question_metrics() -> dict[str, tuple[str, float]]:
    """task -> (the item key its samples log, scale to the report's unit), for the synthetic
    benchmark's level tasks in configs/tasks.yaml whose metric has per-question items."""
    from otprune.report import load_yaml

    found = {}
    for task, spec in load_yaml("tasks.yaml")["local"].items():
        metric = spec["metric"].split(",")[0]
        if bench.task_level(spec["benchmark"]) and metric in METRICS:
            found[task] = (metric, float(spec["scale"]))
    return found


def load_regimes(runs_dir: Path) -> Regimes:
    """Scores per (kind, level) from ``runs_dir/table1.csv`` and, from each run folder's newest
    trusted record per task (``analysis.records``), each level's redundancy, each method's mean OT
    distance per level and its per-question answers; see the module's docstring for which records
    count."""
    runs_dir = Path(runs_dir)
    table = runs_dir / "table1.csv"
    if not table.exists():
        raise ValueError(f"{table} does not exist; run the harness (or otprune report {runs_dir}) first")
    regimes = Regimes(source=runs_dir, scores=_level_scores(table))
    metrics = _question_metrics()
    shares: dict[tuple, list[list[float]]] = defaultdict(list)
    distances: dict[tuple, list[float]] = defaultdict(list)
    for folder in sorted({path.parent for path in runs_dir.glob("*/*/otprune_*.json")}):
        run = read_run_folder(folder)
        regimes.skipped += run.skipped
        for current in run.current:
            record_path, record = current.path, current.record
            missing = [name for name in ("method", "ratio", "benchmarks") if name not in record]
            if missing:
                regimes.skipped.append((record_path, f"no {', '.join(repr(m) for m in missing)}"))
                continue
            if record["ratio"] == ADAPTIVE:
                # Its counts vary per image: no fixed ratio to set it among the others at.
                regimes.skipped.append((record_path, "an adaptive run (each image's count its own): the analysis compares fixed ratios"))
                continue
            model, method, ratio = folder.parent.name, record["method"], float(record["ratio"])
            for task in current.tasks:
                if task in metrics and (items := question_items(current, task, metrics[task][0])):
                    kind, level = bench.task_level(dict(zip(record["tasks"], record["benchmarks"]))[task])
                    regimes.questions[(model, method, ratio, kind, level)] = items
                    regimes.metrics[kind] = metrics[task]
            ot, share = _finite(record.get("ot_distance", [])), _finite(record.get("near_duplicate_share", []))
            if not (ot or share):
                continue
            if run.layer_index is None:
                regimes.skipped.append((record_path, f"its setting.json names no layer_index K >= 0 ({run.setting!r:.80})"))
                continue
            if run.layer_index > 0:
                regimes.inside_llm.append(record_path)
                continue
            benchmarks = current.benchmarks()
            levels = [bench.task_level(b) for b in benchmarks]
            if not levels or None in levels:
                if any(levels):  # synthetic tasks evaluated with other benchmarks
                    others = [b for b, lv in zip(benchmarks, levels) if lv is None]
                    regimes.unattributed.append((record_path, f"synthetic tasks together with {', '.join(others)}"))
                continue
            distinct = sorted({level for _, level in levels}, key=bench.LEVELS.index)
            if len(distinct) > 1:
                regimes.unattributed.append((record_path, f"tasks of levels {', '.join(distinct)} together"))
                continue
            if share:
                shares[(model, distinct[0])].append(share)
            if ot:
                distances[(model, method, ratio, distinct[0])] += ot
    for key, runs in shares.items():
        means = [float(np.mean(run)) for run in runs]
        regimes.redundancy[key] = Redundancy(float(np.mean([v for run in runs for v in run])), max(map(len, runs)), len(runs), min(means), max(means))
    regimes.ot = {key: (float(np.mean(values)), len(values)) for key, values in distances.items()}
    return regimes
