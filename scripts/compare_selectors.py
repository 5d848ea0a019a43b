"""Run every selector on one synthetic LLaVA-sized token matrix and compare what it keeps.

    python scripts/compare_selectors.py                    # N=576, d=4096, ratio 0.098 (k=56)
    python scripts/compare_selectors.py --n 2880 --ratio 0.111 --device cuda

Prints, per method: kept count, OTPrune's log-det objective, the Gaussian W2^2 and the exact
empirical OT distance of the kept set to the full set, and the selector's median time.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import torch

from otprune.measures import empirical_ot_distance, gaussian_w2, logdet_objective
from otprune.selectors import SELECTORS, budget
from otprune.synthetic_tokens import clustered_tokens

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=576, help="visual tokens per image (default 576)")
    parser.add_argument("--d", type=int, default=4096, help="embedding width (default 4096)")
    parser.add_argument("--ratio", type=float, default=0.098, help="kept fraction, in (0, 1] (default 0.098)")
    parser.add_argument("--dtype", choices=DTYPES, default="float16")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per method (median shown)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", default=",".join(SELECTORS), help="comma-separated SELECTORS names")
    args = parser.parse_args(argv)
    if args.n < 1 or args.d < 1:
        parser.error(f"--n and --d must be >= 1; got --n {args.n} --d {args.d}")
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1; got {args.repeats}")
    unknown = [m for m in args.methods.upper().split(",") if m not in SELECTORS]
    if unknown:
        parser.error(f"unknown method(s) {', '.join(unknown)}; allowed: {', '.join(SELECTORS)}")
    try:
        budget(args.ratio, args.n)
    except ValueError as error:
        parser.error(f"--ratio: {error}")
    return args


def median_time(run, repeats: int, device: torch.device) -> tuple[torch.Tensor, float]:
    run()  # warm-up: first-call allocations and kernel compilation are not the selector's cost
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        kept = run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return kept, statistics.median(times)


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    tokens = clustered_tokens(args.n, args.d, seed=args.seed, dtype=DTYPES[args.dtype]).to(device)
    text = clustered_tokens(24, args.d, seed=args.seed + 1, dtype=DTYPES[args.dtype]).to(device)
    k = budget(args.ratio, args.n)
    print(f"tokens: N={args.n} d={args.d} {args.dtype} on {device}; keep k={k} (ratio {args.ratio})")
    print(f"{'method':<10}{'kept':>6}{'log-det':>10}{'W2^2':>9}{'OT dist':>9}{'median ms':>11}")
    for name in args.methods.upper().split(","):
        options = {"text": text} if name == "TRIM" else {}
        kept, seconds = median_time(functools.partial(SELECTORS[name], tokens, k, **options), args.repeats, device)
        print(
            f"{name:<10}{kept.numel():>6}{logdet_objective(tokens, kept).item():>10.3f}"
            f"{gaussian_w2(tokens, kept).item():>9.4f}{empirical_ot_distance(tokens, kept):>9.4f}"
            f"{seconds * 1e3:>11.2f}"
        )


if __name__ == "__main__":
    main()
