"""Command line: ``python -m otprune.analysis {table2,ot-vs-ratio,gamma,hypothesis,regimes} [--out DIR] [options]``."""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

from otprune.analysis import gamma as gamma_analysis
from otprune.analysis import hypothesis, ot_vs_ratio, regimes, regimes_figure, regimes_report, table2
from otprune.analysis.report import write_report
from otprune.selectors import DEFAULT_GAMMA, SELECTORS

QUICK_TABLE2 = {"seeds": 2, "samples": 2000}
FULL_TABLE2 = {"seeds": 5, "samples": 100_000}
QUICK_OT = {"images": 1, "n": 144, "d": 256, "ratios": (0.1, 0.3)}
FULL_OT = {"images": 4, "n": 576, "d": 4096, "ratios": ot_vs_ratio.DEFAULT_RATIOS}
QUICK_GAMMA_SHAPES = (gamma_analysis.Shape("clustered", 144, 256, 14),)
FULL_GAMMA_SHAPES = (gamma_analysis.Shape("clustered", 576, 4096, 56), gamma_analysis.Shape("gaussian", 576, 4096, 56))
QUICK_GAMMAS = (1e-6, 1e-4, 1e-2, 1.0, 1e2)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m otprune.analysis", description=__doc__)
    sub = parser.add_subparsers(dest="name", required=True, metavar="{table2,ot-vs-ratio,gamma,hypothesis,regimes}")

    t2 = sub.add_parser("table2", help="the synthetic study (paper Table 2)")
    t2.add_argument("--seeds", help=f"seeds per configuration (default {FULL_TABLE2['seeds']}, quick {QUICK_TABLE2['seeds']})")
    t2.add_argument("--samples", help=f"Monte-Carlo subsets per seed (default {FULL_TABLE2['samples']}, quick {QUICK_TABLE2['samples']})")
    t2.add_argument("--exhaustive-limit", default="1000000", help="enumerate every subset when C(N, k) <= this (default 10^6)")
    t2.add_argument("--gamma", default=str(DEFAULT_GAMMA), help=f"OTPrune's γ (default {DEFAULT_GAMMA})")

    ot = sub.add_parser("ot-vs-ratio", help="OT distance of the kept set over keep ratios (paper Fig. 3-4)")
    ot.add_argument("--tokens", help="directory of .pt tensors (N, d); default: synthetic clustered tokens")
    ot.add_argument("--limit", help="use at most this many .pt files")
    ot.add_argument("--images", help=f"synthetic images (default {FULL_OT['images']}, quick {QUICK_OT['images']})")
    ot.add_argument("--n", help=f"synthetic tokens per image (default {FULL_OT['n']}, quick {QUICK_OT['n']})")
    ot.add_argument("--d", help=f"synthetic token width (default {FULL_OT['d']}, quick {QUICK_OT['d']})")
    ot.add_argument("--ratios", help="comma-separated keep ratios in (0, 1] (default 0.05,0.1,...,0.5; quick 0.1,0.3)")
    ot.add_argument("--selectors", help=f"comma-separated selectors (default all: {','.join(SELECTORS)})")

    ga = sub.add_parser("gamma", help="OTPrune's subsets over a log grid of γ")
    ga.add_argument(
        "--shape", action="append",
        help="KIND:N:D:K with KIND clustered or gaussian; repeatable (default clustered:576:4096:56 and "
        "gaussian:576:4096:56; quick clustered:144:256:14)",
    )  # fmt: skip
    ga.add_argument("--gammas", help="comma-separated γ values > 0 (default 1e-6 .. 1e2 in half decades)")

    for command in (t2, ot, ga):
        command.add_argument("--quick", action="store_true", help="a small run for CI (seconds)")

    hy = sub.add_parser("hypothesis", help="OT distance vs score across methods, from harness results (paper Fig. 2)")
    hy.add_argument("runs", nargs="?", default="runs/smoke", help="a harness run folder (default runs/smoke)")

    rg = sub.add_parser("regimes", help="scores, OT distance and the OTPrune/DivPrune crossover over the synthetic benchmark's redundancy levels")
    rg.add_argument("runs", nargs="?", default="runs/regimes", help="a harness run folder (default runs/regimes, from configs/regimes.yaml)")

    for command in (t2, ot, ga, hy, rg):
        command.add_argument("--out", help="output directory (default runs/analysis/<name>)")
    return parser


def _int(parser, value, option: str, minimum: int) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        parser.error(f"{option} must be an integer >= {minimum}; got {value!r}")
    if number < minimum:
        parser.error(f"{option} must be an integer >= {minimum}; got {value!r}")
    return number


def _floats(parser, value: str, option: str, *, upper: float | None) -> tuple[float, ...]:
    allowed = "in (0, 1]" if upper is not None else "finite and > 0"
    try:
        numbers = tuple(float(part) for part in value.split(","))
    except ValueError:
        parser.error(f"{option} must be comma-separated numbers {allowed}; got {value!r}")
    bad = [x for x in numbers if not math.isfinite(x) or x <= 0 or (upper is not None and x > upper)]
    if bad:
        parser.error(f"{option} values must be {allowed}; got {value!r}")
    return numbers


def _shape(parser, value: str) -> gamma_analysis.Shape:
    parts = value.split(":")
    if len(parts) != 4 or parts[0] not in ("clustered", "gaussian"):
        parser.error(f"--shape must be KIND:N:D:K with KIND clustered or gaussian; got {value!r}")
    n, d, k = (_int(parser, part, f"--shape {name}", 1) for part, name in zip(parts[1:], "NDK"))
    if k > n:
        parser.error(f"--shape K must be <= N; got {value!r}")
    return gamma_analysis.Shape(parts[0], n, d, k)


