"""``otprune calibrate fitprune MODEL --tasks T1,T2 --limit N (--tflop T | --ratio R) [--out PATH]``:
FitPrune's recipe for ``MODEL`` fitted to a prefill-FLOPs budget (``otprune.fitprune``).

**Design**: the calibration is an unchanged lmms-eval run of the unpruned model (``--limit N``
samples of each task, the command and environment the harness gives a run: ``otprune.harness.plan``)
with ``BASELINE=FITPRUNE`` in its calibration mode (``otprune.plugins.fitprune``: options
``statistics`` and ``layers``), whose schedule keeps every visual token before every layer and
appends each image's attention weights of each layer to a statistics file. So the prompts are the
tasks' own, built by lmms-eval's model class (chat template, image processing) exactly as in the
evaluation, the model loads as lmms-eval loads it, and the weights come from the attention
context the pruning hooks compute from ``q`` and ``k`` (``patches/layers.py``): no second prompt
builder, model loader or attention path. The statistics' samples are the prompts' images, one
image per prompt.

**Budget**: ``--tflop T`` the mean prefill TFLOP of the calibration prompts; ``--ratio R`` that
share of their unpruned prefill. FLOPs are the project's prefill formula (``otprune.measures``)
over the LLM that runs: a tiny checkpoint's own (its ``config.json``), a hub model's from
``otprune.measures.MODELS``; text tokens are each prompt's question (the ``text`` context: the
tokens after its image), as the report's TFLOP column counts a prompt's text.

**Recipe file**: ``kind`` ``"otprune fitprune recipe"``, ``visual_tokens``, ``drops`` (after
each layer), ``tflop`` (the recipe's, mean over the calibration prompts), ``budget``, ``alpha``,
the ``model``, its ``llm_shape``, the ``tasks`` and ``limit``, and the ``statistics`` it came from.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from otprune.fitprune import RECIPE_KIND, fit_recipe, recipe_tflop
from otprune.measures import MODELS as LLM_SHAPES
from otprune.measures import ModelShape, staged_prefill_flops

__all__ = ["build_statistics", "main", "write_recipe"]

METHODS = ("fitprune",)
LOG_TAIL = 3000


class CalibrationError(ValueError):
    """A calibration that cannot run or fit, for a reason the user can fix (exit 2)."""


def build_statistics(lines: list[str], layers: int) -> dict:
    """The statistics (``otprune.fitprune``) from the calibration file's JSON lines: per image,
    the weights of layers ``0 .. layers - 2`` in that order (a line of layer 0 begins an image)."""
    samples = []
    for number, line in enumerate(lines, 1):
        record = json.loads(line)
        if record["layer"] == 0:
            samples.append({"text_tokens": record["text_tokens"], "cross": [], "self": []})
        elif not samples or len(samples[-1]["cross"]) != record["layer"]:
            raise CalibrationError(
                f"calibration statistics line {number} is layer {record['layer']} out of order: "
                "the calibration takes prompts of one image each, one prompt at a time (batch size 1)"
            )
        samples[-1]["cross"].append(record["cross"])
        samples[-1]["self"].append(record["self"])
    if not samples:
        raise CalibrationError("the calibration run logged no image's statistics: do the tasks' prompts hold an image?")
    incomplete = [i for i, sample in enumerate(samples) if len(sample["cross"]) != layers - 1]
    if incomplete:
        raise CalibrationError(f"calibration images {incomplete} have statistics of fewer than the {layers - 1} layers asked for")
    sizes = {len(row) for sample in samples for row in sample["cross"]}
    if len(sizes) != 1:
        raise CalibrationError(f"the calibration images have different visual token counts {sorted(sizes)}; a recipe needs one")
    return {"visual_tokens": sizes.pop(), "samples": samples}


def unpruned_flops(statistics: dict, shape: ModelShape) -> float:
    """The calibration prompts' mean prefill FLOPs without pruning."""
    samples = statistics["samples"]
    return sum(staged_prefill_flops(s["text_tokens"], statistics["visual_tokens"], [], shape) for s in samples) / len(samples)


