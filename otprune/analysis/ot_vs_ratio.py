"""Distance of each selector's kept set to the full token set over keep ratios (paper Fig. 3–4).

For every token matrix ``(N, d)``, ratio and selector in ``otprune.selectors.SELECTORS`` the kept
set ``k = budget(ratio, N)`` is measured against the full set by the exact empirical OT distance
(``measures.empirical_ot_distance``, POT's network simplex) and the Gaussian ``W2^2``
(``measures.gaussian_w2``), both on the column-normalised tokens, together with OTPrune's own
log-det objective (``measures.logdet_objective``). Relative distances divide by OTPrune's value on
the same image and ratio, then average over images.

TRIM ranks tokens by their distance to the prompt's text tokens, which neither the synthetic
tokens nor a directory of dumped visual tokens carry. It gets synthetic text instead: ``16``
vectors drawn from a Gaussian with the visual tokens' per-dimension mean and standard deviation
(seeded per image). Its numbers are therefore those of TRIM's RepMax stage after an
uninformative first-stage filter, not of TRIM with a real question.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from matplotlib.ticker import PercentFormatter

from otprune.analysis.figures import display_name
from otprune.analysis.report import markdown_table, plt
from otprune.measures import empirical_ot_distance, gaussian_w2, logdet_objective
from otprune.selectors import SELECTORS, budget
from otprune.synthetic_tokens import clustered_tokens

__all__ = [
    "DEFAULT_RATIOS",
    "Record",
    "figure",
    "load_token_dir",
    "render",
    "run_ot_vs_ratio",
    "synthetic_images",
    "synthetic_text",
]

DEFAULT_RATIOS: tuple[float, ...] = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5)
TEXT_TOKENS = 16
REFERENCE = "OURS"


@dataclass(frozen=True)
class Record:
    """One (image, ratio, selector) measurement."""

    image: str
    ratio: float
    k: int
    selector: str
    ot: float
    w2: float
    logdet: float


def synthetic_images(count: int, n: int, d: int) -> list[tuple[str, torch.Tensor]]:
    """``count`` clustered token matrices ``(n, d)`` (``synthetic.clustered_tokens``, seeds 0..)."""
    return [(f"clustered-{seed}", clustered_tokens(n, d, seed=seed)) for seed in range(count)]


def load_token_dir(directory: Path, limit: int | None = None) -> list[tuple[str, torch.Tensor]]:
    """The ``*.pt`` files of ``directory`` (sorted by name), each a floating tensor ``(N, d)``."""
    paths = sorted(Path(directory).glob("*.pt"))
    if not paths:
        raise ValueError(f"no .pt files in {directory}")
    images = []
    for path in paths[:limit]:
        tensor = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(tensor, torch.Tensor) or tensor.dim() != 2 or not tensor.is_floating_point():
            shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise ValueError(f"{path} must hold one floating-point tensor of shape (N, d); got {shape}")
        images.append((path.stem, tensor.float()))
    return images


def synthetic_text(tokens: torch.Tensor, seed: int, count: int = TEXT_TOKENS) -> torch.Tensor:
    """``(count, d)`` stand-in text embeddings with the tokens' per-dimension mean and std."""
    generator = torch.Generator().manual_seed(seed)
    x = tokens.float()
    noise = torch.randn(count, x.shape[1], generator=generator)
    return x.mean(0) + x.std(0) * noise


def _options(name: str, tokens: torch.Tensor, seed: int) -> dict:
    if name == "TRIM":
        return {"text": synthetic_text(tokens, seed)}
    if name == "RANDOM":
        return {"seed": seed}
    return {}


def run_ot_vs_ratio(images: list[tuple[str, torch.Tensor]], ratios=DEFAULT_RATIOS, selectors=tuple(SELECTORS), log=None) -> list[Record]:
    """Measures every selector at every ratio on every image; ``log`` gets one line per image."""
    records = []
    for seed, (name, tokens) in enumerate(images):
        start = time.perf_counter()
        for ratio in ratios:
            k = budget(ratio, tokens.shape[0])
            for selector in selectors:
                kept = SELECTORS[selector](tokens, k, **_options(selector, tokens, seed))
                records.append(
                    Record(
                        image=name, ratio=ratio, k=k, selector=selector,
                        ot=empirical_ot_distance(tokens, kept), w2=float(gaussian_w2(tokens, kept)),
                        logdet=float(logdet_objective(tokens, kept)),
                    )
                )  # fmt: skip
        if log is not None:
            log(f"ot-vs-ratio: {name} {tuple(tokens.shape)} in {time.perf_counter() - start:.1f} s")
    return records


