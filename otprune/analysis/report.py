"""Markdown tables, mean ± std cells and output files shared by the analyses."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path

import matplotlib

# Analyses run headless (CI, servers); pick the non-interactive backend before pyplot loads.
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from otprune.analysis.figures import DPI, STYLE  # noqa: E402

plt.rcParams.update(STYLE)

__all__ = ["markdown_table", "mean_std", "plt", "write_report"]


def mean_std(values: Sequence[float], digits: int = 2) -> str:
    """``"m ± s"`` over ``values`` (sample std; ``± 0`` for a single value)."""
    values = list(values)
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-flavoured Markdown table; cells are rendered with ``str``."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def write_report(out: Path, name: str, markdown: str, figures: dict[str, plt.Figure]) -> list[Path]:
    """Writes ``out/<name>.md`` and ``out/<figure>.png`` (closing each figure); returns the paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.md"]
    paths[0].write_text(markdown + "\n", encoding="utf-8")
    for figure_name, figure in figures.items():
        path = out / f"{figure_name}.png"
        figure.savefig(path, dpi=DPI, bbox_inches="tight")
        plt.close(figure)
        paths.append(path)
    return paths
