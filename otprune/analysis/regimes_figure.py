"""The regimes' figure: score against measured redundancy (``regimes`` loads, ``regimes_stats``
gives the intervals drawn as error bars)."""

from __future__ import annotations

from otprune import synthetic_benchmark as bench
from otprune.analysis.regimes import REFERENCES, Regimes
from otprune.analysis.regimes_report import unit_of
from otprune.analysis.regimes_stats import score_intervals
from otprune.analysis.report import plt

__all__ = ["figure"]

DODGE = 0.06  # level-axis units between two methods' points at one level


def figure(regimes: Regimes, units: dict[str, str] | None = None):
    """Score per measured level, most redundant first (equally spaced: three of the four levels lie
    within 4 points of near-duplicate share, their own share under each name): a row of panels per
    (model, kind), a column per pruned ratio; a line per method, Original and VTW dashed in every
    panel; each point's bootstrap interval as an error bar, the methods side by side at a level so
    that their bars do not hide each other; ``units``: benchmark -> unit (configs/tasks.yaml) for
    the score axis. Unmeasured levels are not drawn."""
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
    intervals = score_intervals(regimes)
    for (model, kind), row in zip(rows, axes):
        levels = regimes.measured_levels(model)
        unit = unit_of(units, kind)
        for ratio, ax in zip(ratios, row):
            drawn = [(m, r) for m, r in regimes.rows(model) if m in REFERENCES or r == ratio]
            for offset, (method, r) in enumerate(drawn):
                dodge = (offset - (len(drawn) - 1) / 2) * DODGE
                points = [(x + dodge, s, intervals.get((model, method, r, kind, level))) for x, level in enumerate(levels)
                          if (s := regimes.score(model, method, r, kind, level)) is not None]  # fmt: skip
                if not points:
                    continue
                errors = [[y - (i.low if i else y) for _, y, i in points], [(i.high if i else y) - y for _, y, i in points]]
                drawn_line = ax.errorbar([p[0] for p in points], [p[1] for p in points], yerr=errors, markersize=4, linewidth=1.2,
                                         capsize=1.5, elinewidth=0.7, clip_on=False, label=method, **style[method])  # fmt: skip
                handles.setdefault(method, drawn_line)
            ax.set_xticks(range(len(levels)), [f"{level}\n{100 * regimes.share(model, level):.1f} %" for level in levels])
            ax.set_xlim(-0.5, len(levels) - 0.5)
            ax.margins(y=0.05)
            low, high = ax.get_ylim()
            ax.set_ylim(max(0.0, low), high)
            ax.set_title(f"{model}: {bench.TASK_KINDS[kind][1]}" + ("" if ratio is None else f", ratio {ratio:g}"))
            ax.set_xlabel("background level (near-duplicate share)")
            ax.set_ylabel(f"{bench.TASK_KINDS[kind][1]} ({unit})" if unit else f"{bench.TASK_KINDS[kind][1]} score")
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="outside right upper")
    return fig
