"""The benchmarks: ``otprune bench selectors`` (the selectors alone, issue 6) and ``otprune bench
prefill`` (LLaVA-shaped prefill and decode end to end). Each prints its table and targets."""

from __future__ import annotations

import importlib
import sys

BENCHMARKS = {"selectors": "otprune.bench.selectors", "prefill": "otprune.bench.prefill"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    usage = f"usage: otprune bench {{{','.join(BENCHMARKS)}}} [options]   (otprune bench NAME --help for them)"
    if argv[:1] in (["-h"], ["--help"]):
        print(usage)
        return 0
    if not argv or argv[0] not in BENCHMARKS:
        what = f"no benchmark {argv[0]!r}; allowed: {', '.join(BENCHMARKS)}" if argv else "name a benchmark"
        print(f"error: {what}\n{usage}", file=sys.stderr)
        return 2
    importlib.import_module(BENCHMARKS[argv[0]]).main(argv[1:])
    return 0
