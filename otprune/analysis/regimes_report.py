"""The regimes' Markdown report and CSV (``regimes`` loads, ``regimes_stats`` compares)."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

from otprune import synthetic_benchmark as bench
from otprune.analysis.figures import point_label
from otprune.analysis.regimes import OURS, THEIRS, Regimes
from otprune.analysis.regimes_stats import crossovers, level_rhos, score_intervals
from otprune.analysis.report import markdown_table
from otprune.analysis.uncertainty import CONFIDENCE, PAIRINGS, RESAMPLES

__all__ = ["CSV_FIELDS", "render", "to_csv", "unit_of"]

CSV_FIELDS = ("model", "method", "ratio", "kind", "level", "redundancy", "score", "score_low", "score_high", "questions", "mean_ot")
PERCENT = f"{100 * CONFIDENCE:.0f} %"


def _number(value) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else repr(value)


def to_csv(regimes: Regimes) -> str:
    """``CSV_FIELDS``, one row per (model, method, ratio, kind, level) with a score; ``redundancy``
    the level's near-duplicate share (0-1), ``score_low``/``score_high`` the score's bootstrap
    interval over its ``questions`` and ``mean_ot`` the method's mean OT distance there, empty
    where not measured."""
    intervals = score_intervals(regimes)
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
                    interval = intervals.get((model, method, ratio, kind, level))
                    low, high, questions = (interval.low, interval.high, interval.questions) if interval else (None, None, None)
                    writer.writerow([model, method, f"{ratio:g}", kind, level, _number(share), repr(score), _number(low), _number(high),
                                     _number(questions), "" if ot is None else repr(ot[0])])  # fmt: skip
    return handle.getvalue()


def _score_cell(score: float | None, interval) -> str:
    if score is None:
        return "–"
    if interval is None or math.isnan(interval.low):
        return f"{score:.4g}"
    return f"{score:.4g} [{interval.low:.4g}, {interval.high:.4g}]"


def _rho_cell(correlation) -> str:
    if math.isnan(correlation.rho):
        return f"n/a (n = {correlation.n})"
    return f"{correlation.rho:+.3f} (p {'=' if correlation.exact else '~'} {correlation.p:.3f}, n = {correlation.n})"


def _column(regimes: Regimes, model: str, level: str) -> str:
    share = regimes.share(model, level)
    return f"{level} ({'not measured' if share is None else f'{100 * share:.1f} %'})"


def _relative(source: Path, path: Path) -> Path:
    return path.relative_to(source) if path.is_relative_to(source) else path


def _title(kind: str, unit: str | None) -> str:
    return f"{bench.TASK_KINDS[kind][1]} ({kind}{', ' + unit if unit else ''})"


def unit_of(units: dict | None, kind: str) -> str | None:
    """The unit (configs/tasks.yaml) of ``kind``'s level columns."""
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
        "per level; OTPrune − DivPrune per level and whether it changes sign along redundancy; and Spearman's rho "
        "across methods between mean OT and score per level (negative supports the paper's hypothesis \"lower OT "
        'distance, higher score"; n/a when a side is constant or fewer than 3 methods).',
        "",
        f"Uncertainty: [low, high] is a {PERCENT} percentile bootstrap interval over the questions ({RESAMPLES} "
        "resamples, fixed seed), a difference's paired (the same questions resampled for both methods). "
        "A crossover is called only where the difference's interval excludes 0 on both sides of the change "
        f"of sign; rho comes with its two-sided permutation p-value and n, the methods compared ({PAIRINGS}). "
        "Rho is across methods at one level, its n small: p < 0.05 needs |rho| near 1.",
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
    intervals = score_intervals(regimes)
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
            if not math.isclose(measured.low, measured.high, rel_tol=1e-9, abs_tol=1e-12):
                cell += f" (runs {100 * measured.low:.1f}–{100 * measured.high:.1f} %)"
            rows.append([level, cell, measured.images, measured.runs])
        lines += ["### Measured redundancy", "", markdown_table(["Level", "Near-duplicate share", "Images per run", "Runs"], rows), ""]

        for kind in regimes.kinds(model):
            table = []
            for method, ratio in regimes.rows(model):
                cells = [(regimes.score(model, method, ratio, kind, level), intervals.get((model, method, ratio, kind, level))) for level in levels]
                if any(score is not None for score, _ in cells):
                    table.append([point_label({"method": method, "ratio": ratio})] + [_score_cell(*cell) for cell in cells])
            lines += [f"### Scores: {_title(kind, unit_of(units, kind))}, {PERCENT} interval", "", markdown_table(["Method"] + columns, table), ""]

        table = []
        for method, ratio in regimes.rows(model):
            cells = [regimes.ot.get((model, method, ratio, level)) for level in levels]
            if any(cells):
                table.append([point_label({"method": method, "ratio": ratio})] + ["–" if c is None else f"{c[0]:.4g}" for c in cells])
        lines += ["### Mean exact OT distance, kept to full visual tokens", ""]
        lines += [markdown_table(["Method"] + columns, table) if table else "No run of this model logged OT distances attributable to one level (set OTPRUNE_OT=1 in the methods' env and run each level's tasks apart).", ""]  # fmt: skip

        lines += [
            f"### {OURS} vs {THEIRS} along redundancy",
            "",
            f"{OURS} − {THEIRS} per level with its paired {PERCENT} interval; a crossover only where the interval "
            "excludes 0 on both sides of the change of sign (a level whose interval includes 0 shows no difference).",
            "",
        ]
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
        lines += ["### Hypothesis per level: Spearman's rho across methods, mean OT vs score (p, n)", ""]
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
                        row.append("–" if r is None else _rho_cell(r.correlation))
                    table.append(row)
            lines += [
                markdown_table(["Level", "Ratio"] + [bench.TASK_KINDS[k][1] for k in kinds], table),
                "",
                "Each cell: rho, its two-sided permutation p and n, the methods with both a mean OT distance and a score.",
                "",
            ]
        else:
            lines += ["No level with OT distances.", ""]
    return "\n".join(lines).rstrip() + "\n"
