"""Pruning across redundancy regimes: how each method's score moves as the images' visual tokens
grow less redundant, from the synthetic benchmark's background levels (``bench.LEVELS``).

Input: a harness run folder (``runs/<config>``) whose ``table1.csv`` holds synthetic-benchmark
columns per (kind, level) (``bench.task_benchmark``) and whose pruned runs logged, with
``OTPRUNE_OT=1``, each image's exact OT distance (kept vs full tokens) and its near-duplicate share
(the share of its full visual tokens whose nearest other token, the image's mean token subtracted, has cosine > 0.95,
``otprune.measures.near_duplicate_share``). Per model:

- a level's **redundancy** is the mean near-duplicate share over the images of the finished runs
  that prune before the LLM (``LAYER_INDEX`` 0) and evaluated only that level's tasks; levels are
  ordered by it, most redundant first, and a level without a measurement is "not measured", never
  given a value;
- a method's **mean OT distance** at a level is pooled the same way (over the kinds of the level a
  run evaluated together);
- the **crossover** of OTPrune and DivPrune: where, along measured redundancy, OTPrune − DivPrune
  changes sign, per ratio and kind;
- the paper's **hypothesis per level**: Spearman's rho across methods between mean OT and score.

A run that evaluated tasks of several levels (or other benchmarks) in one process logged its values
for all of them together: they cannot be attributed to a level and are left out, its scores (from
``table1.csv``) are not. A run pruning at layer K > 0 measures among layer-K hidden states, another
space: its values are left out too, its scores kept.
"""

from __future__ import annotations

import csv
import io
import itertools
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from otprune import synthetic_benchmark as bench
from otprune.analysis.figures import point_label
from otprune.analysis.hypothesis import _scores, spearman
from otprune.analysis.report import markdown_table, plt

__all__ = ["CSV_FIELDS", "Crossover", "LevelRho", "Redundancy", "Regimes", "crossovers", "figure", "level_rhos", "load_regimes", "render", "to_csv"]

# Ratio-free reference rows, drawn in every panel.
REFERENCES = ("Original", "VTW")
OURS, THEIRS = "OTPrune", "DivPrune"
CSV_FIELDS = ("model", "method", "ratio", "kind", "level", "redundancy", "score", "mean_ot")


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
    ratio, level) -> (mean exact OT distance, images); ``skipped``: records left out entirely, with
    why; ``unattributed``: records whose values span several levels (or other benchmarks), with
    their benchmarks' levels; ``inside_llm``: records pruning at a layer K > 0 whose values were
    left out."""

    source: Path
    scores: dict = field(default_factory=dict)
    redundancy: dict = field(default_factory=dict)
    ot: dict = field(default_factory=dict)
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
    for key, cells in _scores(table).items():
        by_level = {bench.task_level(b): value for b, value in cells.items() if bench.task_level(b) and math.isfinite(value)}
        if by_level:
            scores[key] = by_level
    return scores


def _finite(values) -> list[float]:
    return [float(v) for v in values if math.isfinite(v)]


def load_regimes(runs_dir: Path) -> Regimes:
    """Scores per (kind, level) from ``runs_dir/table1.csv`` and, from the harness records that can
    be trusted (``harness.load_records``), each level's redundancy and each method's mean OT
    distance per level; see the module's docstring for which records count."""
    from otprune.harness.records import load_records

    runs_dir = Path(runs_dir)
    table = runs_dir / "table1.csv"
    if not table.exists():
        raise ValueError(f"{table} does not exist; run the harness (or otprune report {runs_dir}) first")
    regimes = Regimes(source=runs_dir, scores=_level_scores(table))
    shares: dict[tuple, list[list[float]]] = defaultdict(list)
    distances: dict[tuple, list[float]] = defaultdict(list)
    for folder in sorted({path.parent for path in runs_dir.glob("*/*/otprune_*.json")}):
        records, bad = load_records(folder)
        regimes.skipped += bad
        for record_path, record in records:
            missing = [name for name in ("method", "ratio", "benchmarks") if name not in record]
            if missing:
                regimes.skipped.append((record_path, f"no {', '.join(repr(m) for m in missing)}"))
                continue
            ot, share = _finite(record.get("ot_distance", [])), _finite(record.get("near_duplicate_share", []))
            if record["status"] != "done" or not (ot or share):
                continue
            layer = record.get("env", {}).get("LAYER_INDEX", 0)
            try:
                layer = int(layer)
            except (TypeError, ValueError):
                regimes.skipped.append((record_path, f"env LAYER_INDEX={layer!r} is not an integer"))
                continue
            if layer > 0:
                regimes.inside_llm.append(record_path)
                continue
            levels = [bench.task_level(b) for b in record["benchmarks"]]
            if not levels or None in levels:
                if any(levels):  # synthetic tasks evaluated with other benchmarks
                    others = [b for b, lv in zip(record["benchmarks"], levels) if lv is None]
                    regimes.unattributed.append((record_path, f"synthetic tasks together with {', '.join(others)}"))
                continue
            distinct = sorted({level for _, level in levels}, key=bench.LEVELS.index)
            if len(distinct) > 1:
                regimes.unattributed.append((record_path, f"tasks of levels {', '.join(distinct)} together"))
                continue
            model, level = folder.parent.name, distinct[0]
            if share:
                shares[(model, level)].append(share)
            if ot:
                distances[(model, record["method"], float(record["ratio"]), level)] += ot
    for key, runs in shares.items():
        means = [float(np.mean(run)) for run in runs]
        regimes.redundancy[key] = Redundancy(float(np.mean([v for run in runs for v in run])), max(map(len, runs)), len(runs), min(means), max(means))
    regimes.ot = {key: (float(np.mean(values)), len(values)) for key, values in distances.items()}
    return regimes


