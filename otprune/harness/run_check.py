"""One checker of an lmms-eval attempt, shared by the harness and the GPU check: a run counts only
when lmms-eval wrote every task's results at the asked limit, logged no ERROR (it logs a sample
that raised, an out-of-memory included, and answers it with "" instead of failing), and its
OTPRUNE_LOG lines show the method pruning every image to its budget."""

from __future__ import annotations

import json
import re

from otprune.prune_config import config_from_env
from otprune.sample_timer import TIMING_PREFIX
from otprune.schedule import stage_counts

# A progress bar may share the line (it ends in a carriage return, not a newline): found anywhere.
TIMING_LINE = re.compile(re.escape(TIMING_PREFIX) + r"(\{[^{}\n]*\})")
LOG_LINE = re.compile(r"otprune (\w+)(?: at layer (\d+))?: visual tokens ([\d\->, ]+); selector ([\d.]+) ms(?:; ot ([^;\n]+))?(?:; redundancy ([^;\n]+))?")
NO_SELECTION = "no selection logged: is otprune installed in this environment? (pip install -e . in it)"


def parse_prune_log(text: str) -> dict:
    """Per-image ``[before, after]`` visual tokens, per-call selector ms and, where OTPRUNE_OT=1
    recorded them, per-image OT distances (kept vs full set) and near-duplicate shares (of the full
    set) from OTPRUNE_LOG lines; ``timing``:
    each ``generate`` call's record (``otprune.sample_timer``) from its timing line.

    A schedule of several stages logs one line per stage ("at layer K"), in layer order within a
    forward: an image's ``before`` is its first stage's, its ``after`` its last stage's, and
    ``stage_tokens`` lists, per image, each stage's ``[layer, kept]`` (empty for a one-stage run)."""
    tokens, stage_tokens, selector_ms, ot, redundancy, methods = [], [], [], [], [], []
    timing = [json.loads(match.group(1)) for match in TIMING_LINE.finditer(text)]
    forward_start, last_layer = 0, None
    for match in LOG_LINE.finditer(text):
        methods.append(match.group(1))
        pairs = [[int(v) for v in pair.strip().split("->")] for pair in match.group(3).split(",")]
        layer = None if match.group(2) is None else int(match.group(2))
        if layer is not None and last_layer is not None and layer > last_layer:
            # A later stage of the same forward: its images, in order, are that forward's.
            for i, (_, after) in enumerate(pairs):
                tokens[forward_start + i][1] = after
                stage_tokens[forward_start + i].append([layer, after])
        else:
            forward_start = len(tokens)
            tokens += pairs
            stage_tokens += [[] if layer is None else [[layer, after]] for _, after in pairs]
        last_layer = layer
        selector_ms.append(float(match.group(4)))
        if match.group(5):
            ot += [float(v) for v in match.group(5).split(",")]
        if match.group(6):
            redundancy += [float(v) for v in match.group(6).split(",")]
    return {
        "visual_tokens": tokens,
        "stage_tokens": stage_tokens if any(stage_tokens) else [],
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
    problem = schedule_problem(config, log) if len(config.stages) > 1 else one_stage_problem(config, log)
    if problem:
        return problem
    if len(log["visual_tokens"]) < samples:
        return f"{samples} samples evaluated but only {len(log['visual_tokens'])} images' selections logged"
    return None


def one_stage_problem(config, log: dict) -> str | None:
    """Why a one-stage run's log does not show every image kept to its budget (``None`` when it does)."""
    merger = config.method != "VTW" and config.spec.kind == "merger"
    for before, after in log["visual_tokens"]:
        expected = stage_counts(config.stages, before)[0]
        # A merger keeps 1 <= m <= k tokens (POOL: the largest grid that fits the budget); an
        # adaptive run's k is N, and the method keeps any count in [1, N] it chooses.
        if (1 <= after <= expected) if merger or config.adaptive else after == expected:
            continue
        if config.method == "VTW":
            rule = "keeps none"
        elif config.adaptive:
            rule = f"run adaptive (SUBSET_RATIO unset) keeps between 1 and all {expected}"
        elif merger:
            rule = f"a merger at ratio {config.ratio:g} keeps between 1 and {expected}"
        elif config.ratio is None:
            rule = f"keeps {expected} (its schedule's one stage)"
        else:
            rule = f"at ratio {config.ratio:g} keeps {expected}"
        return f"an image kept {after} of {before} visual tokens; {config.method} {rule}"
    return None


def schedule_problem(config, log: dict) -> str | None:
    """Why a schedule's log does not show every image kept, at each of its stages, what the
    schedule says (``None`` when it does)."""
    layers = [stage.layer for stage in config.stages]
    for (before, _), logged in zip(log["visual_tokens"], log["stage_tokens"] or [[]] * len(log["visual_tokens"])):
        expected = [[layer, count] for layer, count in zip(layers, stage_counts(config.stages, before))]
        if logged != expected:
            shown = ", ".join(f"{count} at layer {layer}" for layer, count in logged) or "no stage"
            wanted = ", ".join(f"{count} at layer {layer}" for layer, count in expected)
            return f"an image of {before} visual tokens kept {shown}; {config.method}'s schedule keeps {wanted}"
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