def _mean(records: list[Record], selector: str, ratio: float, field: str, relative: bool = False) -> float:
    rows = [r for r in records if r.selector == selector and r.ratio == ratio]
    if not relative:
        return statistics.fmean(getattr(r, field) for r in rows)
    reference = {r.image: getattr(r, field) for r in records if r.selector == REFERENCE and r.ratio == ratio}
    return statistics.fmean(getattr(r, field) / reference[r.image] for r in rows)


def _grid(records: list[Record], field: str, relative: bool = False, digits: int = 4) -> str:
    ratios = sorted({r.ratio for r in records})
    selectors = list(dict.fromkeys(r.selector for r in records))
    rows = [[selector] + [f"{_mean(records, selector, ratio, field, relative):.{digits}f}" for ratio in ratios] for selector in selectors]
    return markdown_table(["selector"] + [f"{ratio:g}" for ratio in ratios], rows)


def _rank_line(records: list[Record], field: str) -> str:
    """Per ratio, OTPrune's rank among the selectors (1 = smallest mean distance)."""
    ratios = sorted({r.ratio for r in records})
    selectors = list(dict.fromkeys(r.selector for r in records))
    ranks = []
    for ratio in ratios:
        ordered = sorted(selectors, key=lambda s: _mean(records, s, ratio, field))
        ranks.append(f"{ratio:g}: {ordered.index(REFERENCE) + 1}/{len(selectors)}")
    return ", ".join(ranks)


def render(records: list[Record], *, source: str, seconds: float) -> str:
    """The Markdown report: mean distances per selector and ratio, and relative to OTPrune's."""
    images = sorted({r.image for r in records})
    return "\n".join(
        [
            "# OT distance of the kept set vs keep ratio (paper Fig. 3–4)",
            "",
            f"Tokens: {source}; {len(images)} image(s). Distances on column-normalised tokens; values are means over "
            "images. TRIM gets synthetic text tokens (Gaussian with the visual tokens' per-dimension mean and std), "
            "so its first stage is uninformative. OURS = OTPrune (γ = 0.01).",
            "",
            f"OTPrune's rank by empirical OT distance (1 = closest to the full set): {_rank_line(records, 'ot')}.",
            "",
            f"OTPrune's rank by Gaussian W2²: {_rank_line(records, 'w2')}.",
            "",
            "## Empirical OT distance (exact squared W2 between uniform empirical measures)",
            "",
            _grid(records, "ot"),
            "",
            "## Relative empirical OT distance (selector / OTPrune, same image and ratio)",
            "",
            _grid(records, "ot", relative=True, digits=3),
            "",
            "## Gaussian W2²",
            "",
            _grid(records, "w2"),
            "",
            "## Relative Gaussian W2² (selector / OTPrune)",
            "",
            _grid(records, "w2", relative=True, digits=3),
            "",
            "## OTPrune's objective log det(I + γ A_S A_Sᵀ), γ = 0.01 (higher = what OTPrune maximises)",
            "",
            _grid(records, "logdet", digits=2),
            "",
            f"Wall time: {seconds:.1f} s.",
        ]
    )


def figure(records: list[Record]) -> plt.Figure:
    """Three panels against the keep ratio: OT distance, Gaussian W2², OT distance / OTPrune's."""
    ratios = sorted({r.ratio for r in records})
    selectors = list(dict.fromkeys(r.selector for r in records))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6), layout="constrained")
    panels = (
        ("ot", False, "empirical OT distance", "OT distance, kept to full (log scale)"),
        ("w2", False, "Gaussian W2²", "W2², kept to full (log scale)"),
        ("ot", True, f"OT distance / {display_name(REFERENCE)}'s", f"OT distance ÷ {display_name(REFERENCE)}'s"),
    )
    for ax, (field, relative, title, ylabel) in zip(axes, panels):
        for selector in selectors:
            values = [_mean(records, selector, ratio, field, relative) for ratio in ratios]
            style = {"linewidth": 2.5, "color": "black"} if selector == REFERENCE else {"linewidth": 1.2}
            ax.plot(ratios, values, marker="o", markersize=4, label=display_name(selector), **style)
        ax.set_xlabel("keep ratio k / N (%)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.set_xticks(ratios)
        ax.xaxis.set_major_formatter(PercentFormatter(xmax=1, decimals=0))
        if not relative:
            ax.set_yscale("log")
    # Below the panels: inside, the legend covers the curves.
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncol=len(selectors))
    return fig