def _tied(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


@dataclass(frozen=True)
class Crossover:
    """``ours`` − ``theirs`` along measured redundancy for one (model, ratio, kind): ``steps``
    (level, near-duplicate share, difference), most redundant first, over the measured levels
    where both have a score; ``missing`` the measured levels where one of them has none."""

    model: str
    ratio: float
    kind: str
    steps: tuple
    missing: tuple = ()
    ours: str = OURS
    theirs: str = THEIRS

    def signs(self) -> list[int]:
        return [0 if _tied(d, 0.0) else (1 if d > 0 else -1) for _, _, d in self.steps]

    @property
    def ties(self) -> list[str]:
        return [level for (level, _, _), sign in zip(self.steps, self.signs()) if sign == 0]

    @property
    def crossings(self) -> list[tuple[str, str]]:
        """(more redundant level, less redundant level) around each change of sign; tied levels in
        between are skipped (they are neither side)."""
        led = [(level, sign) for (level, _, _), sign in zip(self.steps, self.signs()) if sign]
        return [(a, b) for (a, sa), (b, sb) in itertools.pairwise(led) if sa != sb]

    @property
    def leader(self) -> str | None:
        """The method ahead at every untied level, when there is no crossing and one leads somewhere."""
        signs = {s for s in self.signs() if s}
        return None if len(signs) != 1 else (self.ours if signs == {1} else self.theirs)

    def describe(self) -> str:
        share = {level: s for level, s, _ in self.steps}

        def at(level):
            return f"{level} ({100 * share[level]:.1f} %)"

        if not self.steps:
            return f"no measured level with scores of both {self.ours} and {self.theirs} (none at {', '.join(self.missing)})"
        parts = ", ".join(f"{'0 (tie)' if _tied(d, 0.0) else f'{d:+.4g}'} at {at(level)}" for level, _, d in self.steps)
        text = f"{self.ours} − {self.theirs}: {parts}"
        crossings = self.crossings
        if crossings:
            sides = {level: sign for (level, _, _), sign in zip(self.steps, self.signs())}
            names = []
            for a, b in crossings:
                first, second = (self.ours, self.theirs) if sides[a] > 0 else (self.theirs, self.ours)
                names.append(f"between {at(a)} and {at(b)} ({first} ahead on the more redundant side, {second} on the less)")
            verdict = ("crosses " if len(crossings) == 1 else f"crosses {len(crossings)} times: ") + "; ".join(names)
        elif self.leader is None:
            verdict = "no crossover: tied at every level"
        else:
            where = "the only level" if len(self.steps) == 1 else "every level" if not self.ties else "every untied level"
            verdict = f"no crossover: {self.leader} ahead at {where}"
        ties = self.ties
        if ties and len(ties) < len(self.steps):
            verdict += f"; tied at {', '.join(at(level) for level in ties)}"
        if self.missing:
            verdict += f"; no score of both at {', '.join(self.missing)}"
        return f"{text} → {verdict}"


def crossovers(regimes: Regimes, ours: str = OURS, theirs: str = THEIRS) -> list[Crossover]:
    """Per model, ratio both methods ran at, and kind: ``ours`` − ``theirs`` over the measured levels."""
    found = []
    for model in regimes.models():
        rows = set(regimes.rows(model))
        for ratio in regimes.pruned_ratios(model):
            if (ours, ratio) not in rows or (theirs, ratio) not in rows:
                continue
            for kind in regimes.kinds(model):
                steps, missing = [], []
                for level in regimes.measured_levels(model):
                    a, b = regimes.score(model, ours, ratio, kind, level), regimes.score(model, theirs, ratio, kind, level)
                    if a is None or b is None:
                        missing.append(level)
                    else:
                        steps.append((level, regimes.share(model, level), a - b))
                if steps or missing:
                    found.append(Crossover(model, ratio, kind, tuple(steps), tuple(missing), ours, theirs))
    return found


@dataclass(frozen=True)
class LevelRho:
    """Spearman's rho across ``methods`` between mean OT distance and score at one level, ratio and
    kind (``nan`` when fewer than 3 methods or a side is constant)."""

    model: str
    level: str
    ratio: float
    kind: str
    methods: tuple
    rho: float


def level_rhos(regimes: Regimes) -> list[LevelRho]:
    """One per (model, level with OT distances, pruned ratio, kind)."""
    found = []
    for model in regimes.models():
        for level in regimes.levels(model):
            for ratio in regimes.pruned_ratios(model):
                methods = [m for m, r in regimes.rows(model) if r == ratio and (model, m, r, level) in regimes.ot]
                if not methods:
                    continue
                for kind in regimes.kinds(model):
                    pairs = [(m, regimes.ot[(model, m, ratio, level)][0], regimes.score(model, m, ratio, kind, level)) for m in methods]
                    pairs = [p for p in pairs if p[2] is not None]
                    rho = spearman([p[1] for p in pairs], [p[2] for p in pairs]) if pairs else math.nan
                    found.append(LevelRho(model, level, ratio, kind, tuple(p[0] for p in pairs), rho))
    return found


def to_csv(regimes: Regimes) -> str:
    """``CSV_FIELDS``, one row per (model, method, ratio, kind, level) with a score; ``redundancy``
    the level's near-duplicate share (0-1) and ``mean_ot`` the method's mean OT distance there,
    empty where not measured."""
    handle = io.StringIO()
    writer = csv.writer(handle, lineterminator="\n")
    writer.writerow(CSV_FIELDS)
    for model in regimes.models():
        for method, ratio in regimes.rows(model):
            for kind in regimes.kinds(model):
                for level in regimes.levels(model):
                    score = regimes.score(model, method, ratio, kind, level)
                    if score is None:
                        continue
                    share = regimes.share(model, level)
                    ot = regimes.ot.get((model, method, ratio, level))
                    writer.writerow(
                        [model, method, f"{ratio:g}", kind, level, "" if share is None else repr(share), repr(score), "" if ot is None else repr(ot[0])]
                    )
    return handle.getvalue()


def _column(regimes: Regimes, model: str, level: str) -> str:
    share = regimes.share(model, level)
    return f"{level} ({'not measured' if share is None else f'{100 * share:.1f} %'})"


def _relative(source: Path, path: Path) -> Path:
    return path.relative_to(source) if path.is_relative_to(source) else path


def _title(kind: str, unit: str | None) -> str:
    return f"{bench.TASK_KINDS[kind][1]} ({kind}{', ' + unit if unit else ''})"


def _unit(units: dict | None, kind: str) -> str | None:
    units = units or {}
    return next((units[b] for b in (bench.task_benchmark(kind, level) for level in bench.LEVELS) if b in units), None)


def render(regimes: Regimes, units: dict[str, str] | None = None) -> str:
    """The Markdown report; ``units``: benchmark -> unit (configs/tasks.yaml) for the score tables."""
    source = regimes.source
    lines = [
        "# Regimes: pruning as the images' redundancy changes",
        "",
        f"Source: `{source}`. Per model: each background level's measured redundancy (mean near-duplicate "
        "share: the share of an image's full visual tokens whose nearest other token (the image's mean token subtracted) has cosine > 0.95, over "
        "the images of the finished runs that prune before the LLM and evaluated only that level's tasks); "
        "the scores per question kind, levels ordered most redundant first (a level without a measurement is "
        '"not measured" and comes last); each method\'s mean exact OT distance, kept to full visual tokens, '
        "per level; where OTPrune − DivPrune changes sign along redundancy; and Spearman's rho across methods "
        "between mean OT and score per level (negative supports the paper's hypothesis \"lower OT distance, "
        'higher score"; n/a when a side is constant or fewer than 3 methods).',
        "",
    ]
    if regimes.skipped:
        lines += ["Records left out, and why:", ""]
        lines += [f"- `{_relative(source, path)}`: {reason}" for path, reason in regimes.skipped]
        lines.append("")
    if regimes.unattributed:
        lines += [
            f"{len(regimes.unattributed)} record(s) evaluated several levels (or other benchmarks) in one process: "
            "their OT distances and near-duplicate shares cannot be attributed to a level and are left out "
            "(their scores, from table1.csv, are not):",
            "",
        ]
        lines += [f"- `{_relative(source, path)}`: {reason}" for path, reason in regimes.unattributed]
        lines.append("")
    if regimes.inside_llm:
        lines += [
            f"{len(regimes.inside_llm)} record(s) prune inside the LLM (LAYER_INDEX > 0): their OT distances and "
            "near-duplicate shares are among hidden states, another space, and are left out (their scores are not):",
            "",
        ]
        lines += [f"- `{_relative(source, path)}`" for path in regimes.inside_llm]
        lines.append("")
    if not regimes.scores:
        examples = ", ".join(bench.task_benchmark(kind, level) for kind, level in (("presence", "plain"), ("attribute", "clutter")))
        return "\n".join(lines + [
            f"No synthetic-benchmark level column (such as {examples}) in `{source / 'table1.csv'}`: "
            "run a config with the synthetic benchmark's level tasks (otprune run regimes) first."
        ])  # fmt: skip
    for model in regimes.models():
        lines += [f"## {model}", ""]
        if "tiny" in model:
            lines += ["**Tiny random-weight model: its scores are meaningless, so are crossovers and rho; the machinery is what runs.**", ""]
        levels = regimes.levels(model)
        columns = [_column(regimes, model, level) for level in levels]
        rows = []
        for level in levels:
            measured = regimes.redundancy.get((model, level))
            if measured is None:
                rows.append([level, "not measured", "–", 0])
                continue
            cell = f"{100 * measured.share:.1f} %"
            if not _tied(measured.low, measured.high):
                cell += f" (runs {100 * measured.low:.1f}–{100 * measured.high:.1f} %)"
            rows.append([level, cell, measured.images, measured.runs])
        lines += ["### Measured redundancy", "", markdown_table(["Level", "Near-duplicate share", "Images per run", "Runs"], rows), ""]

        for kind in regimes.kinds(model):
            table = []
            for method, ratio in regimes.rows(model):
                cells = [regimes.score(model, method, ratio, kind, level) for level in levels]
                if any(c is not None for c in cells):
                    table.append([point_label({"method": method, "ratio": ratio})] + ["–" if c is None else f"{c:.4g}" for c in cells])
            lines += [f"### Scores: {_title(kind, _unit(units, kind))}", "", markdown_table(["Method"] + columns, table), ""]

        table = []
        for method, ratio in regimes.rows(model):
            cells = [regimes.ot.get((model, method, ratio, level)) for level in levels]
            if any(cells):
                table.append([point_label({"method": method, "ratio": ratio})] + ["–" if c is None else f"{c[0]:.4g}" for c in cells])
        lines += ["### Mean exact OT distance, kept to full visual tokens", ""]
        lines += [markdown_table(["Method"] + columns, table) if table else "No run of this model logged OT distances attributable to one level (set OTPRUNE_OT=1 in the methods' env and run each level's tasks apart).", ""]  # fmt: skip

        lines += [f"### {OURS} vs {THEIRS} along redundancy", ""]
        measured = regimes.measured_levels(model)
        found = [c for c in crossovers(regimes) if c.model == model]
        if len(measured) < 2:
            have = ", ".join(measured) or "none"
            lines += [f"A crossover needs at least two levels with measured redundancy; measured: {have}.", ""]
        elif not found:
            lines += [f"No ratio at which both {OURS} and {THEIRS} have scores.", ""]
        if found:
            lines += [f"- ratio {c.ratio:g}, {bench.TASK_KINDS[c.kind][1]}: {c.describe()}" for c in found] + [""]

        rhos = [r for r in level_rhos(regimes) if r.model == model]
        lines += ["### Hypothesis per level: Spearman's rho across methods, mean OT vs score", ""]
        if rhos:
            kinds = regimes.kinds(model)
            cells = {(r.level, r.ratio, r.kind): r for r in rhos}
            table = []
            for level in levels:
                for ratio in regimes.pruned_ratios(model):
                    if not any((level, ratio, kind) in cells for kind in kinds):
                        continue
                    row = [_column(regimes, model, level), f"{ratio:g}"]
                    for kind in kinds:
                        r = cells.get((level, ratio, kind))
                        row.append("–" if r is None else ("n/a" if math.isnan(r.rho) else f"{r.rho:+.3f}") + f" ({len(r.methods)})")
                    table.append(row)
            lines += [
                markdown_table(["Level", "Ratio"] + [bench.TASK_KINDS[k][1] for k in kinds], table),
                "",
                "(n): methods with both a mean OT distance and a score.",
                "",
            ]
        else:
            lines += ["No level with OT distances.", ""]
    return "\n".join(lines).rstrip() + "\n"


def figure(regimes: Regimes, units: dict[str, str] | None = None):
    """Score vs measured near-duplicate share: a row of panels per (model, kind), a column per
    pruned ratio; a line per method, Original and VTW dashed in every panel; ``units``: benchmark ->
    unit (configs/tasks.yaml) for the score axis. Unmeasured levels are not drawn."""
    rows = [(model, kind) for model in regimes.models() for kind in regimes.kinds(model) if regimes.measured_levels(model)]
    ratios = sorted({ratio for model in regimes.models() for ratio in regimes.pruned_ratios(model)}) or [None]
    fig, axes = plt.subplots(max(1, len(rows)), len(ratios), figsize=(4.6 * len(ratios), 3.4 * max(1, len(rows))),
                             squeeze=False, layout="constrained")  # fmt: skip
    if not rows:
        axes[0][0].text(0.5, 0.5, "no level with measured redundancy", ha="center", va="center", transform=axes[0][0].transAxes)
        axes[0][0].set_axis_off()
        for ax in axes[0][1:]:
            ax.set_axis_off()
        return fig
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    methods = list(dict.fromkeys(m for model in regimes.models() for m, _ in regimes.rows(model) if m not in REFERENCES))
    style = {m: {"color": colours[i % len(colours)], "marker": "os^Dv<>ph*"[i % 10], "linestyle": "-"} for i, m in enumerate(methods)}
    style.update({"Original": {"color": "black", "marker": "x", "linestyle": "--"}, "VTW": {"color": "grey", "marker": "+", "linestyle": "--"}})
    handles = {}
    for (model, kind), row in zip(rows, axes):
        levels = regimes.measured_levels(model)
        xs = {level: 100 * regimes.share(model, level) for level in levels}
        unit = _unit(units, kind)
        for ratio, ax in zip(ratios, row):
            drawn = [(m, r) for m, r in regimes.rows(model) if m in REFERENCES or r == ratio]
            for method, r in drawn:
                points = sorted((xs[level], s) for level in levels if (s := regimes.score(model, method, r, kind, level)) is not None)
                if not points:
                    continue
                (line,) = ax.plot([p[0] for p in points], [p[1] for p in points], markersize=5, linewidth=1.4, label=method, **style[method])
                handles.setdefault(method, line)
            ticks = sorted(xs.items(), key=lambda item: item[1])
            ax.set_xticks([x for _, x in ticks], [f"{x:.0f} %\n{level}" for level, x in ticks])
            ax.margins(x=0.12, y=0.12)
            ax.set_title(f"{model}: {bench.TASK_KINDS[kind][1]}" + ("" if ratio is None else f", ratio {ratio:g}"))
            ax.set_xlabel("near-duplicate share of the full visual tokens")
            ax.set_ylabel(f"{bench.TASK_KINDS[kind][1]} ({unit})" if unit else f"{bench.TASK_KINDS[kind][1]} score")
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="outside right upper")
    return fig
