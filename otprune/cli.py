"""The ``otprune`` command: the evaluation harness, its report and the analyses.

    otprune run [CONFIG] [options]     # an experiment config through lmms-eval, then its Table 1
    otprune report RUNS/<config>       # Table 1 from a runs folder
    otprune status RUNS/<config>       # each run: done, failed, queued, running, not started
    otprune analysis COMMAND [...]     # the paper's analyses (python -m otprune.analysis)
    otprune bench selectors|prefill    # the benchmarks of the selectors and of the prefill
    otprune doctor                     # the installed stack against the lock and the known breaks
    otprune check-selector NAME        # the contract battery on a selector or merger (or module:function)
    otprune calibrate fitprune MODEL   # FitPrune's recipe fitted to a TFLOP budget on a task sample

Each subcommand's module is imported only when it runs, so a missing optional dependency of one
(lmms-eval's stack for ``run``, scipy for ``report``) is named instead of breaking the others.
"""

from __future__ import annotations

import importlib
import sys

# name -> (module with main(argv) -> int, what it does)
SUBCOMMANDS = {
    "run": ("otprune.harness.cli", "run an experiment config through lmms-eval, resumably (locally or on Slurm), then print its Table 1"),
    "report": ("otprune.report", "write Table 1 (Markdown and CSV) from a runs folder"),
    "analysis": ("otprune.analysis.__main__", "the paper's analyses: subset enumeration, Table 2, Fig. 2"),
    "bench": ("otprune.bench", "the benchmarks: selectors (the selectors alone), prefill (LLaVA-shaped end to end)"),
    "doctor": ("otprune.doctor", "the installed stack against the lock, the tested range and the known breaks"),
    "status": ("otprune.harness.status", "each run's state in a runs folder: done, failed, queued, running, not started"),
    "check-selector": ("otprune.check_selector", "run the selector/merger contract battery on a built-in, a plugin or module:function"),
    "calibrate": ("otprune.calibrate", "fit FitPrune's recipe to a TFLOP budget on a sample of tasks (otprune calibrate fitprune MODEL ...)"),
}
EXTRAS = "pip install 'otprune[llava]' (or bash scripts/install.sh --llava in a checkout)"


def usage() -> str:
    width = max(map(len, SUBCOMMANDS))
    lines = [f"  {name:<{width}}  {what}" for name, (_, what) in SUBCOMMANDS.items()]
    return "usage: otprune COMMAND [ARGS...]   (otprune COMMAND --help for its options)\n\ncommands:\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"error: no command {name!r}; allowed: {', '.join(SUBCOMMANDS)}\n\n{usage()}", file=sys.stderr)
        return 2
    module_name = SUBCOMMANDS[name][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name is None or error.name.split(".")[0] == "otprune":
            raise
        print(f"error: otprune {name} needs the Python package {error.name!r}, which is not installed: {EXTRAS}", file=sys.stderr)
        return 2
    return module.main(rest)