def write_recipe(statistics: dict, shape: ModelShape, target_flops: float, about: dict, out: Path) -> dict:
    """Fit the recipe to ``target_flops`` and write it to ``out``; the recipe written."""
    try:
        alpha, drops = fit_recipe(statistics, target_flops, shape)
    except ValueError as error:
        raise CalibrationError(f"the budget {target_flops / 1e12:.6g} TFLOP (--tflop, or --ratio of the unpruned prefill): {error}") from None
    n_visual = statistics["visual_tokens"]
    tflop = recipe_tflop(drops, n_visual, [s["text_tokens"] for s in statistics["samples"]], shape)
    recipe = {
        "kind": RECIPE_KIND,
        **about,
        "llm_shape": {"layers": shape.layers, "hidden": shape.hidden, "ffn": shape.ffn},
        "budget": {"tflop": target_flops / 1e12, "unpruned_tflop": unpruned_flops(statistics, shape) / 1e12},
        "tflop": tflop,
        "alpha": alpha,
        "visual_tokens": n_visual,
        "drops": drops,
        "statistics": statistics,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(recipe) + "\n")
    return recipe


def llm_of(model: str, pretrained: str) -> ModelShape:
    """The LLM that runs: a tiny checkpoint's own, else its catalogue entry's."""
    from otprune.harness.catalogue import MODELS
    from otprune.harness.checkpoints import llm_shape

    if MODELS[model].tiny is None:
        return LLM_SHAPES[MODELS[model].flops_model]
    shape = llm_shape(Path(pretrained))
    if shape is None:
        raise CalibrationError(f"the checkpoint {pretrained} has no readable config.json to take its LLM's shape from")
    return ModelShape(hidden=shape["hidden"], ffn=shape["ffn"], layers=shape["layers"])


def collect_statistics(args, tasks: list[str], catalogue: dict, folder: Path) -> tuple[dict, ModelShape]:
    """Run lmms-eval unpruned in calibration mode on ``--limit`` samples of each task."""
    from otprune.harness.checkpoints import checkpoint
    from otprune.harness.config import Config
    from otprune.harness.plan import Run, child_env, command

    pretrained = checkpoint(args.model, Path(args.runs_dir))
    shape = llm_of(args.model, pretrained)
    statistics_file = folder / "statistics.jsonl"
    options = {"statistics": str(statistics_file), "layers": shape.layers}
    run = Run(args.model, "FitPrune", 1.0, {"BASELINE": "FITPRUNE", "OTPRUNE_OPTIONS": json.dumps(options)}, tuple(tasks), folder)
    config = Config("calibrate", args.lmms_model, args.model_args, {}, {}, tasks, catalogue=catalogue)
    log_path = folder / "lmms_eval.log"
    with open(log_path, "w") as log:
        process = subprocess.run(command(config, run, pretrained, 1, args.limit, folder), env=child_env(run, 1), stdout=log, stderr=subprocess.STDOUT)
    log_text = log_path.read_text(errors="replace")
    if process.returncode != 0 or not statistics_file.is_file():
        raise RuntimeError(f"the calibration run (lmms-eval) failed with exit code {process.returncode}; its log ends:\n{log_text[-LOG_TAIL:]}")
    return build_statistics(statistics_file.read_text().splitlines(), shape.layers), shape


