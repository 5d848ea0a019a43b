"""One checker of an lmms-eval attempt, shared by the harness and the GPU check: a run counts only
when lmms-eval wrote every task's results at the asked limit, logged no ERROR (it logs a sample
that raised, an out-of-memory included, and answers it with "" instead of failing), and its
OTPRUNE_LOG lines show the method pruning every image to its budget."""

from __future__ import annotations

import json
import re

from otprune.prune_config import config_from_env
from otprune.sample_timer import TIMING_PREFIX
from otprune.selectors import budget

# A progress bar may share the line (it ends in a carriage return, not a newline): found anywhere.
TIMING_LINE = re.compile(re.escape(TIMING_PREFIX) + r"(\{[^{}\n]*\})")
LOG_LINE = re.compile(r"otprune (\w+): visual tokens ([\d\->, ]+); selector ([\d.]+) ms(?:; ot ([^;\n]+))?(?:; redundancy ([^;\n]+))?")
NO_SELECTION = "no selection logged: is otprune installed in this environment? (pip install -e . in it)"


def parse_prune_log(text: str) -> dict:
    """Per-image ``[before, after]`` visual tokens, per-call selector ms and, where OTPRUNE_OT=1
    recorded them, per-image OT distances (kept vs full set) and near-duplicate shares (of the full
    set) from OTPRUNE_LOG lines; ``timing``:
    each ``generate`` call's record (``otprune.sample_timer``) from its timing line."""
    tokens, selector_ms, ot, redundancy, methods = [], [], [], [], []
    timing = [json.loads(match.group(1)) for match in TIMING_LINE.finditer(text)]
    for match in LOG_LINE.finditer(text):
        methods.append(match.group(1))
        for pair in match.group(2).split(","):
            before, after = pair.strip().split("->")
            tokens.append([int(before), int(after)])
        selector_ms.append(float(match.group(3)))
        if match.group(4):
            ot += [float(v) for v in match.group(4).split(",")]
        if match.group(5):
            redundancy += [float(v) for v in match.group(5).split(",")]
    return {
        "visual_tokens": tokens,
        "selector_ms": selector_ms,
        "ot_distance": ot,
        "near_duplicate_share": redundancy,
        "logged_methods": sorted(set(methods)),
        "timing": timing,
    }


def pruning_problem(env: dict, log: dict, samples: int) -> str | None:
    """Why the child's log does not show the run's method pruning every sample to its budget
    (``None`` when it does). ``log``: :func:`parse_prune_log`'s; ``samples``: samples evaluated."""
    config = config_from_env(env)
    if not config.enabled:
        if log["visual_tokens"]:
            return f"the unpruned run logged a selection by {', '.join(log['logged_methods'])}: a pruning variable leaked into it"
        return None
    if not log["visual_tokens"]:
        return NO_SELECTION
    others = [m for m in log["logged_methods"] if m != config.method]
    if others:
        return f"the log shows a selection by {', '.join(others)}, not {config.method}"
    merger = config.method != "VTW" and config.spec.kind == "merger"
    for before, after in log["visual_tokens"]:
        expected = 0 if config.method == "VTW" else budget(config.ratio, before)
        # A merger keeps 1 <= m <= k tokens (POOL: the largest grid that fits the budget).
        if (1 <= after <= expected) if merger else after == expected:
            continue
        if config.method == "VTW":
            rule = "keeps none"
        elif merger:
            rule = f"a merger at ratio {config.ratio:g} keeps between 1 and {expected}"
        else:
            rule = f"at ratio {config.ratio:g} keeps {expected}"
        return f"an image kept {after} of {before} visual tokens; {config.method} {rule}"
    if len(log["visual_tokens"]) < samples:
        return f"{samples} samples evaluated but only {len(log['visual_tokens'])} images' selections logged"
    return None


ANSI_COLOUR = re.compile(r"\x1b\[[0-9;]*m")


def logged_errors(text: str) -> dict[str, int]:
    """lmms-eval's ERROR lines, which it logs instead of failing (a sample that raised while
    generating gets an empty answer): ``{message: times}``."""
    errors: dict[str, int] = {}
    for line in ANSI_COLOUR.sub("", text).splitlines():
        if "| ERROR" in line:
            message = line.rsplit(" - ", 1)[-1].strip()[:200]
            errors[message] = errors.get(message, 0) + 1
    return errors


def attempt_problems(
    *,
    returncode: int | None,
    tasks,
    done: set,
    limits: set,
    limit: int | None,
    env: dict,
    log_text: str,
    samples: int,
    check_pruning: bool = True,
) -> list[str]:
    """Why an attempt does not count (``[]`` when it does). ``done``: the tasks its results files
    hold; ``limits``: the limits those files say lmms-eval ran with; ``samples``: samples evaluated;
    ``check_pruning``: False for a caller with a stricter check of the logged selections."""
    missing = sorted(set(tasks) - done)
    if missing:
        return [f"exit code {returncode}; no results file for {', '.join(missing)}"]
    problems = []
    if limits != {limit}:
        problems.append(f"the results file says limit {sorted(map(str, limits))}, the harness asked for {limit}")
    problems += [f"lmms-eval logged {count} x ERROR: {message}" for message, count in logged_errors(log_text).items()]
    pruning = pruning_problem(env, parse_prune_log(log_text), samples) if check_pruning else None
    if pruning:
        problems.append(pruning)
    return problems
