"""The paper's synthetic study (Table 2): how good is each selector's subset among all k-subsets?

Tokens are i.i.d. standard Gaussian ``(N, d)`` (float64), one draw per seed. For every
configuration the reference population is every k-subset when ``C(N, k) <= exhaustive_limit``,
otherwise ``samples`` uniform Monte-Carlo subsets (the paper used 10^7). Each selector's subset and
the population are scored on the column-normalised ``X_hat`` with ``S = X_hat^T X_hat / N`` and
``S_S = X_hat_S^T X_hat_S / k`` (as ``otprune.measures``) under:

- **trace**: the paper's ``tr((S^1/2 S_S S^1/2)^1/2)``, higher is better. Normalising ``S`` by N
  and ``S_S`` by k scales every k-subset's value by the same ``1/sqrt(N k)``, so win rates and
  optimality ratios do not depend on that choice;
- **w2**: the full Gaussian ``W2^2 = tr S + tr S_S - 2 trace``, lower is better. Here the
  normalisation matters (unnormalised, ``tr S_S`` would grow with k and never match ``tr S``);
  the per-token normalisation is the one that makes ``W2`` a distance between distributions;
- **logdet**: OTPrune's own surrogate ``log det(I + gamma K_S)``, for reference.

Per method and objective:

- *win rate* = % of population subsets with a strictly worse value than the method's subset;
- *optimality ratio* = method / best for trace and logdet, and best / method for ``W2^2`` (so it
  is in ``(0, 1]`` for both and 1 means optimal); "best" is over the population and the four
  methods' subsets, so a Monte-Carlo population cannot make a ratio exceed 1;
- *range-normalised* = (method − worst) / (best − worst) (for ``W2^2`` with signs flipped): where
  the method sits between the worst and best subset found, a scale-free position that does not
  depend on how far the objective is from zero (the paper does not define its ratio further).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from otprune.analysis.report import markdown_table, mean_std, plt
from otprune.analysis.subsets import DEFAULT_CHUNK, SubsetScorer, enumerate_subsets, sample_subsets, score_subsets
from otprune.selectors import DEFAULT_GAMMA, select_divprune, select_dpp, select_otprune, select_random

__all__ = ["CONFIGS", "METHODS", "OBJECTIVES", "PAPER", "ConfigResult", "run_config", "run_table2", "render"]

CONFIGS: tuple[tuple[int, int, int], ...] = ((20, 10, 5), (30, 20, 10), (100, 50, 30), (100, 80, 50), (1000, 256, 100))
METHODS: tuple[str, ...] = ("OTPrune", "DivPrune", "DPP", "Random")
# Objective name -> True when higher is better.
OBJECTIVES: dict[str, bool] = {"trace": True, "w2": False, "logdet": True}
# The paper's Table 2 (win %, optimality %), per configuration in CONFIGS order (METHOD.md).
PAPER: dict[str, tuple[tuple[float, float], ...]] = {
    "DivPrune": ((60.14, 74.53), (84.62, 76.48), (88.77, 92.20), (92.14, 95.80), (97.59, 97.71)),
    "OTPrune": ((94.56, 87.81), (99.49, 93.98), (99.99, 100.0), (100.0, 100.0), (100.0, 100.0)),
}


@dataclass
class ConfigResult:
    """One configuration over all seeds.

    ``metrics[objective][method][metric]`` is the list over seeds of ``metric`` in
    ``("win", "opt", "range")``, all in percent.
    """

    n: int
    d: int
    k: int
    exhaustive: bool
    population: int
    seeds: int
    seconds: float
    metrics: dict[str, dict[str, dict[str, list[float]]]] = field(default_factory=dict)


def _method_subsets(tokens: torch.Tensor, k: int, seed: int, gamma: float) -> torch.Tensor:
    """``(len(METHODS), k)`` subsets, rows in ``METHODS`` order."""
    picks = {
        "OTPrune": select_otprune(tokens, k, gamma=gamma),
        "DivPrune": select_divprune(tokens, k),
        "DPP": select_dpp(tokens, k),
        "Random": select_random(tokens, k, seed=seed),
    }
    return torch.stack([picks[name] for name in METHODS])


def _compare(population: torch.Tensor, methods: torch.Tensor, higher_better: bool) -> dict[str, torch.Tensor]:
    """``population`` ``(M,)``, ``methods`` ``(R,)`` -> win / opt / range, each ``(R,)`` percent."""
    sign = 1.0 if higher_better else -1.0
    pop, met = sign * population, sign * methods
    win = (pop[None, :] < met[:, None]).double().mean(-1) * 100
    best = torch.maximum(pop.max(), met.max())
    worst = torch.minimum(pop.min(), met.min())
    # With higher-better values f: f / f_best; with lower-better values g = -f: g_best / g.
    opt = (methods / (sign * best)) if higher_better else ((-best) / methods)
    spread = (best - worst).clamp_min(torch.finfo(torch.float64).tiny)
    return {"win": win, "opt": opt * 100, "range": (met - worst) / spread * 100}


def run_config(
    n: int,
    d: int,
    k: int,
    seed: int,
    *,
    samples: int,
    exhaustive_limit: int = 10**6,
    gamma: float = DEFAULT_GAMMA,
    chunk: int = DEFAULT_CHUNK,
) -> tuple[bool, int, dict[str, dict[str, dict[str, float]]]]:
    """One seed of one configuration.

    Returns ``(exhaustive, population size, metrics[objective][method][metric])`` with the
    metrics of ``_compare`` as floats.
    """
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randn(n, d, generator=generator, dtype=torch.float64)
    scorer = SubsetScorer.from_tokens(tokens)
    exhaustive = math.comb(n, k) <= exhaustive_limit
    population = enumerate_subsets(n, k) if exhaustive else sample_subsets(n, k, samples, generator)
    pop_scores = score_subsets(scorer, population, gamma=gamma, chunk=chunk)
    method_scores = score_subsets(scorer, _method_subsets(tokens, k, seed, gamma), gamma=gamma, chunk=chunk)
    metrics = {}
    for objective, higher_better in OBJECTIVES.items():
        compared = _compare(pop_scores[objective], method_scores[objective], higher_better)
        metrics[objective] = {method: {metric: float(values[i]) for metric, values in compared.items()} for i, method in enumerate(METHODS)}
    return exhaustive, population.shape[0], metrics


def run_table2(
    *,
    configs=CONFIGS,
    seeds: int = 5,
    samples: int = 100_000,
    exhaustive_limit: int = 10**6,
    gamma: float = DEFAULT_GAMMA,
    chunk: int = DEFAULT_CHUNK,
    log=None,
) -> list[ConfigResult]:
    """Runs every configuration for seeds ``0 .. seeds-1``; ``log`` (e.g. ``print``) gets progress."""
    results = []
    for n, d, k in configs:
        start = time.perf_counter()
        result = ConfigResult(n, d, k, exhaustive=False, population=0, seeds=seeds, seconds=0.0)
        for seed in range(seeds):
            exhaustive, size, metrics = run_config(n, d, k, seed, samples=samples, exhaustive_limit=exhaustive_limit, gamma=gamma, chunk=chunk)
            result.exhaustive, result.population = exhaustive, size
            for objective, by_method in metrics.items():
                for method, values in by_method.items():
                    slot = result.metrics.setdefault(objective, {}).setdefault(method, {})
                    for metric, value in values.items():
                        slot.setdefault(metric, []).append(value)
        result.seconds = time.perf_counter() - start
        if log is not None:
            log(f"table2: (N={n}, d={d}, k={k}) {_population_text(result)} x {seeds} seeds in {result.seconds:.1f} s")
        results.append(result)
    return results


def _population_text(result: ConfigResult) -> str:
    kind = "all" if result.exhaustive else "Monte-Carlo"
    return f"{kind} {result.population:,} subsets"


def _paper_cell(method: str, index: int, metric: int) -> str:
    if method not in PAPER or index >= len(PAPER[method]):
        return "—"
    return f"{PAPER[method][index][metric]:.2f}"


def render(results: list[ConfigResult], *, samples: int, seconds: float, quick: bool) -> str:
    """The Markdown report: the main table (trace and W2² side by side, with the paper's figures),
    the range-normalised and log-det table, and how the population was formed."""
    headers = [
        "N, d, k", "subsets", "method",
        "trace win %", "trace opt %", "W2² win %", "W2² opt %", "paper win %", "paper opt %",
    ]  # fmt: skip
    rows, extra_rows = [], []
    for result in results:
        index = CONFIGS.index((result.n, result.d, result.k)) if (result.n, result.d, result.k) in CONFIGS else -1
        config = f"{result.n}, {result.d}, {result.k}"
        for method in METHODS:
            trace, w2, logdet = (result.metrics[o][method] for o in ("trace", "w2", "logdet"))
            paper = [_paper_cell(method, index, i) if index >= 0 else "—" for i in (0, 1)]
            rows.append(
                [config, _population_text(result), method,
                 mean_std(trace["win"]), mean_std(trace["opt"]), mean_std(w2["win"]), mean_std(w2["opt"]), *paper]
            )  # fmt: skip
            extra_rows.append(
                [config, method, mean_std(trace["range"]), mean_std(w2["range"]), mean_std(logdet["win"]),
                 mean_std(logdet["opt"])]
            )  # fmt: skip
    seeds = results[0].seeds if results else 0
    lines = [
        "# Table 2 — synthetic study" + (" (quick)" if quick else ""),
        "",
        f"i.i.d. N(0, 1) tokens, {seeds} seeds per configuration (mean ± std over seeds); every k-subset when "
        f"C(N, k) ≤ 10^6, otherwise {samples:,} Monte-Carlo subsets per seed (the paper: 10^7). "
        "Objectives on column-normalised X̂ with Σ = X̂ᵀX̂/N, Σ_S = X̂_SᵀX̂_S/k.",
        "",
        "- **trace** = tr((Σ^½ Σ_S Σ^½)^½), higher is better; opt % = method / best.",
        "- **W2²** = tr Σ + tr Σ_S − 2·trace, lower is better; opt % = best / method (1 = optimal).",
        "- win % = share of the subsets with a strictly worse value than the method's subset; 'best' is over the subsets scored and the four methods' subsets.",
        "- paper = the paper's Table 2 (win %, optimality %), under its trace objective.",
        "",
        markdown_table(headers, rows),
        "",
        "## Range-normalised position and OTPrune's own surrogate",
        "",
        "range % = (method − worst) / (best − worst) over the subsets scored (sign-flipped for W2²). "
        "log det = log det(I + γ K_S), the objective OTPrune's greedy maximises.",
        "",
        markdown_table(["N, d, k", "method", "trace range %", "W2² range %", "log det win %", "log det opt %"], extra_rows),
        "",
        f"Wall time: {seconds:.1f} s (" + ", ".join(f"{r.n}/{r.d}/{r.k}: {r.seconds:.1f} s" for r in results) + ").",
    ]
    return "\n".join(lines)


def figure(results: list[ConfigResult]) -> plt.Figure:
    """Win rate per configuration and method, trace and W2² side by side, paper's figures marked."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4), sharey=True)
    labels = [f"{r.n}/{r.d}/{r.k}" for r in results]
    width = 0.8 / len(METHODS)
    for ax, objective, title in zip(axes, ("trace", "w2"), ("trace objective (paper)", "Gaussian W2²")):
        for m, method in enumerate(METHODS):
            means = [sum(r.metrics[objective][method]["win"]) / r.seeds for r in results]
            positions = [i + (m - (len(METHODS) - 1) / 2) * width for i in range(len(results))]
            ax.bar(positions, means, width, label=method)
            if method in PAPER and objective == "trace":
                paper = [PAPER[method][CONFIGS.index((r.n, r.d, r.k))][0] if (r.n, r.d, r.k) in CONFIGS else math.nan for r in results]
                ax.scatter(positions, paper, marker="_", s=200, linewidths=2, color="black", zorder=3, label="paper" if m == 0 else None)
        ax.set_xticks(range(len(results)), labels)
        ax.set_xlabel("tokens N / width d / kept k")
        ax.set_title(f"win rate, {title}")
    axes[0].set_ylabel("win rate (% of subsets beaten)")
    fig.tight_layout()
    # Above the panels: inside, the legend would cover bars or the paper's ticks.
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=len(METHODS) + 1)
    return fig