def _table2(parser, args) -> tuple[str, dict]:
    preset = QUICK_TABLE2 if args.quick else FULL_TABLE2
    seeds = _int(parser, args.seeds, "--seeds", 1) if args.seeds is not None else preset["seeds"]
    samples = _int(parser, args.samples, "--samples", 1) if args.samples is not None else preset["samples"]
    limit = _int(parser, args.exhaustive_limit, "--exhaustive-limit", 0)
    (gamma,) = _floats(parser, args.gamma, "--gamma", upper=None)
    start = time.perf_counter()
    results = table2.run_table2(seeds=seeds, samples=samples, exhaustive_limit=limit, gamma=gamma, log=_log)
    seconds = time.perf_counter() - start
    markdown = table2.render(results, samples=samples, seconds=seconds, quick=args.quick)
    return markdown, {"table2": table2.figure(results)}


def _ot_vs_ratio(parser, args) -> tuple[str, dict]:
    preset = QUICK_OT if args.quick else FULL_OT
    ratios = _floats(parser, args.ratios, "--ratios", upper=1.0) if args.ratios else preset["ratios"]
    selectors = tuple(SELECTORS)
    if args.selectors:
        selectors = tuple(s.strip().upper() for s in args.selectors.split(","))
        unknown = [s for s in selectors if s not in SELECTORS]
        if unknown:
            parser.error(f"--selectors: unknown {', '.join(unknown)}; allowed: {', '.join(SELECTORS)}")
        if ot_vs_ratio.REFERENCE not in selectors:
            parser.error(f"--selectors must include {ot_vs_ratio.REFERENCE} (distances are also shown relative to it)")
    if args.tokens:
        directory = Path(args.tokens)
        if not directory.is_dir():
            parser.error(f"--tokens must be a directory of .pt files; got {args.tokens!r}")
        limit = _int(parser, args.limit, "--limit", 1) if args.limit is not None else None
        try:
            images = ot_vs_ratio.load_token_dir(directory, limit)
        except ValueError as error:
            parser.error(f"--tokens: {error}")
        source = f"{len(images)} tensor(s) from {directory}"
    else:
        count = _int(parser, args.images, "--images", 1) if args.images is not None else preset["images"]
        n = _int(parser, args.n, "--n", 2) if args.n is not None else preset["n"]
        d = _int(parser, args.d, "--d", 1) if args.d is not None else preset["d"]
        images = ot_vs_ratio.synthetic_images(count, n, d)
        source = f"synthetic clustered tokens (otprune.synthetic_tokens.clustered_tokens), N={n}, d={d}"
    start = time.perf_counter()
    records = ot_vs_ratio.run_ot_vs_ratio(images, ratios, selectors, log=_log)
    markdown = ot_vs_ratio.render(records, source=source, seconds=time.perf_counter() - start)
    return markdown, {"ot_vs_ratio": ot_vs_ratio.figure(records)}


def _gamma(parser, args) -> tuple[str, dict]:
    shapes = [_shape(parser, s) for s in args.shape] if args.shape else None
    shapes = shapes or list(QUICK_GAMMA_SHAPES if args.quick else FULL_GAMMA_SHAPES)
    default_gammas = QUICK_GAMMAS if args.quick else gamma_analysis.DEFAULT_GAMMAS
    gammas = _floats(parser, args.gammas, "--gammas", upper=None) if args.gammas else default_gammas
    results, seconds = gamma_analysis.timed_run(shapes, sorted(gammas), log=_log)
    return gamma_analysis.render(results, seconds=seconds), {"gamma": gamma_analysis.figure(results)}


def _hypothesis(parser, args) -> tuple[str, dict]:
    source = Path(args.runs)
    if not source.is_dir():
        parser.error(f"runs must be a harness run folder (runs/<config>); got {args.runs!r}")
    try:
        points, skipped = hypothesis.load_points(source)
    except ValueError as error:
        parser.error(str(error))
    return hypothesis.render(points, source, skipped), {"hypothesis": hypothesis.figure(points, _units())}


def _units() -> dict[str, str]:
    """benchmark -> unit of every task in configs/tasks.yaml."""
    from otprune.report import load_yaml

    return {spec["benchmark"]: spec["unit"] for group in load_yaml("tasks.yaml").values() for spec in group.values()}


def _regimes(parser, args) -> tuple[str, dict, dict]:
    source = Path(args.runs)
    if not source.is_dir():
        parser.error(f"runs must be a harness run folder (runs/<config>); got {args.runs!r}")
    try:
        found = regimes.load_regimes(source)
    except ValueError as error:
        parser.error(str(error))
    units = _units()
    return regimes_report.render(found, units), {"regimes": regimes_figure.figure(found, units)}, {"regimes.csv": regimes_report.to_csv(found)}


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# name -> handler(parser, args) -> (markdown, {figure name: figure}[, {file name: text}])
ANALYSES = {"table2": _table2, "ot-vs-ratio": _ot_vs_ratio, "gamma": _gamma, "hypothesis": _hypothesis, "regimes": _regimes}


def main(argv: list[str] | None = None) -> int:
    """Runs one analysis, writes its Markdown, PNGs (and other files, the regimes' CSV), prints the Markdown; returns the exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    markdown, figures, *files = ANALYSES[args.name](parser, args)
    out = Path(args.out) if args.out else Path("runs") / "analysis" / args.name
    paths = write_report(out, args.name.replace("-", "_"), markdown, figures)
    for name, text in (files[0] if files else {}).items():
        (out / name).write_text(text, encoding="utf-8")
        paths.append(out / name)
    print(markdown)
    _log("wrote " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
