"""``otprune doctor``: is this installation the tested stack, and will a run work?

Prints the installed versions against the lock and the tested bounds (``otprune.stack``), each
known break with its fix, whether lmms-eval will load otprune's entry point, each method a
``BASELINE`` may name (plugins loaded and checked, as a run would), torchvision's state and the GPU. Exit status 1 when a known break applies or a version is outside the tested
range, else 0 (a version that differs from the lock is reported, not failed).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from importlib import metadata

from otprune import stack as stack_module
from otprune.methods import BUILTINS, get_method, method_names


def entry_point_state() -> str:
    """Whether lmms-eval's ``lmms_eval.models`` group lists otprune and its target imports."""
    points = [p for p in metadata.entry_points(group="lmms_eval.models") if p.name == "otprune"]
    if not points:
        return "MISSING: otprune is not registered under lmms_eval.models; reinstall it (bash scripts/install.sh --llava)"
    try:
        points[0].load()
    except Exception as error:  # what lmms-eval would meet: it only warns and runs unpruned
        return f"BROKEN: {points[0].value} does not import ({type(error).__name__}: {error})"
    return f"ok: {points[0].value} (lmms-eval loads it in every process)"


def method_states() -> list[str]:
    """One line per method beyond the built-ins: where it comes from and what it asks for, or why
    a run naming it would stop (a broken plugin stops only those runs)."""
    lines = []
    for name in method_names():
        if name in BUILTINS:
            continue
        try:
            method = get_method(name)
        except ValueError as error:
            lines.append(f"  {name}: BROKEN: {error}")
            continue
        asks = ", ".join(method.context) or "no context"
        lines.append(f"  {name}: {method.kind} from {method.origin}; asks {asks}; options {', '.join(method.options) or 'none'}")
    return lines


def torchvision_state() -> str:
    """torchvision installed or not, and whether it imports, checked in a fresh interpreter
    (a failed import leaves half a module behind)."""
    try:
        version = metadata.version("torchvision")
    except metadata.PackageNotFoundError:
        return "not installed (only lmms-eval's Qwen-VL and OneVision models need it: install.sh --vlm)"
    probe = subprocess.run(
        [sys.executable, "-c", "import sys, torchvision; print('hook' if '_otprune_cpu_torchvision' in sys.modules else 'plain')"],
        capture_output=True,
        text=True,
    )
    if probe.returncode:
        last = (probe.stderr.strip().splitlines() or ["?"])[-1]
        return f"BROKEN: torchvision {version} does not import ({last}); install.sh --vlm installs the CPU hook, or remove it"
    how = " through otprune's CPU start-up hook (its C++ operators unavailable)" if probe.stdout.strip() == "hook" else ""
    return f"ok: torchvision {version} imports{how}"


def device_state() -> str:
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if torch.cuda.is_available():
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        return f"CUDA {torch.version.cuda}, {torch.cuda.device_count()} GPU(s): {names} (torch {torch.__version__})"
    build = "a CUDA build without a usable GPU" if torch.version.cuda else "a CPU build"
    return f"no GPU: torch {torch.__version__} is {build}"


def table(rows: list[stack_module.Row]) -> list[str]:
    lines = ["| package | installed | lock | tested range | status |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.name} | {r.installed or '-'} | {r.locked or '-'} | {r.bound or '-'} | {r.status} |")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="otprune doctor", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--lock", choices=stack_module.ENVIRONMENTS, help="the lock to compare with (default: the environment the installed packages look like)"
    )
    parser.add_argument("--summary", action="store_true", help="one line: the stack against the lock, and its problems")
    args = parser.parse_args(argv)
    found = stack_module.inspect(args.lock)
    if args.summary:
        print(stack_module.summary(found))
        return 1 if found.problems else 0
    print(
        f"Python {sys.version.split()[0]}; lock: "
        + (f"locks/{found.environment}.txt" if found.lock_found else f"none for {found.environment} (not a source checkout: only the bounds are checked)")
    )
    print("\n".join(table(found.rows)))
    if found.lock_found:
        differing = [r for r in found.others if r.installed != r.locked]
        print(
            f"\nOther locked packages: {len(found.others) - len(differing)} as locked, {len(differing)} not"
            + (": " + ", ".join(f"{r.name} {r.installed or 'missing'} (lock {r.locked})" for r in differing) if differing else "")
        )
    print("\nKnown breaks: " + ("; ".join(found.breaks) if found.breaks else "none applies"))
    print(f"lmms-eval entry point: {entry_point_state() if 'lmms-eval' in stack_module.installed_versions() else 'lmms-eval is not installed'}")
    print(f"methods: built-in {', '.join(BUILTINS)}; plugins:")
    print("\n".join(method_states()) or "  none")
    print(f"torchvision: {torchvision_state()}")
    print(f"device: {device_state()}")
    print("\n" + stack_module.summary(found))
    return 1 if found.problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
