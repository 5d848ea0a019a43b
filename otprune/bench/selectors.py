"""Selector benchmark (issue 6): OTPrune against a per-step reference greedy, DivPrune and the floor.

    otprune bench selectors                  # every shape, GPU if there is one
    otprune bench selectors --device cpu     # the same table on the CPU
    otprune bench selectors --quick          # three cases, one repeat (CI)

Shapes: LLaVA-1.5 (N = 576, d = 4096, k = 56, 64, 128, 192) and LLaVA-1.6 (N = 2880, d = 4096,
k = 320), batch 1 and 16, float16 tokens. Every figure is the median over ``--repeats`` rounds
after one warm-up round, a round running each contender once in turn; GPU runs are timed with
CUDA events, CPU runs with ``time.perf_counter``. Columns:

- ``otprune``: ``select_otprune`` on the whole batch, its default greedy path for the device;
- ``fused``: the same with ``greedy="triton"`` (one fused kernel), on a GPU with triton installed;
- ``per-step``: ``per_step_reference.per_step_otprune``, the published code's way (one image at a
  time, one host sync per token, identity built on the host); ``speedup`` = per-step / the faster
  of otprune and fused;
- ``divprune``: ``select_divprune`` on the whole batch;
- ``floor``: ``otprune_kernel`` alone (the kernel's matrix products) on float32 tokens, image by
  image on a CPU as the selector does; ``floor %`` = its share of ``otprune``, the rest being the
  greedy, the float32 copy and the finiteness check;
- ``b16/b1``: OTPrune's batch-16 time over its batch-1 time for the same (N, k);
- ``float32 picks``: whether the timed float32 runs of OTPrune and the per-step reference kept the
  same tokens. Their exact agreement is asserted in float64 before timing (``check_same_picks``).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from otprune.bench.per_step_reference import per_step_otprune
from otprune.selectors import otprune_kernel, select_divprune, select_otprune
from otprune.synthetic_tokens import clustered_tokens

D = 4096
FULL_SHAPES = [(576, k) for k in (56, 64, 128, 192)] + [(2880, 320)]
QUICK_SHAPES = [(576, 64), (2880, 320)]
BATCHES = (1, 16)
# Images per case on which the exact (float64) agreement with the per-step reference is asserted.
CHECKED_IMAGES = 4


@dataclass(frozen=True)
class Row:
    n: int
    k: int
    batch: int
    otprune: float
    per_step: float
    divprune: float
    floor: float
    divergent: int
    fused: float | None = None

    @property
    def best(self) -> tuple[float, str]:
        """OTPrune's faster greedy path here: the default one or the fused Triton kernel."""
        if self.fused is not None and self.fused < self.otprune:
            return self.fused, "fused"
        return self.otprune, "default"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="otprune bench selectors", description=__doc__.split("\n\n")[0])
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", default=default_device, help=f"cpu or cuda (default {default_device})")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per figure (default 20 on GPU, 3 on CPU; 1 with --quick)")
    parser.add_argument("--quick", action="store_true", help="N=576 k=64 at batch 1 and 16, N=2880 k=320 at batch 1; for CI")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic tokens")
    args = parser.parse_args(argv)
    if args.device not in ("cpu", "cuda"):
        parser.error(f"--device {args.device!r} is not allowed; use cpu or cuda")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda was asked for but torch sees no CUDA GPU; use --device cpu")
    if args.repeats is None:
        args.repeats = 1 if args.quick else (20 if args.device == "cuda" else 3)
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1; got {args.repeats}")
    return args


def median_ms(runs: dict[str, Callable[[], object]], repeats: int, device: torch.device) -> dict[str, float]:
    """Median wall time in ms of each ``runs[name]()`` over ``repeats`` rounds, after one warm-up.

    Each round runs every contender once, in turn, so a machine that speeds up or slows down
    during the benchmark (shared cores, clocks) shifts them all alike and the ratios stay fair.
    """
    for run in runs.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            times[name].append(_time_ms(run, device))
    return {name: statistics.median(values) for name, values in times.items()}


def _time_ms(run: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        run()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end)
    start = time.perf_counter()
    run()
    return (time.perf_counter() - start) * 1e3


def fused_available(device: torch.device) -> bool:
    """Whether the fused Triton greedy is timed: on a GPU with triton installed."""
    return device.type == "cuda" and importlib.util.find_spec("triton") is not None


def check_same_picks(tokens: torch.Tensor, k: int, fused: bool) -> None:
    """Asserts ``select_otprune`` and the per-step reference keep the same tokens of ``tokens``.

    Checked in float64 on at most ``CHECKED_IMAGES`` images (still batched): in float32 a batched
    greedy and an image-by-image one reduce in different orders, so two candidates whose residual
    variances agree to float32 rounding may swap and send the rest of the greedy down another,
    equally good path. Float64 leaves no such ties, so any difference there is a real one.
    """
    exact = tokens[:CHECKED_IMAGES].double()
    reference = per_step_otprune(exact, k)
    for path in ("triton",) * fused + (None,):
        fast = select_otprune(exact, k, greedy=path)
        assert torch.equal(fast, reference), f"select_otprune (greedy={path}) and the per-step reference disagree at N={tokens.shape[-2]} k={k}"


def float32_divergences(tokens: torch.Tensor, k: int) -> int:
    """Images of ``tokens`` ``(B, N, d)`` where the timed float32 runs of both picked differently."""
    same = (select_otprune(tokens, k) == per_step_otprune(tokens, k)).all(-1)
    return int((~same).sum())