def parse_args(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="otprune calibrate", description=__doc__.split("\n\n")[0])
    parser.add_argument("method", help=f"the method to calibrate: {', '.join(METHODS)}")
    parser.add_argument("model", help="a model of otprune.harness.catalogue.MODELS (synth-llava-1.5, liuhaotian/llava-v1.5-7b, ...)")
    parser.add_argument("--tasks", required=True, help="comma-separated tasks of configs/tasks.yaml whose prompts calibrate")
    parser.add_argument("--limit", type=int, required=True, help="samples of each task (lmms-eval --limit), >= 1")
    budget = parser.add_mutually_exclusive_group(required=True)
    budget.add_argument("--tflop", type=float, help="the prefill budget in TFLOP (mean over the calibration prompts)")
    budget.add_argument("--ratio", type=float, help="the budget as a share of the unpruned prefill, in (0, 1)")
    parser.add_argument("--out", help="the recipe file (default: recipes/fitprune_<model>.json)")
    parser.add_argument("--runs-dir", help="where the tiny checkpoints are built (default: the harness's runs folder)")
    parser.add_argument("--lmms-model", default="llava", help="lmms-eval's model class (default: llava)")
    parser.add_argument("--model-args", help="lmms-eval --model_args without pretrained= (default: device=cpu,device_map=auto for a tiny model, else none)")
    return parser.parse_args(argv)


def check_args(args) -> tuple[list[str], dict]:
    """``(tasks, the task catalogue)``; a :class:`CalibrationError` names a bad value."""
    from otprune.harness.catalogue import MODELS
    from otprune.harness.resources import DEFAULT_RUNS, load_catalogue

    if args.method not in METHODS:
        raise CalibrationError(f"no calibration for method {args.method!r}; allowed: {', '.join(METHODS)}")
    if args.model not in MODELS:
        raise CalibrationError(f"unknown model {args.model!r}; allowed: {', '.join(MODELS)}")
    if args.limit < 1:
        raise CalibrationError(f"--limit {args.limit} is not allowed; give the samples per task, an integer >= 1")
    if args.tflop is not None and not args.tflop > 0:
        raise CalibrationError(f"--tflop {args.tflop:g} is not allowed; give a budget > 0")
    if args.ratio is not None and not 0 < args.ratio < 1:
        raise CalibrationError(f"--ratio {args.ratio:g} is not allowed; give a share of the unpruned prefill in (0, 1)")
    catalogue = load_catalogue()
    tasks = [task.strip() for task in args.tasks.split(",") if task.strip()]
    unknown = [task for task in tasks if task not in catalogue]
    if not tasks or unknown:
        raise CalibrationError(f"unknown task(s) {', '.join(unknown) or repr(args.tasks)}; allowed (configs/tasks.yaml): {', '.join(catalogue)}")
    if args.model_args is None:
        args.model_args = "device=cpu,device_map=auto" if MODELS[args.model].tiny else ""
    args.runs_dir = args.runs_dir or str(DEFAULT_RUNS)
    args.out = Path(args.out or f"recipes/fitprune_{args.model.split('/')[-1]}.json")
    return tasks, catalogue


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        tasks, catalogue = check_args(args)
        with tempfile.TemporaryDirectory(prefix="otprune_calibrate_") as folder:
            statistics, shape = collect_statistics(args, tasks, catalogue, Path(folder))
        target = args.tflop * 1e12 if args.tflop is not None else args.ratio * unpruned_flops(statistics, shape)
        about = {"model": args.model, "tasks": tasks, "limit": args.limit}
        recipe = write_recipe(statistics, shape, target, about, args.out)
    except (CalibrationError, RuntimeError) as error:
        # Bad input is the user's to fix (2); a failed lmms-eval run is not (1).
        print(f"error: {error}", file=sys.stderr)
        return 2 if isinstance(error, CalibrationError) else 1
    print(f"wrote {args.out}: drops {recipe['drops']} of {recipe['visual_tokens']} visual tokens")
    print(
        f"recipe {recipe['tflop']:.6g} TFLOP <= budget {target / 1e12:.6g} TFLOP "
        f"(unpruned {recipe['budget']['unpruned_tflop']:.6g}; {shape.layers}-layer LLM, d={shape.hidden}, {len(statistics['samples'])} images)"
    )
    return 0
