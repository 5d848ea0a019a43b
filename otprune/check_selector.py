"""``otprune check-selector``: the contract battery (``otprune.contract_check``) on one method.

    otprune check-selector OURS                       # a built-in selector
    otprune check-selector POOL --device cuda         # an installed plugin, on the GPU
    otprune check-selector mypkg.prune:select_mine    # a function not installed as a plugin
    otprune check-selector mypkg.prune:merge_mine --merger --json

One line per check: PASS, FAIL with the fault, or SKIP with why. Exit status 0 when no check
failed, 1 when one did, 2 when the method cannot be loaded or checked (the reason is printed).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

import torch

from otprune.contract_check import run_battery
from otprune.methods import get_method, load_function


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="otprune check-selector",
        description="Run the selector/merger contract battery on a built-in, an installed plugin or a module:function.",
    )
    parser.add_argument("method", metavar="NAME|module:function", help="a method name (BASELINE) or module:function")
    parser.add_argument("--merger", action="store_true", help="module:function is a merger (default: a selector)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the tokens live (default: cpu)")
    parser.add_argument("--options", default=None, metavar="JSON", help="the method's options, a JSON object (as OTPRUNE_OPTIONS)")
    parser.add_argument("--json", action="store_true", help="print the results as one JSON object")
    return parser.parse_args(argv)


def _load(spec: str, merger: bool):
    """The method to check, or a ``ValueError`` (``PluginError`` included) saying why not."""
    if ":" in spec:
        return load_function(spec, "merger" if merger else "selector")
    method = get_method(spec)
    if method.kind == "layer":
        raise ValueError(f"{method.name} acts inside the LLM and has no standalone function to check")
    if merger and method.kind != "merger":
        raise ValueError(f"--merger: {method.name} is a {method.kind}, not a merger (--merger is for module:function)")
    return method


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else list(argv))
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda is not allowed here: torch sees no CUDA GPU; run on a GPU machine, or use --device cpu", file=sys.stderr)
        return 2
    try:
        method = _load(args.method, args.merger)
        options = {} if args.options is None else json.loads(args.options)
        if not isinstance(options, dict):
            raise ValueError(f"--options must be a JSON object; got {args.options!r}")
        results = run_battery(method, device=args.device, options=options)
    except json.JSONDecodeError as error:
        print(f"error: --options is not JSON: {error}", file=sys.stderr)
        return 2
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    failed = sum(result.status == "fail" for result in results)
    if args.json:
        print(
            json.dumps(
                {
                    "method": method.name,
                    "kind": method.kind,
                    "origin": method.origin,
                    "device": args.device,
                    "failed": failed,
                    "results": [asdict(result) for result in results],
                },
                indent=2,
            )
        )
    else:
        context = ", ".join(method.context) or "none"
        print(f"{method.name}: {method.kind} ({method.origin}), context: {context}, device: {args.device}")
        width = max(len(result.name) for result in results)
        for result in results:
            print(f"{result.status.upper():<4}  {result.name:<{width}}  {result.detail}")
        counts = {status: sum(r.status == status for r in results) for status in ("pass", "fail", "skip")}
        print(f"{counts['pass']} passed, {counts['fail']} failed, {counts['skip']} skipped")
    return 1 if failed else 0