def measure(n: int, k: int, batch: int, repeats: int, device: torch.device, seed: int) -> Row:
    tokens = clustered_tokens(n, D, seed=seed, dtype=torch.float16, batch=batch).to(device)
    fused = fused_available(device)
    check_same_picks(tokens, k, fused)
    work = tokens.float()
    # The kernel built as the selector builds it: image by image on a CPU, the batch at once on a GPU.
    images = work.split(1) if device.type == "cpu" else (work,)
    runs = {
        "otprune": lambda: select_otprune(tokens, k),
        "per_step": lambda: per_step_otprune(tokens, k),
        "divprune": lambda: select_divprune(tokens, k),
        "floor": lambda: [otprune_kernel(image) for image in images],
    }
    if fused:
        runs["fused"] = lambda: select_otprune(tokens, k, greedy="triton")
    medians = median_ms(runs, repeats, device)
    return Row(n=n, k=k, batch=batch, **medians, divergent=float32_divergences(tokens, k))


def format_table(rows: list[Row]) -> str:
    single = {(r.n, r.k): r.otprune for r in rows if r.batch == 1}
    header = (
        f"{'N':>5} {'d':>5} {'k':>4} {'batch':>5} | {'otprune ms':>10} {'fused ms':>9} {'per-step ms':>11} {'speedup':>7} | "
        f"{'divprune ms':>11} | {'floor ms':>9} {'floor %':>7} | {'b16/b1':>6} | float32 picks vs per-step"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        ratio = r.otprune / single[(r.n, r.k)] if r.batch > 1 and (r.n, r.k) in single else None
        picks = "identical" if r.divergent == 0 else f"{r.divergent}/{r.batch} differ (float32 near-tie)"
        fused = "-" if r.fused is None else f"{r.fused:.3f}"
        lines.append(
            f"{r.n:>5} {D:>5} {r.k:>4} {r.batch:>5} | {r.otprune:>10.3f} {fused:>9} {r.per_step:>11.3f} "
            f"{r.per_step / r.best[0]:>6.1f}x | {r.divprune:>11.3f} | {r.floor:>9.3f} {100 * r.floor / r.otprune:>6.1f}% | "
            f"{'' if ratio is None else f'{ratio:.2f}x':>6} | {picks}"
        )
    return "\n".join(lines)


def _find(rows: list[Row], n: int, k: int, batch: int) -> Row | None:
    return next((r for r in rows if (r.n, r.k, r.batch) == (n, k, batch)), None)


def target_lines(rows: list[Row], device: torch.device) -> list[str]:
    """Each target of issue 6 beside the figure it is judged on, and whether it is met."""

    def verdict(ok: bool) -> str:
        return "MET" if ok else "NOT MET"

    lines = []
    if device.type == "cuda":
        r64 = _find(rows, 576, 64, 1)
        r320 = _find(rows, 2880, 320, 1)
        if r64:
            ms, path = r64.best
            lines.append(f"GPU  N=576 k=64 b=1 OTPrune <= 0.3 ms: {ms:.3f} ms ({path}) -> {verdict(ms <= 0.3)}")
            speedup = r64.per_step / ms
            lines.append(f"GPU  N=576 k=64 b=1 >= 10x faster than per-step: {speedup:.1f}x ({path}) -> {verdict(speedup >= 10)}")
        if r320:
            ms, path = r320.best
            lines.append(f"GPU  N=2880 k=320 b=1 <= 2 ms: {ms:.3f} ms ({path}) -> {verdict(ms <= 2)}")
        for r in rows:
            one = _find(rows, r.n, r.k, 1)
            if r.batch > 1 and one:
                (ms, path), (ms_one, path_one) = r.best, one.best
                ratio = ms / ms_one
                lines.append(f"GPU  N={r.n} k={r.k} batch {r.batch} <= 2x batch 1: {ratio:.2f}x ({path} / {path_one}) -> {verdict(ratio <= 2)}")
    else:
        lines.append("GPU  targets (<= 0.3 ms at N=576 k=64 b=1; >= 10x vs per-step; N=2880 k=320 <= 2 ms;")
        lines.append("     batch 16 <= 2x batch 1): NOT MEASURED -- this is a CPU run; rerun with --device cuda")
        for r in rows:
            if r.n == 576:
                lines.append(
                    f"CPU  N=576 k={r.k} b={r.batch} OTPrune not slower than per-step: "
                    f"{r.otprune:.1f} vs {r.per_step:.1f} ms -> {verdict(r.otprune <= r.per_step)}"
                )
    return lines


def main(argv=None) -> list[Row]:
    args = parse_args(argv)
    device = torch.device(args.device)
    shapes = QUICK_SHAPES if args.quick else FULL_SHAPES
    cases = [(n, k, b) for n, k in shapes for b in BATCHES if not (args.quick and n == 2880 and b > 1)]
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"Selector benchmark on {where}; float16 tokens, d={D}; median of {args.repeats} runs (+1 warm-up)")
    rows = []
    for n, k, batch in cases:
        rows.append(measure(n, k, batch, args.repeats, device, args.seed))
        print(f"  measured N={n} k={k} batch={batch}", flush=True)
    print()
    print(format_table(rows))
    print()
    print("Targets (issue 6):")
    for line in target_lines(rows, device):
        print("  " + line)
    return rows


if __name__ == "__main__":
    main()
